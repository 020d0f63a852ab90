# Positional encoding: learned (GPT-2) vs sinusoidal (Vaswani) vs RoPE vs ALiBi vs none (NoPE).
#   for pe in learned sinusoidal rope alibi none; do
#     python train.py config/ablate_base.py config/ablate_posenc.py --pos_emb=$pe --out_dir=out-ablate-pos-$pe
#   done
# RoPE context extension at eval time: --rope_scaling=linear|ntk|dynamic|yarn --rope_factor=4
out_dir = 'out-ablate-posenc'
pos_emb = 'rope'
