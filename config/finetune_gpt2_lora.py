# LoRA (Hu et al. 2021) on GPT-2: the base stays frozen, rank-8 adapters on every attention and MLP matrix train
# (1.18M parameters, 0.95% of the 124M); the checkpoint holds the adapters and a reference to the base (megabytes), and
# sample.py merges W + (alpha/r) B A at load, so decoding runs at the base model's speed.
#   python prepare.py shakespeare --tokenizer=gpt2 && python train.py config/finetune_gpt2_lora.py
# On a CPU: --block_size=256 --batch_size=4 --gradient_accumulation_steps=1 --dtype=float32.
init_from = 'gpt2'
out_dir = 'out-finetune-gpt2-lora'
dataset = 'shakespeare'
eval_interval = 50
eval_iters = 20
log_interval = 10

lora_rank = 8
lora_alpha = 16.0         # update scale alpha/r = 2
lora_dropout = 0.05
lora_targets = 'attn_in,attn_out,mlp_in,mlp_out'

batch_size = 8
gradient_accumulation_steps = 4
block_size = 1024
learning_rate = 1e-3      # adapters start at zero and are few: a larger lr than full finetuning
warmup_iters = 20
max_iters = 300
lr_decay_iters = 300
min_lr = 1e-4
