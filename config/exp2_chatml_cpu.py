# Experiment 2 at laptop scale: the same recipe (config/exp2_chatml.py) shrunk to train on a 2-core CPU
# in <= 10 minutes on the offline twin of SYNTH:
#   python prepare.py synth --source=local
#   python train.py config/exp2_chatml.py config/exp2_chatml_cpu.py
#   python sample.py --out_dir=out-exp2-cpu --eval_exercises=True --self_consistency=5
out_dir = 'out-exp2-cpu'
block_size = 256            # offline-twin conversations are <= 224 tokens
batch_size = 8
n_layer = 4
n_head = 4
n_embd = 192
learning_rate = 3e-3        # a small model takes a larger step
min_lr = 3e-4
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 40
eval_interval = 200
eval_iters = 10
