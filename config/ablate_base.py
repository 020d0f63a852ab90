# Shared base for ablations: nanoGPT's baby GPT (6L/6H/384, block 256) on character-level Shakespeare,
# classic GPT-2 components, a short fixed budget. Each config/ablate_*.py flips ONE thing on top of it:
#   python prepare.py shakespeare_char
#   python train.py config/ablate_base.py --out_dir=out-ablate-base          # the control run
#   python train.py config/ablate_base.py config/ablate_posenc.py            # one flag flipped
# Compare val loss, tok/s and parameter count in out-ablate-*/log.jsonl. Same seed, same batches.
out_dir = 'out-ablate-base'
dataset = 'shakespeare_char'
eval_interval = 100
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

batch_size = 64
block_size = 256
gradient_accumulation_steps = 1

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0  # no dropout: a short budget never overfits

learning_rate = 1e-3
max_iters = 300
lr_decay_iters = 300
min_lr = 1e-4
warmup_iters = 30
betas = (0.9, 0.99)
seed = 1337
