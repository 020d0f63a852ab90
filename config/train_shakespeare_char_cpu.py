# Character-level Shakespeare on a laptop CPU, time-to-quality: nanoGPT's CPU recipe (README "I only have a
# macbook": 4L/4H/128, block 64, dropout 0) reaches val ~1.89 in 2000 AdamW iterations of batch 12; Muon for the
# block matrices reaches it in 400 iterations of batch 16 (0.27x the tokens), on the same model, data and split.
# (Full val split, 3 seeds: nanoGPT 1.901, this recipe 1.890. muon_lr 0.04 at 380 iters: 1.920; 0.03: 1.903.)
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu.py
# (config/train_shakespeare_char_cpu_nanogpt.py is nanoGPT's recipe as it is)
out_dir = 'out-shakespeare-char-cpu'
eval_interval = 400         # evaluate at the start and the end only: evals are wall time too
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

optimizer = 'muon'          # Muon (Newton-Schulz orthogonalised momentum) for the block matrices, AdamW for the rest
muon_lr = 0.03
learning_rate = 3e-3        # AdamW half: embeddings/head, norms
min_lr = 3e-4
max_iters = 400
lr_decay_iters = 400
warmup_iters = 30
betas = (0.9, 0.99)
device = 'cpu'
dtype = 'float32'           # at 128 wide, fp32 beats bf16 autocast even on AVX512-BF16/AMX CPUs (measured)
