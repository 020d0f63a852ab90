# Normalisation: LayerNorm (GPT-2) vs RMSNorm vs parameter-free RMSNorm (nanochat), optionally after the embedding.
#   for n in layernorm rmsnorm rmsnorm_noparam; do
#     python train.py config/ablate_base.py config/ablate_norm.py --norm=$n --out_dir=out-ablate-norm-$n
#   done
#   python train.py config/ablate_base.py config/ablate_norm.py --emb_norm=True --out_dir=out-ablate-embnorm
out_dir = 'out-ablate-norm'
norm = 'rmsnorm'
