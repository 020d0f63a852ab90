# nanoGPT's CPU recipe for character-level Shakespeare (README "I only have a macbook"):
# 4L/4H/128, block 64, batch 12, 2000 iters, no dropout. nanoGPT reports val loss ~1.88.
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu_nanogpt.py
out_dir = 'out-shakespeare-char-cpu-nanogpt'
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = 'shakespeare_char'
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
betas = (0.9, 0.99)
warmup_iters = 100
device = 'cpu'
