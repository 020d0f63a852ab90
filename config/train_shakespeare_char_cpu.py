# Character-level Shakespeare on a laptop CPU, time-to-quality: nanoGPT's CPU recipe (README "I only have a
# macbook": 4L/4H/128, block 64, dropout 0, 2000 AdamW iterations of batch 12) reaches full-val loss ~1.90; this one
# reaches lower in 250 iterations of batch 16 (0.17x the tokens): the same size of model (4L/4H/128, 0.80M
# parameters), data, block and val split, with the block of config/modern.py (RoPE, RMSNorm, QK-norm, ReLU^2,
# softcap, zero-init, untied head) trained by Muon, and no evaluation before the first step (evals are wall time).
# Per step the modern block costs more than nanoGPT's (rms_norm and RoPE are several elementwise ops each on the
# CPU) and learns far more. Measured numbers: README "Results".
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu.py
# (config/train_shakespeare_char_cpu_nanogpt.py is nanoGPT's recipe as it is)
out_dir = 'out-shakespeare-char-cpu'
eval_interval = 250         # evaluate at the end only
eval_first = False
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = 'shakespeare_char'
batch_size = 16
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos_emb = 'rope'
norm = 'rmsnorm_noparam'
qk_norm = True
emb_norm = True
mlp = 'relu2'
logit_softcap = 15.0
zero_init = True
tie_weights = False
bias = False

optimizer = 'muon'          # Muon (Newton-Schulz orthogonalised momentum) for the block matrices, AdamW for the rest
muon_lr = 0.03
learning_rate = 5e-3        # AdamW half: embeddings, head
min_lr = 5e-4
max_iters = 250
lr_decay_iters = 250
warmup_iters = 15
betas = (0.9, 0.99)
device = 'cpu'
dtype = 'float32'           # faster than bf16 at 128 wide on an AVX512-BF16 EPYC; on AMX, --dtype=bfloat16 is (README)
