#!/usr/bin/env bash
# One button for the chat chain, offline, CPU-sized by default (measured: 40 minutes on 2 cores):
#   data (the offline SYNTH twin, arithmetic written as calculator calls) -> pretrain (every token counts)
#   -> SFT (assistant tokens only) -> preference pairs sampled from the SFT model and verified -> DPO
#   -> eval: base / SFT / SFT+DPO x greedy, sc@5, verifier@5, pass@5, with and without the calculator.
# Writes $OUT/report.md (README "Chat chain").
#   bash chatrun.sh                 # the CPU recipe: 4 layers x 192
#   SEEDS=1 bash chatrun.sh         # one DPO run (default 3 seeds from the one SFT model: gap vs seed spread)
#   bash chatrun.sh --gpu           # the 24-layer recipe of config/exp2_chatml.py on CUDA, longer stages
#   bash chatrun.sh --dry_run       # print the commands only
# Extra arguments go to every train.py stage, e.g. bash chatrun.sh --device=cpu --dtype=float32
set -euo pipefail
cd "$(dirname "$0")"
GPU=0 DRY=0 EXTRA=()
for a in "$@"; do
  case "$a" in --gpu) GPU=1 ;; --dry_run) DRY=1 ;; *) EXTRA+=("$a") ;; esac
done
OUT=${OUT:-out-chatrun}
DATA=${DATA:-data/synth_calc}
SEEDS=${SEEDS:-3}
if [ "$GPU" = 1 ]; then  # config/exp2_chatml.py as it is: 24 x 768, block 1024, batch 16
  MODEL=(config/exp2_chatml.py --n_layer=24 --device=cuda)
  PRE=${PRE:-3000} SFT=${SFT:-1500} DPO=${DPO:-300} PROMPTS=${PROMPTS:-2000} EVAL_N=${EVAL_N:-100}
  SAMPLE_DEV=(--device=cuda)
else                     # config/exp2_chatml_cpu.py: 4 x 192, block 256, batch 8
  MODEL=(config/exp2_chatml.py config/exp2_chatml_cpu.py)
  PRE=${PRE:-1000} SFT=${SFT:-3000} DPO=${DPO:-150} PROMPTS=${PROMPTS:-800} EVAL_N=${EVAL_N:-30}
  SAMPLE_DEV=()
fi
MAX_NEW=${MAX_NEW:-160}  # the twin's longest reasoning + answer is ~130 tokens
start=$(date +%s)
run() { echo "+ $*"; [ "$DRY" = 1 ] || "$@"; }
stage() { echo; echo "== $1 ($(( $(date +%s) - start ))s)"; }
common=(--data_dir="$DATA" --log_interval=50)

stage "install (pinned)"
run python -m pip install -q -r requirements.txt

stage "data"
if [ -f "$DATA/meta.json" ] && [ "$DRY" = 0 ]; then echo "$DATA already prepared"
else run python prepare.py synth --source=local --calculator=True --n_samples="${N_SAMPLES:-20000}" --out="$DATA"; fi

stage "pretrain: every token counts (mask_loss=False), $PRE iterations"
# no dropout: no stage here overfits, and dropout still costs step time on CPU (mask draws, attention outside SDPA)
run python train.py "${MODEL[@]}" "${common[@]}" --out_dir="$OUT/base" --mask_loss=False --dropout_schedule="()" \
  --max_iters="$PRE" --lr_decay_iters="$PRE" --eval_interval="$PRE" "${EXTRA[@]}"

stage "SFT: assistant tokens only, from the base, $SFT iterations"
run python train.py "${MODEL[@]}" "${common[@]}" --init_from="$OUT/base" --out_dir="$OUT/sft" --dropout_schedule="()" \
  --max_iters="$SFT" --lr_decay_iters="$SFT" --eval_interval="$SFT" --warmup_iters=20 \
  --learning_rate=2e-3 --min_lr=2e-4 "${EXTRA[@]}"

stage "preference pairs: 8 samples on each of $PROMPTS train prompts, verified"
run python sample.py --out_dir="$OUT/sft" --write_pairs="$OUT/pairs" --pairs_k=8 --pairs_prompts="$PROMPTS" \
  --temperature=1.0 --max_new_tokens="$MAX_NEW" "${SAMPLE_DEV[@]}"

for s in $(seq 1 "$SEEDS"); do
  stage "DPO seed $s: from the SFT model, $DPO iterations"
  run python train.py "${MODEL[@]}" --data_dir="$OUT/pairs" --eval_interval="$DPO" --log_interval=25 \
    --objective=dpo --dpo_beta=0.1 --dpo_nll=1.0 --init_from="$OUT/sft" --out_dir="$OUT/dpo-seed$s" --seed=$((1336 + s)) \
    --max_iters="$DPO" --lr_decay_iters="$DPO" --warmup_iters=10 --learning_rate=1e-4 --min_lr=1e-5 \
    --dropout=0.0 --dropout_schedule="()" "${EXTRA[@]}"
done

stage "eval: $EVAL_N val exercises per type, greedy and 5 samples; calculator off: arithmetic again"
[ "$DRY" = 1 ] && exit 0
OUT="$OUT" DATA="$DATA" SEEDS="$SEEDS" EVAL_N="$EVAL_N" MAX_NEW="$MAX_NEW" DEV="${SAMPLE_DEV[*]:-}" \
CHATRUN_SECONDS=$(( $(date +%s) - start )) python - <<'PY'
import json, os, statistics, sys, time
import sample
out, seeds, n_per, max_new = os.environ['OUT'], int(os.environ['SEEDS']), int(os.environ['EVAL_N']), int(os.environ['MAX_NEW'])
device = 'cuda' if 'cuda' in os.environ['DEV'] else 'cpu'
stages = [('base', ['base']), ('SFT', ['sft']), ('SFT+DPO', [f'dpo-seed{s}' for s in range(1, seeds + 1)])]
cols, results, t0 = ['greedy', 'sc@5', 'verifier@5', 'pass@5'], {}, time.time()
exercises = sample.read_exercises(os.environ['DATA'], 'val', n_per)
for name, runs in stages:
    for run in runs:
        model, tok, _ = sample.load(os.path.join(out, run, 'ckpt.pt'), device, {})
        gen = dict(max_new_tokens=max_new, strategy='sample', temperature=1.0, seed=1337)
        on = sample.score_exercises(model, tok, exercises, 5, tool=sample.calculator_tool(tok), **gen)
        # only arithmetic is written with calls: without the calculator the model must write the output itself
        off = sample.score_exercises(model, tok, [e for e in exercises if e['type'] == 'arithmetic'], 5, **gen)
        on['all'] = {c: statistics.mean(s[c] for s in on.values() if s[c] is not None) for c in cols}
        results.setdefault(name, []).append(dict(on=on, off=off, run=run))
        print(f"eval {name} ({run}): {time.time() - t0:.0f}s", file=sys.stderr)
json.dump(results, open(os.path.join(out, 'eval.json'), 'w'), indent=1)

def cell(per_run, calc, t, c):
    vals = [r[calc][t][c] for r in per_run]
    if vals[0] is None:
        return '-'
    return f"{vals[0]:.2f}" if len(vals) == 1 else f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"

lines = ["# chat chain report", "", f"Exact match on {n_per} held-out exercises per type (`{os.environ['DATA']}`); "
         "sc@5, verifier@5 and pass@5 from 5 samples at temperature 1" +
         (f"; SFT+DPO: mean ± sample std over {seeds} DPO seeds from the one SFT model" if seeds > 1 else "") +
         ". Calculator off: the arithmetic exercises again, the model's calls left unanswered.", "",
         "| stage | type | calculator | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
for name, _ in stages:
    per_run = results[name]
    lines += [f"| {name} | {t} | on | " + " | ".join(cell(per_run, 'on', t, c) for c in cols) + " |" for t in per_run[0]['on']]
    lines.append(f"| {name} | arithmetic | off | " + " | ".join(cell(per_run, 'off', 'arithmetic', c) for c in cols) + " |")
lines += ["", f"wall time: {int(os.environ['CHATRUN_SECONDS']) + time.time() - t0:.0f} s in all (eval {time.time() - t0:.0f} s)"]
open(os.path.join(out, 'report.md'), 'w').write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"wrote {out}/report.md")
PY
