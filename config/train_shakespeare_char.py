# nanoGPT's "baby GPT" on character-level Shakespeare (6L/6H/384, block 256, batch 64, dropout 0.2).
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char.py
out_dir = 'out-shakespeare-char'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # tiny data overfits: keep only the best val checkpoint

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small network can take a higher lr
max_iters = 5000
lr_decay_iters = 5000  # usually = max_iters
min_lr = 1e-4  # learning_rate / 10
betas = (0.9, 0.99)  # beta2 higher than usual: few tokens per iteration
warmup_iters = 100
