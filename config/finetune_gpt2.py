# Full finetuning of OpenAI's GPT-2 (124M) on TinyShakespeare, nanoGPT's finetune_shakespeare in this trainer:
#   python prepare.py shakespeare --tokenizer=gpt2 && python train.py config/finetune_gpt2.py
# GPU-sized; the weights are downloaded once to data/.cache/gpt2.safetensors (or pass --init_file=PATH).
# The architecture comes with the weights; block_size may only shrink (learned positions are cropped).
init_from = 'gpt2'
out_dir = 'out-finetune-gpt2'
dataset = 'shakespeare'   # tokenized with GPT-2's own tokenizer (--tokenizer=gpt2)
eval_interval = 10
eval_iters = 20
log_interval = 1
always_save_checkpoint = False  # keep only checkpoints that improve val loss

batch_size = 1
gradient_accumulation_steps = 32  # 32 x 1024 tokens per step
block_size = 1024
dropout = 0.1             # a small dataset: regularise (a runtime flag, free to change on pretrained weights)

learning_rate = 3e-5      # small: the weights are already good
decay_lr = False
max_iters = 20
weight_decay = 0.1
