# Experiment 2: migrate GPT-2 (124M shape) into a modern LLaMA/nanochat-style model trained on reasoning
# data in ChatML format, with loss masks on the assistant turns.
#   python prepare.py synth                      # PleIAs/SYNTH, or its offline twin (--source=local)
#   python train.py config/exp2_chatml.py --n_layer=24
# --n_layer=24 is the documented default; smaller overrides (--n_layer=6) work unchanged.
# The seed checklist's phases are marked on each group below.
out_dir = 'out-exp2'

# -- phase 0: data. ChatML conversations; train_mask.bin makes only assistant tokens (incl. <|im_end|>) count
dataset = 'synth'
block_size = 1024
batch_size = 16
eval_interval = 250
eval_iters = 20
log_interval = 10

# -- phase 1: the GPT-2 skeleton: 24 layers, 768 wide, 12 heads
n_layer = 24
n_head = 12
n_embd = 768

# -- phase 2: architecture migration, one component at a time
pos_emb = 'rope'            # learned positions -> RoPE
rope_base = 10000.0
qk_norm = True              # RMS-normalise q and k after RoPE
emb_norm = True             # a norm right after the token embedding
logit_softcap = 15.0        # 15 * tanh(logits / 15)
norm = 'rmsnorm_noparam'    # LayerNorm -> parameter-free RMSNorm
mlp = 'relu2'               # GELU -> ReLU^2 (set --mlp=swiglu for SwiGLU at the same parameter count)
tie_weights = True          # embedding and head share one matrix
zero_init = True            # attn and MLP c_proj start at zero (blocks start as the identity); the tied head
                            #   keeps N(0, 0.02): it is the embedding, and zeroing it would zero every input
bias = False

# -- phase 3: optimizer. AdamW groups: decay 0.1 on matrices, none on norms and embeddings
weight_decay = 0.1
decay_embeddings = False
betas = (0.8, 0.95)
eps = 1e-10
learning_rate = 4e-4
min_lr = 4e-5
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 200          # linear warmup, then cosine

# -- phase 4: regularisation schedule. dropout 0.0, switched to 0.05 at 60% of training
dropout = 0.0
dropout_schedule = (0.0, 0.05, 0.6)

# -- phase 5: precision. bf16 autocast where the hardware is fast at it (GPUs, AVX512-BF16/AMX CPUs)
dtype = 'auto'
