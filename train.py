"""
Train a GPT. One process on a laptop CPU or a GPU:
    python train.py config/train_shakespeare_char.py --max_iters=2000
Many processes with DDP (gloo on CPU, nccl on GPU), or FSDP when the model does not fit one device:
    torchrun --standalone --nproc_per_node=2 train.py config/speedrun.py
    torchrun --standalone --nproc_per_node=8 train.py config/exp2_chatml.py --fsdp=True
Every global below is a config key (see `python train.py --help`), and so is every field of
GPTConfig in model.py: a model flag is set with `--pos_emb=rope` and needs no code here.
"""
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch

from configurator import check_ranges, configure, die, save_json
from model import GPT, GPTConfig, GPT2_SIZES, RUNTIME_FLAGS, gpt2_config, load_base_state, peak_flops, \
    training_dtype, cpu_has_fast_bf16, keep_freed_cpu_memory

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
eval_interval = 250       # evaluate (and checkpoint) every N iterations
log_interval = 10         # print a line every N iterations
eval_iters = 20           # batches per split in each evaluation (the same fixed batches every time)
eval_only = False         # evaluate once and exit
eval_first = True         # also evaluate before the first step (time-to-quality runs skip it: evals are wall time)
init_from = 'scratch'     # scratch | resume (out_dir/ckpt.pt) | DIR or path/to/ckpt.pt (finetune another run's
                          # weights) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl (OpenAI's weights)
init_file = ''            # gpt2*: a local model.safetensors (Hugging Face layout) instead of the download
always_save_checkpoint = True  # ckpt.pt at every eval (latest, for resume) + best.pt on improvement;
                               # False: ckpt.pt only when val improves (nanoGPT)
early_stop_patience = 0   # stop after N evals without val improvement; 0 = never
# data
dataset = 'plays'         # data/<dataset>/ made by `python prepare.py <dataset>`
data_dir = ''             # overrides data/<dataset>
mask_loss = True          # False: ignore train_mask.bin/val_mask.bin, every token counts (pretraining on chat text)
batch_size = 12           # micro-batch size per process
gradient_accumulation_steps = 1  # micro-steps per optimizer step, summed over all processes
tokens_per_step = 0       # if > 0, derive gradient_accumulation_steps from this global batch in tokens
# model: classic GPT-2 (every other GPTConfig field is a key too, with its model.py default)
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.0
bias = False
dropout_schedule = ()     # (initial, final, at_progress): switch every dropout at that fraction of training
label_smoothing = 0.0
objective = 'lm'          # lm | dpo (preference pairs from a pairs data dir; reference = the starting weights, frozen)
dpo_beta = 0.1            # dpo: how far the policy may move from the reference (REFERENCE §16.4: 0.01-0.5)
dpo_nll = 0.0             # dpo: + this x the chosen responses' NLL per token (Pang et al. 2024): keeps chosen likely
# optimizer: AdamW (or SGD) with decay on matrices only
optimizer = 'adamw'       # adamw | sgd (momentum, nesterov off; its weight decay is L2, coupled to the gradient)
                          # | muon (block matrices; AdamW for embeddings, head, norms, biases)
momentum = 0.9            # sgd only
muon_lr = 0.02            # muon: peak lr of the block matrices (the schedule scales it like learning_rate)
muon_momentum = 0.95      # muon: Nesterov momentum
learning_rate = 6e-4
max_iters = 5000
max_epochs = 0.0          # > 0: train this many passes over the train tokens instead (sets max_iters)
max_tokens = 0            # > 0: train on this many tokens instead (sets max_iters; scaling curves use it)
evals_per_epoch = 0       # > 0 with max_epochs: evaluate this many times per epoch (sets eval_interval)
weight_decay = 0.1
decay_embeddings = False  # embeddings are lookups: decaying them mostly shrinks rare tokens
betas = (0.9, 0.95)
eps = 1e-8
grad_clip = 1.0           # 0 = off
# schedule: linear warmup, then cosine down to min_lr at lr_decay_iters
decay_lr = True
warmup_iters = 100
warmup_frac = 0.0         # > 0: warmup_iters = this fraction of max_iters (for budgets given in epochs or tokens)
lr_decay_iters = 0        # 0 = max_iters
min_lr = 6e-5
# system
device = 'auto'           # auto = cuda > mps > cpu
dtype = 'auto'            # auto = bf16 where the hardware does it fast, fp16 on old GPUs, else fp32
compile = False           # torch.compile the model
fsdp = False              # with torchrun: shard parameters, grads and optimizer state (FSDP2, per block)
profile = False           # run a few steps under torch.profiler, write out_dir/trace.json, exit
seed = 1337
# -----------------------------------------------------------------------------
globals().update({f.name: f.default for f in fields(GPTConfig) if f.name not in globals()})
defaults = {k: v for k, v in globals().items() if not k.startswith('_')}
config = configure(globals())
check_ranges(globals(), [
    ('optimizer', optimizer in ('adamw', 'sgd', 'muon'), 'adamw, sgd or muon'),
    ('muon_lr', muon_lr > 0, '> 0'), ('muon_momentum', 0 <= muon_momentum < 1, 'in [0, 1)'),
    ('max_epochs', max_epochs >= 0, '>= 0 (0 = use max_iters)'), ('momentum', 0 <= momentum < 1, 'in [0, 1)'),
    ('max_tokens', max_tokens >= 0 and not (max_tokens and max_epochs), '>= 0, and not with max_epochs'),
    ('batch_size', batch_size >= 1, '>= 1'), ('block_size', block_size >= 1, '>= 1'),
    ('max_iters', max_iters >= 0, '>= 0'), ('eval_interval', eval_interval >= 1, '>= 1'),
    ('log_interval', log_interval >= 1, '>= 1'), ('eval_iters', eval_iters >= 1, '>= 1'),
    ('gradient_accumulation_steps', gradient_accumulation_steps >= 1, '>= 1'),
    ('learning_rate', learning_rate > 0, '> 0'), ('min_lr', min_lr >= 0, '>= 0'),
    ('warmup_iters', warmup_iters >= 0, '>= 0'), ('warmup_frac', 0 <= warmup_frac < 1, 'in [0, 1)'),
    ('dropout', 0 <= dropout < 1, 'in [0, 1)'),
    ('weight_decay', weight_decay >= 0, '>= 0'), ('grad_clip', grad_clip >= 0, '>= 0 (0 = off)'),
    ('early_stop_patience', early_stop_patience >= 0, '>= 0 (0 = off)'),
    ('objective', objective in ('lm', 'dpo'), 'lm or dpo'), ('dpo_beta', dpo_beta > 0, '> 0'), ('dpo_nll', dpo_nll >= 0, '>= 0'),
])
dpo = objective == 'dpo'
check_ranges(globals(), [(k, not dpo or ok, f'{rule} with objective=dpo') for k, ok, rule in [
    ('init_from', init_from != 'scratch', 'a trained model (the frozen reference): an SFT run dir, a ckpt.pt or gpt2*'),
    ('fsdp', not fsdp, 'False (DDP only: the reference is not sharded)'), ('mask_loss', mask_loss, 'True'),
    ('n_soft_prompt', not n_soft_prompt, '0 (use lora_rank: the reference is the model with its adapters off)')]])


# distributed setup -------------------------------------------------------------
ddp = int(os.environ.get('RANK', -1)) != -1
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
if device.split(':')[0] not in ('cpu', 'cuda', 'mps'):
    die(f"device='{device}' is not supported: use auto, cpu, cuda, cuda:N or mps")
if device.startswith('cuda') and not torch.cuda.is_available() or device == 'mps' and not torch.backends.mps.is_available():
    die(f"device='{device}' is not available on this machine: use --device=auto or --device=cpu")
if ddp:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    rank, local_rank, world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else device
if device_type == 'cpu':
    keep_freed_cpu_memory()  # reuse freed blocks over 32 MB instead of page-faulting fresh ones every step

if dtype == 'auto':
    dtype = training_dtype(device_type)  # float32 e.g. on AVX2-only CPUs, where bf16 matmuls are emulated and slow
if dtype not in ('float32', 'bfloat16', 'float16'):
    die(f"dtype must be auto|float32|bfloat16|float16, got '{dtype}'")
config['device'], config['dtype'] = device, dtype  # record what 'auto' resolved to
ptdtype = getattr(torch, dtype)
# autocast: matmuls in low precision, master weights and optimizer state stay fp32
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))

if tokens_per_step > 0:
    per_round = batch_size * block_size * world_size  # one micro-batch on every process
    gradient_accumulation_steps = world_size * max(1, round(tokens_per_step / per_round))
if gradient_accumulation_steps % world_size:
    die(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the "
        f"{world_size} processes")
micro_steps = gradient_accumulation_steps // world_size  # per process

# The starting point. resume: this out_dir's run continues (weights, optimizer, schedule, data position).
# A finetune (another run's checkpoint, or GPT-2) takes only the weights: fresh optimizer, schedule and data.
# Either way the architecture (shapes, components) comes from the weights and runtime flags from this command line.
iter_num, best_val_loss, evals_without_improvement = 0, float('inf'), 0
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
checkpoint = ckpt_args = base_ref = None  # resume's checkpoint; the base's GPTConfig args; where its weights are
if init_from in GPT2_SIZES:
    base_ref = {'init_from': init_from, 'path': os.path.abspath(init_file) if init_file else None}
    if not init_file:
        import prepare
        try:
            base_ref['path'] = os.path.abspath(prepare.gpt2_weights_file(init_from))
        except prepare.PrepareError as e:
            die(f"{e} (or pass --init_file=PATH to a local {init_from} model.safetensors)")
    ckpt_args = gpt2_config(init_from)
elif init_from != 'scratch':
    path = ckpt_path if init_from == 'resume' else init_from if init_from.endswith('.pt') else \
        os.path.join(init_from, 'ckpt.pt')
    if not os.path.isfile(path):
        die(f"no checkpoint to resume from at {ckpt_path}; train with --init_from=scratch first" if init_from == 'resume'
            else f"no checkpoint at {path}; init_from is scratch, resume, a run directory, a ckpt.pt or gpt2*")
    try:
        loaded = torch.load(path, map_location='cpu', weights_only=True, mmap=True)  # a finetune reads only the
        ckpt_args = loaded['model_args']  # args here; load_base_state reads the weights when the model exists
    except Exception as e:
        die(f"cannot read checkpoint {path}: {type(e).__name__}: {e}")
    if init_from == 'resume':
        checkpoint, base_ref = loaded, loaded.get('adapter_base')  # a LoRA run's checkpoint: adapters + its base
    else:
        base_ref = {'init_from': init_from, 'path': os.path.abspath(path)}
    loaded = None
if ckpt_args is not None:
    ckpt_args = {f.name: ckpt_args.get(f.name, f.default) for f in fields(GPTConfig)}
    for k, v in ckpt_args.items():
        if k in RUNTIME_FLAGS or k == 'vocab_size':  # vocab_size: checked against the data below
            continue
        asked = config[k] != defaults[k]  # on the command line or in a config file
        if asked and init_from != 'resume' and (k.startswith('lora_') or k == 'n_soft_prompt' or
                                                 k == 'block_size' and config[k] < v):
            continue  # a finetune adds adapters or a soft prompt, or uses a shorter context (wpe is cropped)
        if asked and config[k] != v:
            die(f"--{k}={config[k]!r} differs from {k}={v!r} of {base_ref['path'] if base_ref else ckpt_path}: "
                f"the architecture comes with the weights (only {', '.join(RUNTIME_FLAGS)} may change)")
        globals()[k] = config[k] = v
    changed = [f"{k} {ckpt_args[k]!r} -> {config[k]!r}" for k in RUNTIME_FLAGS if config[k] != ckpt_args[k]]
    if changed and master:
        print(f"{init_from}: runtime flags from the command line: {', '.join(changed)}")
if checkpoint and checkpoint['config'].get('objective', 'lm') != objective:
    die(f"{ckpt_path} was trained with objective={checkpoint['config'].get('objective', 'lm')}: resume with it")
dpo_base = checkpoint.get('dpo_base') if checkpoint else base_ref  # dpo: where the reference's weights are
adapters = lora_rank > 0 or n_soft_prompt > 0  # LoRA / prompt tuning: the base is frozen, only these train
if adapters and init_from == 'scratch' and master:
    print("warning: lora_rank or n_soft_prompt with init_from=scratch trains adapters on frozen random weights; "
          "start from a trained model (init_from=DIR or gpt2)")

# data -------------------------------------------------------------------------
seq_len = block_size - n_soft_prompt  # tokens of a training window: a soft prompt takes the first positions
if seq_len < 1:
    die(f"n_soft_prompt={n_soft_prompt} leaves no room in block_size={block_size}")
data_dir = data_dir or os.path.join('data', dataset)
meta_path = os.path.join(data_dir, 'meta.json')
if not os.path.isfile(meta_path):
    die(f"dataset '{dataset}' is not prepared ({meta_path} missing); run: python prepare.py {dataset}")
try:
    with open(meta_path, encoding='utf-8') as f:
        meta = json.load(f)
    meta['vocab_size'], meta['dtype']  # the two fields training needs
except (ValueError, KeyError, TypeError) as e:
    die(f"{meta_path} is not a valid meta.json ({type(e).__name__}: {e}); re-run: python prepare.py {dataset}")
vocab_size = config['vocab_size'] = meta['vocab_size']  # the tokenizer decides the vocabulary
if dpo and 'pairs' not in meta:
    die(f"objective=dpo needs a pairs data dir (meta.json 'pairs'), {data_dir} is not one; write one with: "
        f"python sample.py --out_dir=SFT_RUN --write_pairs=data/NAME")
row_len = meta['pairs']['row_len'] if dpo else 0  # a pair = rows 2i (chosen) and 2i+1 (rejected) of row_len tokens
if dpo and seq_len < row_len - 1:
    die(f"block_size={block_size} is shorter than the pairs' rows: {data_dir} has row_len={row_len}, "
        f"so block_size must be >= {row_len - 1}")
if ckpt_args is not None and (vocab_size < ckpt_args['vocab_size'] or checkpoint and vocab_size != ckpt_args['vocab_size']):
    die(f"{data_dir} has vocab_size={vocab_size} but {base_ref['path'] if base_ref else ckpt_path} has "
        f"{ckpt_args['vocab_size']}: tokenize the data with the base model's tokenizer (python prepare.py NAME " +
        ("--tokenizer=gpt2)" if init_from in GPT2_SIZES else f"--tokenizer_from={init_from})"))
splits = {}
for split in ('train', 'val'):
    tokens = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.dtype(meta['dtype']), mode='r')
    mask_path = os.path.join(data_dir, f'{split}_mask.bin')
    has_mask = os.path.isfile(mask_path)
    mask = np.memmap(mask_path, dtype=np.uint8, mode='r') if has_mask and mask_loss else None
    if dpo and (mask is None or not len(tokens) or len(tokens) % (2 * row_len)):
        die(f"{split} split of {data_dir} is not pairs of rows of row_len={row_len} tokens with a {split}_mask.bin; "
            f"write it again with: python sample.py --out_dir=SFT_RUN --write_pairs={data_dir}")
    if not dpo and len(tokens) <= seq_len + 1:
        die(f"{split} split of '{dataset}' has {len(tokens)} tokens, fewer than the window+2="
            f"{seq_len + 2}; lower --block_size or use more data")
    splits[split] = (tokens, mask)
    if master:
        counted = f", {int(mask.sum()):,} counted by the loss mask" if mask is not None else \
            f", {split}_mask.bin ignored (mask_loss=False): every token counts" if has_mask else ""
        print(f"{split}: {len(tokens):,} tokens{counted}")
tokens_per_iter = gradient_accumulation_steps * batch_size * (2 * (row_len - 1) if dpo else seq_len)  # all processes
if max_epochs > 0:  # an epoch = the train tokens once, in global steps of tokens_per_iter
    iters_per_epoch = max(1, len(splits['train'][0]) // tokens_per_iter)
    max_iters = config['max_iters'] = math.ceil(max_epochs * iters_per_epoch)
    if evals_per_epoch > 0:
        eval_interval = config['eval_interval'] = max(1, iters_per_epoch // evals_per_epoch)
    if master:
        print(f"{max_epochs:g} epoch(s) of {iters_per_epoch} iterations: max_iters={max_iters}, eval_interval={eval_interval}")
if max_tokens > 0:
    max_iters = config['max_iters'] = math.ceil(max_tokens / tokens_per_iter)
lr_decay_iters = lr_decay_iters or max_iters
if warmup_frac > 0:
    warmup_iters = config['warmup_iters'] = round(warmup_frac * max_iters)
if int(splits['val'][0][:100_000].max()) >= vocab_size:
    die(f"token ids in {data_dir} exceed vocab_size={vocab_size}; re-run prepare.py")


def get_batch(split, ix, n=seq_len):
    """Windows of n tokens starting at offsets ix -> (x, y, loss_mask or None) on the device."""
    tokens, mask = splits[split]
    x = torch.stack([torch.from_numpy(tokens[i:i + n].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + n].astype(np.int64)) for i in ix])
    m = None  # mask[i+1] says whether target token i+1 counts
    if mask is not None:
        m = torch.stack([torch.from_numpy(mask[i + 1:i + 1 + n].astype(np.float32)) for i in ix])
    if device_type == 'cuda':  # pinned host memory: the copies run asynchronously
        return tuple(t if t is None else t.pin_memory().to(device, non_blocking=True) for t in (x, y, m))
    return tuple(t if t is None else t.to(device) for t in (x, y, m))


def num_starts(split):
    """What a batch draws from: window offsets, or pair indices for dpo."""
    return len(splits[split][0]) // (2 * row_len) if dpo else len(splits[split][0]) - seq_len - 1


# One generator for the data, identical on every rank: each step draws the offsets (dpo: pairs) of the whole
# global batch and a rank takes its slice, so N processes see exactly the batches 1 process sees,
# and its state in the checkpoint is the data position for an exact resume.
data_gen = torch.Generator().manual_seed(seed)


def draw_offsets():
    ix = torch.randint(num_starts('train'), (gradient_accumulation_steps, batch_size), generator=data_gen)
    return ix[rank * micro_steps:(rank + 1) * micro_steps].tolist()


# model ------------------------------------------------------------------------
model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}
torch.manual_seed(seed)  # the same initial weights on every rank (FSDP shards them as they are)
try:
    model = GPT(GPTConfig(**model_args))
except (ValueError, AssertionError, TypeError) as e:
    die(f"bad model config: {e}")
torch.manual_seed(seed + rank)  # dropout masks differ per rank; data sampling has its own generator
if init_from != 'scratch':  # the weights: resumed (full, or a LoRA run's adapters on its base), or a finetune's base
    state = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()} if checkpoint else {}
    try:
        if base_ref:
            state = {**load_base_state(base_ref, vocab_size, block_size), **state}
        if vocab_size > ckpt_args['vocab_size'] and master:
            print(f"vocabulary grown from {ckpt_args['vocab_size']} to {vocab_size}: new rows start at the mean embedding")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - set(model.adapter_parameters()):  # a finetune's new adapters are missing
            raise ValueError(f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    except Exception as e:
        die(f"cannot load the weights of {base_ref['path'] if base_ref else ckpt_path}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}")
    state = None
    if n_soft_prompt and init_from != 'resume':
        model.init_soft_prompt()  # from the loaded vocabulary's embeddings (Lester et al. 2021), not the random init's
if adapters:
    model.mark_only_adapters_trainable()
if master:
    print(f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters" +
          (f" (LoRA rank {lora_rank} on {lora_targets})" if lora_rank else "") +
          (f" (soft prompt of {n_soft_prompt} tokens)" if n_soft_prompt else ""))
model.to(device)
if fsdp:  # FSDP2 (fully_shard): each block's parameters live in 1/world_size shards, gathered for its forward
    if not ddp:
        die("fsdp=True needs several processes: torchrun --nproc_per_node=N train.py ... --fsdp=True")
    if dtype == 'float16':
        die("fsdp=True with float16 needs a sharded GradScaler: use --dtype=bfloat16 or float32")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)  # the rest: embeddings, final norm, head
if master:
    print(f"device {device}, dtype {dtype}, {world_size} process(es), {micro_steps} micro-step(s) of "
          f"{batch_size}x{seq_len} tokens per process per step")
    print(f"parameters: {model.num_params():,} (non-embedding), active per token: "
          f"{model.num_active_params():,}")


def newton_schulz(g, steps=5, dtype=torch.bfloat16):
    """The nearest semi-orthogonal matrix to g, approximately (U S' V^T with S' in about [0.5, 1.5]): the quintic
    Newton-Schulz iteration of Muon with its coefficients (Jordan et al. 2024; REFERENCE §8.2)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(-2) > g.size(-1)  # iterate on the wide orientation: the Gram matrix x x^T is the small one
    x = (g.mT if tall else g).to(dtype, memory_format=torch.contiguous_format)  # contiguous: products of views are slow
    x = x.reshape(-1, *x.shape[-2:])  # (stack, rows, cols): same-shape matrices run as one batched product
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    if x.dtype == torch.float32 and x.size(-1) >= 2 * x.size(-2):
        # The same iteration on the small side: x_k = q_k x_0, so m_k = q_k s q_k^T with s = x_0 x_0^T and
        # q_k+1 = (a + b m_k + c m_k^2) q_k. Rows x rows products, then one q x_0: ~40% fewer FLOPs at 4x wide
        # (128x512: 25 -> 17 ms per step on a 2-core AVX2 CPU). fp32 only: q grows like 1 / (x_0's smallest
        # singular value), which bf16's 8 bits cannot carry.
        s, q = torch.bmm(x, x.mT), None
        for _ in range(steps):
            m = s if q is None else torch.bmm(torch.bmm(q, s), q.mT)
            p = torch.baddbmm(m, m, m, beta=b, alpha=c)
            p.diagonal(dim1=-2, dim2=-1).add_(a)
            q = p if q is None else torch.bmm(p, q)
        x = torch.bmm(q, x)
    else:
        for _ in range(steps):  # x <- a x + (b m + c m^2) x with m = x x^T; baddbmm adds in the product's accumulator
            m = torch.bmm(x, x.mT)
            x = torch.baddbmm(x, torch.baddbmm(m, m, m, beta=b, alpha=c), x, beta=a)
    x = x.reshape((g.mT if tall else g).shape)
    return (x.mT if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups marked muon=True (2-D block matrices): Nesterov momentum, orthogonalised by
    newton_schulz, scaled by max(1, rows/cols)^0.5, decoupled weight decay; AdamW (as torch's) for the others."""

    def __init__(self, groups, lr, betas, eps, ns_dtype=torch.bfloat16):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, muon=False, momentum=0.95, ns_dtype=ns_dtype))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group['lr'], group['weight_decay']
            params = [p for p in group['params'] if p.grad is not None]
            if group['muon']:  # matrices of one shape up to a transpose are orthogonalised together (one batch)
                wide = lambda t: t.mT if t.size(0) > t.size(1) else t  # (m, n) and (n, m) both become (min, max)
                for shape in dict.fromkeys(wide(p).shape for p in params):
                    same = [p for p in params if wide(p).shape == shape]
                    bufs = [self.state[p].setdefault('momentum_buffer', torch.zeros_like(p)) for p in same]
                    torch._foreach_lerp_(bufs, [p.grad for p in same], 1 - group['momentum'])
                    nesterov = torch.stack([wide(p.grad.lerp(buf, group['momentum'])) for p, buf in zip(same, bufs)])
                    update = newton_schulz(nesterov, dtype=group['ns_dtype'])
                    for p, u in zip(same, update):
                        p.mul_(1 - lr * wd).add_(u if u.shape == p.shape else u.mT,
                                                 alpha=-lr * max(1, p.size(0) / p.size(1)) ** 0.5)
                continue
            for p in params:
                g, state = p.grad, self.state[p]
                p.mul_(1 - lr * wd)
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state['step'] += 1  # a Python int: no host sync per parameter
                (b1, b2), t = group['betas'], state['step']
                state['exp_avg'].lerp_(g, 1 - b1)
                state['exp_avg_sq'].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (state['exp_avg_sq'] / (1 - b2 ** t)).sqrt_().add_(group['eps'])
                p.addcdiv_(state['exp_avg'], denom, value=-lr / (1 - b1 ** t))


# optimizer: decay matrices (weights of Linear layers), not biases/norm gains/embeddings
param_dict = {n: p for n, p in model.named_parameters() if p.requires_grad}
is_embedding = lambda n: n.startswith(('transformer.wte.', 'transformer.wpe.'))
decay = [p for n, p in param_dict.items() if p.dim() >= 2 and (decay_embeddings or not is_embedding(n))
         and 'lora_' not in n and 'soft_prompt' not in n]  # adapters: no decay (it would pull them to 0)
decay_ids = {id(p) for p in decay}
no_decay = [p for p in param_dict.values() if id(p) not in decay_ids]
groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
# fused=True: one kernel over all parameters, on CUDA and on CPU (2-core CPU, baby GPT: AdamW 6 ms vs foreach's 34)
if optimizer == 'sgd':  # the key's string becomes the optimizer object here
    optimizer = torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, nesterov=False, fused=True)
elif optimizer == 'muon':
    if fsdp:
        die("optimizer=muon orthogonalises whole matrices, and fsdp=True shards them: use DDP (no --fsdp) or adamw")
    in_blocks = {id(p) for n, p in param_dict.items() if n.startswith('transformer.h.') and p.dim() == 2}
    groups = [dict(params=[p for p in decay if id(p) in in_blocks], muon=True, lr_scale=muon_lr / learning_rate,
                   momentum=muon_momentum, weight_decay=weight_decay * learning_rate / muon_lr),  # lr*wd as AdamW's
              dict(params=[p for p in decay if id(p) not in in_blocks], weight_decay=weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    if not compile:  # torch.optim imports torch._dynamo (~2 s on a laptop CPU) the first time an Optimizer method
        # runs, only to keep torch.compile out of it; nothing here is compiled, so skip that (short runs feel it)
        for f in (torch.optim.Optimizer.add_param_group, torch.optim.Optimizer.zero_grad,
                  torch.optim.Optimizer.state_dict, torch.optim.Optimizer.load_state_dict):
            if hasattr(f, '__wrapped__'):  # torch._compile._disable_dynamo's wrapper reads this attribute
                setattr(f.__wrapped__, '__dynamo_disable', f.__wrapped__)
    optimizer = MuonAdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps,
                          ns_dtype=torch.bfloat16 if device_type == 'cuda' or cpu_has_fast_bf16() else torch.float32)
else:
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps, fused=True)
if checkpoint is not None:
    if checkpoint['config'].get('optimizer', 'adamw') != config['optimizer']:
        die(f"{ckpt_path} was trained with optimizer={checkpoint['config'].get('optimizer', 'adamw')}: resume with it")
    if checkpoint.get('fsdp', False) != fsdp:  # FSDP saves optimizer state by parameter name, the others by index
        die(f"{ckpt_path} was written with fsdp={checkpoint.get('fsdp', False)}: resume with the same --fsdp")
    if fsdp:
        set_optimizer_state_dict(model, optimizer, checkpoint['optimizer'],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    evals_without_improvement = checkpoint.get('evals_without_improvement', 0)
    data_gen.set_state(checkpoint['data_rng'])
    cpu_rng, cuda_rng = checkpoint['cpu_rng'], checkpoint.get('cuda_rng')  # restored just before the loop
    if master:
        print(f"resumed from {ckpt_path} at iter {iter_num}")
checkpoint = None  # free memory

# DPO's reference: the starting weights, frozen (REFERENCE §16.4). With LoRA the model itself with its adapters off,
# no second copy; else a copy made before training, its weights re-loaded from the base when resuming.
ref_model = copy.deepcopy(model).eval().requires_grad_(False) if dpo and not lora_rank else None
if ref_model and init_from == 'resume':
    ref_model.load_state_dict(load_base_state(dpo_base, vocab_size, block_size))
if dpo and master:
    print(f"dpo: beta {dpo_beta}, reference = {dpo_base['path']} ({'adapters off' if lora_rank else 'frozen copy'})")

raw_model = model  # the unwrapped model: what we save and what exposes helpers
if compile:
    model = torch.compile(model)
if ddp and not fsdp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def get_lr(it):
    """Linear warmup from lr/warmup (never 0) to lr, then cosine down to min_lr."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def get_dropout(it):
    """dropout_schedule=(initial, final, at): `initial` before at*max_iters, `final` after."""
    if not dropout_schedule:
        return model_args['dropout']
    initial, final, at = dropout_schedule
    return initial if it < at * max_iters else final


def sequence_logprobs(net, x, y, m):
    """log p(response | prompt) per row: log-softmax (fp32) of each target, summed over the counted ones."""
    logits, _ = net(x)
    return (torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1) * m).sum(-1)


def dpo_loss(net, split, ix):
    """DPO (Rafailov et al. 2023; REFERENCE §16.4) on the pairs ix: rewards r = beta (log pi - log ref), loss
    -log sigmoid(r_w - r_l); the reference runs without grad and in eval mode (no dropout). Returns the loss (+ the
    MoE terms when training, as GPT.forward adds them) and [accuracy (r_w > r_l), margin r_w - r_l, r_w, r_l]."""
    rows = [r * row_len for i in ix for r in (2 * i, 2 * i + 1)]  # chosen, rejected, chosen, ...
    x, y, m = get_batch(split, rows, row_len - 1)
    training = raw_model.training
    with torch.no_grad(), nullcontext() if ref_model else raw_model.lora_disabled():
        ref = sequence_logprobs(ref_model or raw_model.eval(), x, y, m)
    raw_model.train(training)
    policy = sequence_logprobs(net, x, y, m)  # after the reference: MoE stats are the policy's
    r = dpo_beta * (policy - ref)
    margin = r[0::2] - r[1::2]
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    if dpo_nll:  # DPO alone can lower both log-probs; the chosen NLL holds them up (IRPO, Pang et al. 2024)
        loss = loss - dpo_nll * (policy[0::2] / m[0::2].sum(-1).clamp(min=1)).mean()
    if (moe := raw_model.moe_layers) and raw_model.training:
        loss = loss + raw_model.moe_aux_coef * torch.stack([b.aux_loss for b in moe]).mean() + \
            raw_model.moe_z_coef * torch.stack([b.z_loss for b in moe]).mean()
    return loss, torch.stack([(margin > 0).float().mean(), margin.mean(), r[0::2].mean(), r[1::2].mean()]).detach()


@torch.no_grad()
def estimate_loss():
    """Mean cross-entropy (dpo: DPO loss) per split over eval_iters fixed batches, shared out across ranks; MoE aux
    terms and DPO's statistics are averaged beside it ('val_moe_aux', 'val_dpo_acc', ...), never into it. Under FSDP
    every forward is collective (it gathers the shards), so every rank runs the same number of batches: the padding
    ones are not counted."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        gen = torch.Generator().manual_seed(seed + 1)  # the same batches at every eval
        total = torch.zeros(2 + len(aux_names) + len(dpo_names), device=device)  # sum of losses, batches, the rest
        for k in range(-(-eval_iters // world_size) * world_size if fsdp else eval_iters):
            ix = torch.randint(num_starts(split), (batch_size,), generator=gen).tolist()
            if k % world_size != rank:
                continue
            with ctx:
                loss, stats = dpo_loss(raw_model, split, ix) if dpo else (raw_model(*get_batch(split, ix))[1], [])
            if k < eval_iters:
                aux = [raw_model.aux_losses[n].float() for n in aux_names]
                total += torch.stack([loss.float(), torch.ones((), device=device), *aux, *stats])
        if ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
        out.update({f'{split}_{n}': (total[2 + i] / total[1]).item() for i, n in enumerate(aux_names + dpo_names)})
    model.train()
    return out


def checkpoint_state():
    """What a checkpoint holds besides counters: full model and optimizer state (FSDP gathers the shards) and
    every rank's RNG states. Collective: every rank calls it, rank 0 saves."""
    if fsdp:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = dict(model=get_model_state_dict(raw_model, options=opts),
                     optimizer=get_optimizer_state_dict(raw_model, optimizer, options=opts))
    else:
        state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict())
    if adapters and base_ref:  # megabytes, not the model: the adapters and where their frozen base is
        state.update(model={k: state['model'][k] for k in raw_model.adapter_parameters()}, adapter_base=base_ref)
    if dpo:
        state['dpo_base'] = dpo_base  # the reference's weights
    return dict(state, fsdp=fsdp, **all_rng_states())


def all_rng_states():
    """Every rank's RNG states as (world_size, n) uint8 tensors: dropout differs per rank, so an exact resume
    gives each rank its own stream back. Collective: every rank must call it."""
    states = {'cpu_rng': torch.get_rng_state()}
    if device_type == 'cuda':
        states['cuda_rng'] = torch.cuda.get_rng_state()
    for k, s in states.items():
        parts = [s]
        if ddp:
            parts = [torch.empty_like(s, device=device) for _ in range(world_size)]
            dist.all_gather(parts, s.to(device))
        states[k] = torch.stack(parts).cpu()
    return states


def save_checkpoint(path, state):
    ckpt = {
        **state, 'scaler': scaler.state_dict(),
        'model_args': model_args, 'config': config, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
        'evals_without_improvement': evals_without_improvement, 'data_rng': data_gen.get_state(),
    }
    torch.save(ckpt, path + '.tmp')
    os.replace(path + '.tmp', path)  # atomic: a crash never leaves half a checkpoint


def shutdown(code=0):
    """End the run with exit code `code` (distributed: on every rank, together). Cause of the SIGABRT this avoids:
    a gloo worker thread frees each collective's Work after waking the caller, and a Work may hold tensors that are
    Python objects (the RNG all_gather, loss all_reduces, FSDP's gathers); freeing those takes the GIL. If the main
    thread has begun interpreter shutdown by then, the worker asking for the GIL is ended by pthread_exit inside a
    noexcept destructor: std::terminate ("terminate called without an active exception"). Neither a barrier (its
    Work keeps the earlier Works alive and frees them the same way) nor destroy_process_group (DDP keeps the group
    alive, so its workers are not joined) closes that window; so a distributed rank, once every rank is here and
    the output is flushed, leaves without interpreter shutdown (os._exit): nothing of the run is left unwritten."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if master:
    os.makedirs(out_dir, exist_ok=True)
    print("config:", json.dumps(config, default=str))
    save_json(config, os.path.join(out_dir, 'config.json'))
    log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a' if init_from == 'resume' else 'w')
flops_per_iter = raw_model.flops_per_token() * tokens_per_iter / world_size  # per device: MFU is per device
peak = peak_flops(device, ptdtype) if master else None  # of one device, in the training dtype
bytes_per_token = meta.get('bytes_per_token') or 0  # of the tokens the loss counts (prepare.py)
aux_names = ['moe_aux', 'moe_z'] if raw_model.moe_layers else []
dpo_names = ['dpo_acc', 'dpo_margin', 'dpo_chosen', 'dpo_rejected'] if dpo else []  # chosen/rejected: mean rewards


def log(record):
    if master:
        log_file.write(json.dumps(record) + '\n')
        log_file.flush()


# training loop ----------------------------------------------------------------
prof = None
if profile:
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    prof = torch_profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3), record_shapes=True,
                         profile_memory=True, with_stack=True)
    prof.start()
    max_iters = iter_num + 5
if init_from == 'resume':  # dropout masks continue exactly where the stopped run left them, on every rank
    if cpu_rng.size(0) == world_size:  # (world_size, n): one row per rank
        torch.set_rng_state(cpu_rng[rank].clone())  # its own tensor: a row view fails ("Invalid mt19937 state")
        if device_type == 'cuda' and cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng[rank].clone())
    elif master:  # e.g. resumed on a different number of GPUs: data order stays exact, dropout masks do not
        print(f"note: checkpoint has RNG states of {cpu_rng.size(0)} process(es), this run has {world_size}: "
              f"dropout streams start fresh (seed {seed} + rank)")
t0, t_start, mfu = time.time(), time.time(), None
current_dropout = None
resumed_at = iter_num if init_from == 'resume' and not eval_only else None  # evaluated by the run that saved it
saved_at = resumed_at  # iteration of the checkpoint in ckpt_path
while True:
    lr = get_lr(iter_num)
    for g in optimizer.param_groups:
        g['lr'] = lr * g.get('lr_scale', 1.0)
    if (p := get_dropout(iter_num)) != current_dropout:
        current_dropout = p
        raw_model.set_dropout(p)
        if master and dropout_schedule:
            print(f"iter {iter_num}: dropout -> {current_dropout}")

    if ((iter_num % eval_interval == 0 and (iter_num > 0 or eval_first)) or iter_num == max_iters or eval_only) \
            and not profile and iter_num != resumed_at:
        losses = estimate_loss()
        val_bpb = losses['val'] / math.log(2) / bytes_per_token if bytes_per_token and not dpo else None
        val_ppl = None if dpo else math.exp(min(losses['val'], 50))  # neither means anything for DPO's loss
        improved = losses['val'] < best_val_loss
        if improved:
            best_val_loss, evals_without_improvement = losses['val'], 0
        elif iter_num > 0:
            evals_without_improvement += 1
        saving = iter_num > 0 and not eval_only and (improved or always_save_checkpoint)
        state = checkpoint_state() if saving else None  # gathered on every rank, saved by rank 0
        if master:
            more = f", val dpo acc {losses['val_dpo_acc']:.3f}, margin {losses['val_dpo_margin']:.4f}" if dpo else \
                f", val ppl {val_ppl:.2f}" + (f", val bpb {val_bpb:.4f}" if val_bpb else "")
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{more}")
            log({'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'],
                 'val_ppl': val_ppl, 'val_bpb': val_bpb, 'lr': lr,
                 'dropout': current_dropout, 'time': time.time() - t_start,
                 **{k: v for k, v in losses.items() if k not in ('train', 'val')},
                 'moe_load': [s['load'] for s in raw_model.moe_stats()]})
            if saving:
                save_checkpoint(ckpt_path, state)
                saved_at = iter_num
                if improved and always_save_checkpoint:
                    save_checkpoint(os.path.join(out_dir, 'best.pt'), state)
        if eval_only:
            break
        if early_stop_patience and evals_without_improvement >= early_stop_patience:
            if master:
                print(f"early stop: val loss has not improved for {early_stop_patience} evals")
            break
    if iter_num >= max_iters:
        break

    # one optimizer step: micro_steps forward/backward passes, gradients synced on the last one
    offsets = draw_offsets()
    loss_sum, dpo_sum = torch.zeros((), device=device), torch.zeros(len(dpo_names), device=device)
    for micro_step in range(micro_steps):
        if fsdp:
            model.set_requires_gradient_sync(micro_step == micro_steps - 1)
        elif ddp:
            model.require_backward_grad_sync = micro_step == micro_steps - 1
        with ctx:
            if dpo:
                loss, stats = dpo_loss(model, 'train', offsets[micro_step])
                dpo_sum += stats / micro_steps
            else:
                x, y, m = get_batch('train', offsets[micro_step])
                _, loss = model(x, y, loss_mask=m, label_smoothing=label_smoothing)
            loss = loss / gradient_accumulation_steps * world_size  # DDP and FSDP average over ranks
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)  # (a no-op without fp16) the norm and the clipping see the true gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm  # FSDP: a DTensor
    local_loss, grad_norm = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()  # one host sync per step
    # A diverged step never reaches the weights, so the last checkpoint stays good. The grad norm is the same on
    # every rank (gradients are all-reduced), so every rank stops together. fp16's GradScaler skips inf/NaN
    # gradients by design (it lowers the scale): there only a non-finite loss counts.
    if not math.isfinite(local_loss) or not math.isfinite(grad_norm) and dtype != 'float16':
        kept = f"{ckpt_path} (iter {saved_at}) is the last good checkpoint" if saved_at else "no checkpoint written"
        print(f"error: training diverged at iter {iter_num + 1}: loss {local_loss:.4g}, grad norm "
              f"{grad_norm:.4g}; {kept}: lower learning_rate, raise warmup_iters, or set grad_clip", file=sys.stderr)
        log({'iter': iter_num + 1, 'diverged': True, 'loss': local_loss, 'grad_norm': grad_norm})
        shutdown(3)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if prof is not None:
        prof.step()

    if device_type == 'cuda':
        torch.cuda.synchronize()  # kernels run asynchronously: the step ends when they do
    t1 = time.time()
    dt, t0 = t1 - t0, t1
    iter_num += 1
    if iter_num % log_interval == 0:
        sums = torch.cat([loss_sum[None], dpo_sum])
        if ddp:
            dist.all_reduce(sums)  # gloo has no AVG
        lossf, *dpo_means = (sums / world_size).tolist()
        dpo_stats = dict(zip(dpo_names, dpo_means))
        if master:
            tok_s = tokens_per_iter / dt
            mfu = flops_per_iter / dt / peak if iter_num > 1 else None  # step 1 includes warm-up: no measurement
            aux = ''.join(f", {k} {float(v):.4f}" for k, v in {**raw_model.aux_losses, **dpo_stats}.items())
            print(f"iter {iter_num}: loss {lossf:.4f}{aux}, grad norm {grad_norm:.3f}, lr {lr:.2e}, "
                  f"{dt * 1000:.1f} ms, {tok_s:,.0f} tok/s, mfu " + ('-' if mfu is None else f"{mfu * 100:.2f}%"))
            log({'iter': iter_num, 'loss': lossf, 'grad_norm': grad_norm, 'lr': lr, 'dropout': current_dropout,
                 'ms': dt * 1000, 'tok_s': tok_s, 'mfu': mfu, 'peak_flops': peak, 'time': t1 - t_start,
                 **{k: float(v) for k, v in raw_model.aux_losses.items()}, **dpo_stats})

if prof is not None:
    prof.stop()
    if master:
        prof.export_chrome_trace(os.path.join(out_dir, 'trace.json'))
        sort = 'cuda_time_total' if device_type == 'cuda' else 'cpu_time_total'
        print(prof.key_averages().table(sort_by=sort, row_limit=20))
if master:
    print(f"done: {iter_num} iters in {time.time() - t_start:.1f}s, best val loss {best_val_loss:.4f}")
    log_file.close()
shutdown()
