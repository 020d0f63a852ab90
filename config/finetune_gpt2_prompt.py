# Prompt tuning (Lester et al. 2021) on GPT-2: 20 learned embeddings before every sequence, initialised from rows
# of GPT-2's vocabulary embedding; the 124M base stays frozen and the checkpoint holds 20 x 768 numbers and the
# base's path. Works best on large bases (the paper's gap to full finetuning closes at billions of parameters).
#   python prepare.py shakespeare --tokenizer=gpt2 && python train.py config/finetune_gpt2_prompt.py
init_from = 'gpt2'
out_dir = 'out-finetune-gpt2-prompt'
dataset = 'shakespeare'
eval_interval = 50
eval_iters = 20
log_interval = 10

n_soft_prompt = 20        # training windows are block_size - 20 tokens
batch_size = 8
gradient_accumulation_steps = 4
block_size = 1024
learning_rate = 3e-2      # few parameters, starting far from useful: a large lr (the paper used 0.3 with Adafactor)
weight_decay = 0.0
warmup_iters = 20
max_iters = 300
lr_decay_iters = 300
min_lr = 3e-3
