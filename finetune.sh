#!/usr/bin/env bash
# Finetuning four ways from one pretrained base, on a downstream task that needs no network (tasks/genre.py:
# which kind of play is a passage from; split by play, the val plays never seen): zero-shot, a soft prompt of 20
# tokens, LoRA r=8 on every matrix, full finetuning. Writes out-finetune/results.md (README "Finetuning results").
#   bash finetune.sh                       # base = out-speedrun (bash speedrun.sh), trained here when missing
#   BASE=out-x ITERS=300 bash finetune.sh  # another base (pretrained on `plays`), longer finetunes
set -euo pipefail
cd "$(dirname "$0")"
BASE=${BASE:-out-speedrun}
ITERS=${ITERS:-200}
OUT=${OUT:-out-finetune}
if [ ! -f "$BASE/ckpt.pt" ]; then
  [ -f data/plays/meta.json ] || python prepare.py plays
  python train.py config/speedrun.py --out_dir="$BASE"
fi
python prepare.py plays_genre --tokenizer_from="$BASE" --out="$OUT/data"
BASE="$BASE" ITERS="$ITERS" OUT="$OUT" python - <<'PY'
import json, os, subprocess, sys, time
base, iters, out = os.environ['BASE'], int(os.environ['ITERS']), os.environ['OUT']
data = f'{out}/data'

def run(cmd):
    """Run a command; (stdout, wall s, peak RSS MiB of that process)."""
    t = time.time()
    p = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, text=True)
    text = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status:
        sys.exit(f"failed ({status}): {' '.join(cmd)}\n{text[-2000:]}")
    return text, time.time() - t, usage.ru_maxrss / 1024

common = [f'--init_from={base}', f'--data_dir={data}', '--block_size=256', '--batch_size=8', '--dtype=float32',
          '--eval_iters=20', f'--max_iters={iters}', f'--eval_interval={iters}', f'--lr_decay_iters={iters}',
          '--warmup_iters=20', '--log_interval=50', '--dropout=0.0']
variants = {  # name: train.py flags (None: no training, the base as it is)
    'zero-shot': None,
    'soft prompt (20 tokens)': ['--n_soft_prompt=20', '--learning_rate=3e-2', '--min_lr=3e-3', '--weight_decay=0'],
    'LoRA r=8 (all matrices)': ['--lora_rank=8', '--lora_alpha=16', '--lora_targets=attn_in,attn_out,mlp_in,mlp_out',
                                '--learning_rate=2e-3', '--min_lr=2e-4'],
    'full finetuning': ['--learning_rate=5e-4', '--min_lr=5e-5'],
}
rows = []
for name, flags in variants.items():
    d = f"{out}/{name.split(' ')[0].lower()}"
    os.makedirs(d, exist_ok=True)
    cmd = ['train.py', *common, f'--out_dir={d}'] + (flags or ['--eval_only=True'])
    text, wall, peak = run(cmd)
    log = [json.loads(x) for x in open(f'{d}/log.jsonl')]
    val = [r for r in log if 'val_loss' in r][-1]['val_loss']
    trainable = next(int(x.split()[0].replace(',', '')) for x in text.splitlines() if 'trainable parameters' in x)
    ckpt = f'{d}/ckpt.pt' if flags else f'{base}/ckpt.pt'
    score, _, _ = run(['sample.py', f'--out_dir={os.path.dirname(ckpt)}', '--eval_exercises=True',
                       f'--eval_data_dir={data}', '--eval_per_type=200', '--max_new_tokens=6', '--dtype=float32'])
    acc = float(next(x for x in score.splitlines() if x.startswith('| genre')).split('|')[3])
    rows.append(dict(variant=name, trainable=trainable if flags else 0, val_loss=val, accuracy=acc, train_s=wall if flags else 0.0,
                     peak_mib=peak, ckpt_mib=os.path.getsize(ckpt) / 2**20))
    print(rows[-1], flush=True)
meta = json.load(open(f'{data}/meta.json'))
md = ['| variant | trainable params | val loss (answer tokens) | accuracy (200 val passages) | train time | '
      'peak RSS | checkpoint |', '|---|---|---|---|---|---|---|']
for r in rows:
    md.append(f"| {r['variant']} | {r['trainable']:,} | {r['val_loss']:.3f} | {r['accuracy']:.3f} | {r['train_s']:.0f} s | "
              f"{r['peak_mib']:.0f} MiB | {r['ckpt_mib']:.2f} MiB |")
b = meta['baselines']
md += ['', f"Baselines: best constant answer {b['best_constant']:.3f}, the most frequent train label "
       f"{b['majority_of_train']:.3f}, chance {b['chance']:.3f}. Base {base}, {iters} iterations each."]
open(f'{out}/results.md', 'w').write('\n'.join(md) + '\n')
print('\n'.join(md))
PY
