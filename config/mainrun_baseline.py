# The "mainrun" exercise's baseline (Maincode's take-home; facts in ../shared/DATA.md §2): a 27M-parameter
# GPT-2-style model on 100,000 Hacker News titles, 7 epochs, plain SGD. Its published val loss is 1.7533.
#   python prepare.py hn_titles && python train.py config/mainrun_baseline.py
# Same model and budget as the exercise's train.py; what differs here: batches are random windows (there: one
# contiguous stream), and val loss is our per-token cross-entropy on eval_iters fixed batches (there: the summed
# token loss of the whole val stream divided by its number of *characters*), so the numbers are not comparable.
# The exercise's blocks are pre-norm, x + f(LN(x)), as here; --norm_position=post trains the post-LN variant.
out_dir = 'out-mainrun-baseline'
dataset = 'hn_titles'
eval_iters = 20
log_interval = 10

n_layer = 6
n_head = 8
n_embd = 512
block_size = 128
batch_size = 64
dropout = 0.1
bias = True             # nn.Linear / nn.LayerNorm defaults
pos_emb = 'learned'
norm = 'layernorm'
norm_position = 'pre'
mlp = 'gelu'            # exact GELU (nn.GELU's default)
tie_weights = True
init_scheme = 'gpt2'
init_std = 0.02

optimizer = 'sgd'
momentum = 0.0          # torch.optim.SGD's default: no momentum
learning_rate = 6e-3
weight_decay = 0.0
grad_clip = 1.0
decay_lr = True         # cosine from lr to zero over the run, no warmup
warmup_iters = 0
min_lr = 0.0
max_epochs = 7
evals_per_epoch = 3
seed = 1337
