# Attention variants against full multi-head attention (n_head=6 in the base):
#   python train.py config/ablate_base.py config/ablate_attn.py                                  # GQA, 2 kv heads
#   python train.py config/ablate_base.py config/ablate_attn.py --n_kv_head=1 --out_dir=out-ablate-mqa
#   python train.py config/ablate_base.py config/ablate_attn.py --n_kv_head=6 --attn_type=mla --out_dir=out-ablate-mla
#   python train.py config/ablate_base.py config/ablate_attn.py --n_kv_head=6 --sliding_window=64 --attn_sinks=4 --out_dir=out-ablate-window
#   python train.py config/ablate_base.py config/ablate_attn.py --n_kv_head=6 --qk_norm=True --out_dir=out-ablate-qknorm
# The KV cache shrinks with n_kv_head (and to the latent with MLA): see model.kv_bytes_per_token().
out_dir = 'out-ablate-attn'
pos_emb = 'rope'  # rope for all attention ablations (MLA's decoupled rope key needs it to carry positions)
n_kv_head = 2
