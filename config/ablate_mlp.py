# MLP activation: GELU (nanoGPT) vs GELU-tanh (GPT-2) vs ReLU^2 (Primer) vs SwiGLU (same parameter count).
#   for a in gelu gelu_tanh relu2 swiglu; do
#     python train.py config/ablate_base.py config/ablate_mlp.py --mlp=$a --out_dir=out-ablate-mlp-$a
#   done
out_dir = 'out-ablate-mlp'
mlp = 'swiglu'
