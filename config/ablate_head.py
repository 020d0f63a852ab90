# Head and init: tied embeddings + GPT-2 init (base) vs untied head with zero-init residual branches,
# and the logit softcap on its own.
#   python train.py config/ablate_base.py config/ablate_head.py
#   python train.py config/ablate_base.py config/ablate_head.py --zero_init=False --tie_weights=True --logit_softcap=15.0 --out_dir=out-ablate-softcap
out_dir = 'out-ablate-head'
zero_init = True
tie_weights = False
