# The nanochat-style block (seed experiment): RoPE + parameter-free RMSNorm + QK-norm + a norm right after
# the token embedding + ReLU^2 MLP + logit softcap 15 + zero-init residual branches + untied head.
# Model flags only, so it stacks on any recipe (later files override earlier ones):
#   python train.py config/train_shakespeare_char.py config/modern.py
#   python train.py config/ablate_base.py config/modern.py --out_dir=out-ablate-modern
out_dir = 'out-modern'

pos_emb = 'rope'            # relative positions, no position table (Su et al.)
rope_base = 10000.0
norm = 'rmsnorm_noparam'    # F.rms_norm without weights everywhere (nanochat)
qk_norm = True              # RMS-normalise q and k per head: bounded attention logits
emb_norm = True             # normalise right after the token embedding
mlp = 'relu2'               # relu(x)^2 (Primer; nanochat, modded-nanogpt)
logit_softcap = 15.0        # 15*tanh(logits/15) (nanochat)
zero_init = True            # c_proj of attn/MLP and lm_head start at zero: blocks start as the identity
tie_weights = False         # separate embedding and un-embedding (nanochat)
bias = False                # no biases in Linears
