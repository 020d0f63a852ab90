"""GPT language model in one file: the classic GPT-2 by default, every modern component one GPTConfig flag.
Where things live (search for the name): positions `sinusoidal_embedding`, `apply_rope` / `rope_frequencies`
(linear, ntk, dynamic, yarn), `alibi_bias`; masks `attn_inputs`; attention (MHA/GQA/MQA, MLA, manual vs
SDPA) `CausalSelfAttention`; `Norm`; `MLP` (gelu, gelu_tanh, relu2, swiglu); `MoE`; init, loss, softcap,
counts and FLOP/KV estimates in `GPT`; KV caches at the end. Formulas: ../shared/REFERENCE.md.
LoRA (lora_* flags): `LoRALinear` made by `linear`; GPT.mark_only_lora_trainable, lora_state_dict, merge_lora.
Soft prompt (n_soft_prompt): prepended in GPT.forward; GPT.init_soft_prompt, adapter_state_dict.
"""
import contextlib
import ctypes
import functools
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# Config: every flag of DESIGN.md; the defaults are the classic GPT-2 components.

@dataclass
class GPTConfig:
    block_size: int = 1024        # training context; also the "original length" for RoPE scaling
    vocab_size: int = 50304       # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = None         # None -> n_head (MHA); fewer = GQA, 1 = MQA (Ainslie et al. 2023)
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True             # biases in Linears and LayerNorms (GPT-2 style)
    pos_emb: str = 'learned'      # learned | sinusoidal | rope | alibi | none
    rope_base: float = 10000.0
    rope_scaling: str = 'none'    # none | linear (PI) | ntk | dynamic | yarn
    rope_factor: float = 1.0      # context extension factor s for rope_scaling
    attn_impl: str = 'sdpa'       # sdpa | manual (the formula by hand, same masks, same outputs)
    attn_type: str = 'mha'        # mha (incl. GQA/MQA) | mla (DeepSeek-V2 multi-head latent attention)
    mla_q_rank: int = 0           # 0 = plain q projection (V2-Lite); >0 = low-rank q
    mla_kv_rank: int = 0          # latent size cached per token; 0 -> 4*head_dim
    mla_rope_dim: int = 0         # decoupled RoPE key dims shared by all heads; 0 -> head_dim//2
    sliding_window: int = 0       # 0 = off; W = keys attended incl. self (Mistral; gpt-oss convention)
    attn_sinks: int = 0           # 0 = off; first S tokens always attendable (StreamingLLM)
    qk_norm: bool = False         # RMS-normalise q and k per head (after RoPE; no weights)
    norm: str = 'layernorm'       # layernorm | rmsnorm | rmsnorm_noparam
    emb_norm: bool = False        # normalise right after the token embedding (nanochat)
    mlp: str = 'gelu'             # gelu | gelu_tanh | relu2 | swiglu
    mlp_ratio: float = 4.0
    n_experts: int = 0            # 0 = dense MLP; >0 = MoE with this many routed experts
    n_shared_experts: int = 0     # always-on experts (DeepSeekMoE)
    moe_top_k: int = 2
    moe_aux_coef: float = 0.01    # Switch load-balancing loss coefficient
    moe_z_coef: float = 0.001     # ST-MoE router z-loss coefficient
    moe_capacity: float = 0.0     # capacity factor; 0 = no token dropping
    tie_weights: bool = True      # share wte and lm_head (Press & Wolf 2017; GPT-2)
    logit_softcap: float = 0.0    # 0 = off; cap*tanh(logits/cap) in fp32 (Gemma 2, nanochat uses 15)
    zero_init: bool = False       # zero c_proj of attn/MLP and the untied lm_head (nanochat, modded-nanogpt)
    init_std: float = 0.02        # N(0, init_std) for Linear/Embedding (GPT-2)
    init_scheme: str = 'gpt2'     # gpt2 (N(0, init_std), residual projections / sqrt(2 n_layer)) | kaiming (He)
    norm_position: str = 'pre'    # pre: x + f(LN(x)) (GPT-2) | post: LN(x + f(x)) (Vaswani et al. 2017)
    grad_checkpoint: bool = False # recompute each block in backward (activation checkpointing)
    lora_rank: int = 0            # 0 = off; r > 0 = LoRA adapters of rank r on lora_targets (Hu et al. 2021)
    lora_alpha: float = 16.0      # adapter output scaled by lora_alpha / lora_rank (alpha = 2r at the common r = 8)
    lora_dropout: float = 0.0     # dropout on the adapters' input only
    lora_targets: str = 'attn_in,attn_out'  # comma-separated subset of LORA_TARGETS
    n_soft_prompt: int = 0        # 0 = off; k > 0 learned embeddings before every sequence (Lester et al. 2021)

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError(msg)
        for name, choices in [('pos_emb', 'learned sinusoidal rope alibi none'), ('attn_impl', 'sdpa manual'),
                              ('attn_type', 'mha mla'), ('rope_scaling', 'none linear ntk dynamic yarn'),
                              ('norm', 'layernorm rmsnorm rmsnorm_noparam'), ('mlp', 'gelu gelu_tanh relu2 swiglu'),
                              ('init_scheme', 'gpt2 kaiming'), ('norm_position', 'pre post')]:
            check(getattr(self, name) in choices.split(), f"{name}={getattr(self, name)!r}: choose one of {choices.split()}")
        check(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        check(self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        self.mla_kv_rank = self.mla_kv_rank or 4 * self.head_dim
        self.mla_rope_dim = self.mla_rope_dim or max(2, self.head_dim // 2)
        check(self.pos_emb != 'rope' or self.rope_dim % 2 == 0,
              f"RoPE needs an even rotary dim, got {self.rope_dim}")
        check(self.n_experts == 0 or 1 <= self.moe_top_k <= self.n_experts,
              f"moe_top_k={self.moe_top_k} must be in [1, n_experts={self.n_experts}]")
        targets = [t.strip() for t in self.lora_targets.split(',') if t.strip()]
        for t in targets:
            check(t in LORA_TARGETS, f"lora_targets: unknown target {t!r}; choose from {list(LORA_TARGETS)}")
        check(self.lora_rank == 0 or (self.lora_rank > 0 and targets),
              f"lora_rank={self.lora_rank}: 0 = off, or r > 0 with at least one lora_targets of {list(LORA_TARGETS)}")
        self.lora_targets = ','.join(targets)
        check(self.n_soft_prompt >= 0, f"n_soft_prompt={self.n_soft_prompt}: 0 = off, or k > 0 soft tokens")

    @property
    def head_dim(self):  # per attention head (q, k, v; MLA's no-RoPE part of q/k and its v)
        return self.n_embd // self.n_head

    @property
    def rope_dim(self):  # dims RoPE rotates: MLA's decoupled key/query part, else the whole head
        return self.mla_rope_dim if self.attn_type == 'mla' else self.head_dim


# LoRA targets: attention inputs (c_attn; MLA wq | wq_a,wq_b and wkv_a,wkv_b), attention c_proj, MLP c_fc, MLP c_proj
# (MoE routed and shared experts included; never the router or lm_head)
LORA_TARGETS = ('attn_in', 'attn_out', 'mlp_in', 'mlp_out')

# Flags that change what the model computes but no parameter shape, and what may change them later:
# a resumed run takes RUNTIME_FLAGS from its command line (the rest of the architecture comes from the
# checkpoint); sample.py and bench.py may override INFERENCE_FLAGS on a trained checkpoint (context extension,
# streaming with sinks, the attention kernel).
RUNTIME_FLAGS = ('dropout', 'grad_checkpoint', 'attn_impl', 'moe_aux_coef', 'moe_z_coef', 'moe_capacity',
                 'lora_dropout')
INFERENCE_FLAGS = ('rope_scaling', 'rope_factor', 'sliding_window', 'attn_sinks', 'attn_impl')


# -----------------------------------------------------------------------------
# Positions: sinusoidal, RoPE (+ context-extension scalings), ALiBi

def sinusoidal_embedding(pos, dim):
    """Vaswani et al. 2017 §3.5: PE(p,2i) = sin(p/10000^(2i/d)), PE(p,2i+1) = cos(...), interleaved."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    ang = pos[..., None].float() * inv_freq
    return torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2)


def rope_frequencies(dim, base, scaling='none', factor=1.0, orig_len=2048, seq_len=0):
    """Inverse frequencies theta_i = base^(-2i/d) of RoPE (Su et al.) and the attention factor that
    multiplies cos and sin, for each context-extension method (formulas as in HF modeling_rope_utils)."""
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    inv_freq = base ** (-i / dim)
    mscale = 1.0
    if scaling == 'linear':  # Position Interpolation (Chen et al. 2023): positions m/s
        inv_freq = inv_freq / factor
    elif scaling == 'ntk':  # NTK-aware: base' = base * s^(d/(d-2))
        inv_freq = (base * factor ** (dim / (dim - 2))) ** (-i / dim)
    elif scaling == 'dynamic' and seq_len > orig_len:  # dynamic NTK: base' = base*((s*L'/L) - (s-1))^(d/(d-2))
        inv_freq = (base * (factor * seq_len / orig_len - (factor - 1)) ** (dim / (dim - 2))) ** (-i / dim)
    elif scaling == 'yarn':  # YaRN (Peng et al. 2023), beta_fast=32, beta_slow=1
        def pair_index(rotations):  # pair whose wavelength fits `rotations` turns in orig_len
            return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(pair_index(32)), 0)
        high = min(math.ceil(pair_index(1)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 0.001)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)  # ramp 0: keep (extrapolate), 1: interpolate
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0  # sqrt(1/t), applied to cos and sin
    return inv_freq.float(), mscale


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) of the last dim (rotate-half, GPT-NeoX/Llama convention).
    x (B, H, T, d); cos, sin (B|1, 1, T, d/2) in fp32 (bf16 cannot hold positions > 256 exactly)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def alibi_slopes(n_head):
    """Press et al. 2022: m_k = 2^(-8k/n) for n a power of 2; otherwise the slopes of the closest lower
    power of 2 followed by every other slope of the next power of 2 (reference implementation)."""
    def power_of_2(n):
        return [2 ** (-8 * (k + 1) / n) for k in range(n)]
    c = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(power_of_2(c) + power_of_2(2 * c)[0::2][:n_head - c])


def alibi_bias(slopes, qpos, kpos):
    """-m_h * (i - j), built in fp32 from relative distances. qpos (B|1, T), kpos (B|1, S) -> (B|1, H, T, S)."""
    dist = (qpos[:, None, :, None] - kpos[:, None, None, :]).float()
    return -slopes.to(dist.device)[None, :, None, None] * dist


# -----------------------------------------------------------------------------
# Building blocks: LoRA linear, norm, attention, MLP, MoE, block

FAST_CPU_DROPOUT = True  # keep_mask / cpu_dropout_attention; False: F.dropout and SDPA (its math path with dropout: nanoGPT)


ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # 1.0 as a 16-bit float's bit pattern


def keep_mask(shape, p, dtype):
    """Bernoulli(1 - p) keep mask as 0/1 in `dtype`, and its 1/(1-p) scale; p is rounded to a multiple of 2^-16.
    On CPU, Tensor.bernoulli_ makes one generator call per element, and even 64-bit draws of torch's mt19937 cost
    ~3x numpy's PCG64DXSM. So: one draw of torch's generator seeds a PCG64DXSM stream (torch.manual_seed and the
    checkpointed RNG state still govern every mask), four 16-bit lanes of each 64-bit word are compared in place, and
    a 16-bit float mask is written as the bit pattern of 1.0 (no bool -> dtype pass; a bool mask times a bf16 tensor
    would also pay a conversion per use)."""
    n, thr = math.prod(shape), round(p * 65536)
    seed = torch.empty((), dtype=torch.int64).random_().item()
    lanes = torch.from_numpy(np.random.PCG64DXSM(seed).random_raw((n + 3) // 4).view(np.int16)[:n])
    keep = lanes.ge_(thr - 32768)  # int16 0/1
    keep = keep.mul_(ONE_BITS[dtype]).view(dtype) if dtype in ONE_BITS else keep.to(dtype)
    return keep.view(shape), 65536 / (65536 - thr)


CAUSAL_BLOCK = 128  # rows per query block of cpu_dropout_attention (64 and 128 tied at T = 256; 32 was slower)


def causal_blocks(T):
    """[(start, end)]: causal attention over T queries and keys as blocks of CAUSAL_BLOCK query rows, each over
    keys [0, end); T <= CAUSAL_BLOCK is one block."""
    return [(s, min(s + CAUSAL_BLOCK, T)) for s in range(0, T, CAUSAL_BLOCK)]


CPU_BLOCKS_MAX_T = 512  # causal bf16 training on CPU: the blocks up to this length (see cpu_blocks_win)


def cpu_blocks_win(q, is_causal):
    """Whether cpu_dropout_attention's blocks beat SDPA's flash kernel for this training step without dropout:
    causal, bf16, at most CPU_BLOCKS_MAX_T positions. fwd+bwd of causal attention at head dim 64, 2 cores, torch 2.13,
    blocks against flash: AVX512-BF16 AMD EPYC (no AMX) 9.5 vs 14.5 ms (B8 H4 T256), 25 vs 40 (B4 H6 T512), 44 vs 46
    (B2 H6 T1024); AMX Xeon 9.8 vs 10.2 (B8 H4 T256), 28.4 vs 32.4 (B16 H6 T256), 16.9 vs 18.1 (B4 H6 T512), but
    38 vs 22 at B2 H6 T1024 (the T x T weights cost memory traffic there). In fp32 the two were within ~10%."""
    return is_causal and q.dtype == torch.bfloat16 and q.size(2) <= CPU_BLOCKS_MAX_T


def dropout(x, p, training):
    """F.dropout, with `keep_mask` on CPU (~5x cheaper there; CUDA has a fused kernel)."""
    if not training or p == 0:
        return x
    if x.device.type != 'cpu' or p >= 1 or not FAST_CPU_DROPOUT:
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.dtype)
    return torch.addcmul(x.new_zeros(()), x, keep, value=scale)  # x * keep * scale in one pass


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` (GPT.set_dropout finds it as an nn.Dropout)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


class LoRALinear(nn.Linear):
    """nn.Linear (same `weight`/`bias`, so a base checkpoint loads) plus LoRA (Hu et al. 2021, REFERENCE §16.2):
    h = W x + b + (alpha/r) B A dropout(x), A (r, in), B (out, r) = 0 at init, so the model starts exactly at
    its base. A is drawn by `reset_lora`, which GPT.__init__ calls after the base init: the base weights draw the
    same random numbers as with lora_rank=0. `merge` folds BA into W and drops the adapter."""

    def __init__(self, n_in, n_out, bias, rank, alpha, dropout):
        super().__init__(n_in, n_out, bias=bias)
        self.scaling, self.dropout_p, self.active = alpha / rank, dropout, True
        self.lora_A = nn.Parameter(self.weight.new_zeros(rank, n_in))
        self.lora_B = nn.Parameter(self.weight.new_zeros(n_out, rank))

    def reset_lora(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in)), as PEFT
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.active:  # merged, or switched off by GPT.lora_disabled
            return y
        x = dropout(x, self.dropout_p, self.training)
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self):  # W <- W + (alpha/r) B A, in fp32
        self.weight += (self.scaling * self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype)
        self.lora_A = self.lora_B = None
        self.active = False


def linear(n_in, n_out, bias, config, target):
    """The one place LoRA hooks in: nn.Linear, or LoRALinear when lora_rank > 0 and `target` is in lora_targets."""
    if config.lora_rank and target in config.lora_targets.split(','):
        return LoRALinear(n_in, n_out, bias, config.lora_rank, config.lora_alpha, config.lora_dropout)
    return nn.Linear(n_in, n_out, bias=bias)


class Norm(nn.Module):
    """LayerNorm (eps 1e-5, optional bias) | RMSNorm (Zhang & Sennrich 2019) | RMSNorm without weights (nanochat)."""

    def __init__(self, dim, kind='layernorm', bias=True):
        super().__init__()
        self.kind, self.shape = kind, (dim,)
        self.weight = nn.Parameter(torch.ones(dim)) if kind != 'rmsnorm_noparam' else None
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == 'layernorm' and bias else None

    def forward(self, x):
        if self.kind == 'layernorm':
            return F.layer_norm(x, self.shape, self.weight, self.bias, 1e-5)
        return F.rms_norm(x, self.shape, self.weight, eps=1e-6)  # pass eps: the None default is dtype-dependent


def repeat_kv(x, n_head):
    """GQA for the hand-written paths: query head h uses kv head h // (H/Hkv), as SDPA's enable_gqa."""
    return x if x.size(1) == n_head else x.repeat_interleave(n_head // x.size(1), dim=1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        c = config
        self.layer_idx, self.n_head, self.n_kv_head = layer_idx, c.n_head, c.n_kv_head
        self.head_dim = hd = c.head_dim
        self.rope, self.qk_norm, self.mla = c.pos_emb == 'rope', c.qk_norm, c.attn_type == 'mla'
        if self.mla:  # DeepSeek-V2 §2.1: low-rank joint KV compression + decoupled RoPE key shared by heads
            self.kv_rank, self.rope_dim, self.q_low_rank = c.mla_kv_rank, c.rope_dim, c.mla_q_rank > 0
            if self.q_low_rank:
                self.wq_a = linear(c.n_embd, c.mla_q_rank, False, c, 'attn_in')
                self.q_norm = Norm(c.mla_q_rank, 'rmsnorm')
                self.wq_b = linear(c.mla_q_rank, c.n_head * (hd + self.rope_dim), False, c, 'attn_in')
            else:
                self.wq = linear(c.n_embd, c.n_head * (hd + self.rope_dim), False, c, 'attn_in')
            self.wkv_a = linear(c.n_embd, self.kv_rank + self.rope_dim, False, c, 'attn_in')
            self.kv_norm = Norm(self.kv_rank, 'rmsnorm')
            self.wkv_b = linear(self.kv_rank, c.n_head * 2 * hd, False, c, 'attn_in')  # -> k_nope, v per head
            self.scale = (hd + self.rope_dim) ** -0.5
        else:  # q, k, v in one matmul; k/v have n_kv_head heads (GQA/MQA)
            self.c_attn = linear(c.n_embd, (c.n_head + 2 * c.n_kv_head) * hd, c.bias, c, 'attn_in')
            self.scale = hd ** -0.5
        self.c_proj = linear(c.n_head * hd, c.n_embd, c.bias, c, 'attn_out')
        self.attn_dropout = Dropout(c.dropout)
        self.resid_dropout = Dropout(c.dropout)

    def forward(self, x, a, kv_cache=None):
        B, T, _ = x.shape
        H, hd = self.n_head, self.head_dim
        # from here on (B, heads, time, head_dim): the layout SDPA reads and the KV caches store (time on dim -2)
        if self.mla:
            q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_low_rank else self.wq(x)
            q_nope, q_pe = q.view(B, T, H, hd + self.rope_dim).transpose(1, 2).split([hd, self.rope_dim], dim=-1)
            c_kv, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
            c_kv, k_pe = self.kv_norm(c_kv), k_pe[:, None]  # k_pe (B, 1, T, rope_dim): one key shared by heads
            if self.rope and a.k_cos is None:  # see below: keys enter the cache rotated
                k_pe = apply_rope(k_pe, a.cos, a.sin)
            if kv_cache is not None:  # the cache holds only the latent and the shared rope key
                c_kv, k_pe = (t.to(x.dtype) for t in kv_cache.update(self.layer_idx, c_kv, k_pe))
            S = c_kv.size(1)
            k_nope, v = self.wkv_b(c_kv).view(B, S, H, 2 * hd).transpose(1, 2).split([hd, hd], dim=-1)
            if self.rope:
                q_pe = apply_rope(q_pe, a.cos, a.sin)
                k_pe = k_pe if a.k_cos is None else apply_rope(k_pe, a.k_cos, a.k_sin)
            q = torch.cat([q_nope, q_pe], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(B, H, S, self.rope_dim)], dim=-1)
        else:
            q, k, v = self.c_attn(x).split([H * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
            q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))  # k, v: n_kv_head heads
            # A cache that keeps every token gets keys already rotated (positions never change: rotate once;
            # a.k_cos is None). One that evicts (streaming), or dynamic NTK, stores them before RoPE and the
            # visible keys are re-rotated at their positions inside the window, every step (a.k_cos).
            if self.rope and a.k_cos is None:
                k = apply_rope(k, a.cos, a.sin)
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer_idx, k, v)
            if self.rope:
                q = apply_rope(q, a.cos, a.sin)
                k = k if a.k_cos is None else apply_rope(k, a.k_cos, a.k_sin)
        if self.qk_norm:  # parameter-free RMS over head_dim; a rotation keeps the RMS, so order vs RoPE is moot
            q, k = F.rms_norm(q, (q.size(-1),), eps=1e-6), F.rms_norm(k, (k.size(-1),), eps=1e-6)
        out_dtype = q.dtype  # the projections' (bf16 under autocast, where x, a norm's output, is fp32)
        q = q.to(k.dtype)  # a cache may hold a wider dtype than the weights (fp32 K/V for bf16 weights on CPU)
        gqa = k.size(1) != H
        if a.manual:  # REFERENCE §1.1: S = QK^T*scale + bias, masked, softmax in fp32, O = PV
            k, v = repeat_kv(k, H), repeat_kv(v, H)
            att = (q @ k.transpose(-2, -1)).float() * self.scale
            if a.bias is not None:
                att = att + a.bias
            att = att.masked_fill(~a.allowed, float('-inf')).softmax(dim=-1)
            if a.row_ok is not None:  # fully masked query rows: zeros, never NaN
                att = att * a.row_ok
            if a.weights is not None:
                a.weights.append(att.detach())
            y = self.attn_dropout(att).to(v.dtype) @ v
        else:
            mask = a.mask if a.mask is None or a.mask.dtype == torch.bool else a.mask.to(q.dtype)
            p = self.attn_dropout.p if self.training else 0.0
            if q.device.type == 'cpu' and FAST_CPU_DROPOUT and self.training and (p or cpu_blocks_win(q, a.is_causal)):
                y = self.cpu_dropout_attention(q, k, v, mask, a.is_causal, p)  # SDPA's CPU kernels refuse dropout
            else:
                # MLA: q/k heads are wider than v (hd + rope_dim); the fused kernels want one head dim, so V is
                # zero-padded and the output cut back (as vLLM's MLA prefill does); else SDPA falls back to math
                pad = q.size(-1) - v.size(-1) if T > 1 else 0
                y = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)) if pad else v, attn_mask=mask,
                                                   is_causal=a.is_causal, scale=self.scale, enable_gqa=gqa,
                                                   dropout_p=p)
                y = y[..., :hd] if pad else y
            if a.row_ok is not None:
                y = y * a.row_ok
        y = y.transpose(1, 2).reshape(B, T, H * hd).to(out_dtype)
        return self.resid_dropout(self.c_proj(y))

    def cpu_dropout_attention(self, q, k, v, mask, is_causal, p):
        """SDPA's formula with dropout on the weights, for CPU training. SDPA's math fallback upcasts to fp32
        and draws its mask per element; here the weights stay in the input dtype (softmax accumulates in
        fp32 inside), the mask comes from keep_mask, the causal mask and the scale ride in one baddbmm, and
        1/(1-p) scales the output instead of the weights. fwd+bwd at B16 H6 T256 D64, bf16: ~3x faster.
        Also run without dropout (p = 0) where cpu_blocks_win says it beats SDPA."""
        B, H, T, S = q.size(0), q.size(1), q.size(2), k.size(2)
        k, v = repeat_kv(k, H), repeat_kv(v, H)
        if is_causal:  # T == S: blocks of query rows see keys [0, end) only, skipping products the mask would
            # discard (T = 256: 2 blocks, 3/4 of the work; B16 H6 D64 bf16 fwd+bwd 44 -> 38.5 ms); one keep mask each
            qf, kf, out = q.reshape(B * H, T, -1), k.reshape(B * H, S, -1), []
            for start, end in causal_blocks(T):
                bias = torch.full((end - start, end), float('-inf'), dtype=q.dtype, device=q.device).triu(start + 1)
                att = torch.baddbmm(bias, qf[:, start:end], kf[:, :end].transpose(1, 2), alpha=self.scale)
                att = att.view(B, H, end - start, end).softmax(dim=-1)
                out.append(self.dropped_weights_times_v(att, v[:, :, :end], p))
            return torch.cat(out, dim=2) if len(out) > 1 else out[0]
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = att.masked_fill(~mask, float('-inf')) if mask.dtype == torch.bool else att + mask
        return self.dropped_weights_times_v(att.softmax(dim=-1), v, p)

    @staticmethod
    def dropped_weights_times_v(att, v, p):
        if not p:
            return att @ v
        keep, scale = keep_mask(att.shape, p, att.dtype)
        return (att * keep) @ v * scale


def relu2(x):  # Primer (So et al. 2021)
    return F.relu(x).square()


class MLP(nn.Module):

    def __init__(self, config, width=1):
        super().__init__()
        hidden = int(config.mlp_ratio * config.n_embd) * width
        self.gated = config.mlp == 'swiglu'
        if self.gated:  # SwiGLU (Shazeer 2020): 3 matrices of 2/3 the width keep the 4x GELU parameter count
            hidden = -(-int(2 * hidden / 3) // 8) * 8
        self.c_fc = linear(config.n_embd, 2 * hidden if self.gated else hidden, config.bias, config, 'mlp_in')
        self.c_proj = linear(hidden, config.n_embd, config.bias, config, 'mlp_out')
        self.dropout = Dropout(config.dropout)
        if config.mlp == 'gelu':
            self.act = nn.GELU()  # exact, as nanoGPT
        elif config.mlp == 'gelu_tanh':
            self.act = nn.GELU(approximate='tanh')  # GPT-2's "gelu_new"
        elif config.mlp == 'relu2':
            self.act = relu2
        else:
            self.act = F.silu

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            h, gate = h.chunk(2, dim=-1)
            h = self.act(gate) * h
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))


class MoE(nn.Module):
    """Top-k routed experts (softmax router, gates = selected probabilities, no renorm: GShard/Switch,
    DeepSeek-V2) + always-on shared experts (DeepSeekMoE), optional capacity with token dropping."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.n_experts, self.top_k, self.capacity = c.n_experts, c.moe_top_k, c.moe_capacity
        self.router = nn.Linear(c.n_embd, c.n_experts, bias=False)
        self.experts = nn.ModuleList([MLP(c) for _ in range(c.n_experts)])
        self.shared = MLP(c, width=c.n_shared_experts) if c.n_shared_experts else None
        self.aux_loss = self.z_loss = None
        self.stats = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, E, k = x.size(0), self.n_experts, self.top_k
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        gates, chosen = probs.topk(k, dim=-1)  # (N, k)
        onehot = F.one_hot(chosen, E)  # (N, k, E)
        keep = torch.ones_like(gates, dtype=torch.bool)
        if self.capacity > 0:  # capacity = ceil(k*N/E * factor) per expert; top-1 choices have priority (GShard)
            cap = math.ceil(k * N / E * self.capacity)
            rank = onehot.transpose(0, 1).reshape(k * N, E).cumsum(0).view(k, N, E).transpose(0, 1)
            keep = (rank * onehot).sum(-1) <= cap
        # group the (token, slot) assignments by expert with one sort; dropped ones get id E and sort last.
        # One host sync for all expert sizes (a torch.where per expert would sync once per expert on GPU).
        expert_of = torch.where(keep, chosen, E).flatten()           # (N*k,)
        order = expert_of.argsort(stable=True)                        # within an expert: token order
        sizes = torch.bincount(expert_of, minlength=E + 1)[:E].tolist()
        tok, gate = order // k, gates.flatten()[order, None].to(x.dtype)
        y, start = torch.zeros_like(x), 0
        for expert, n in zip(self.experts, sizes):
            if n:
                rows = tok[start:start + n]
                y.index_add_(0, rows, expert(x[rows]) * gate[start:start + n])
            start += n
        if self.shared is not None:
            y = y + self.shared(x)
        # Switch (Fedus et al.) load-balancing loss E * sum_i f_i P_i, with f counting the top-k one-hots
        # (HF Mixtral form: equals k at perfect balance), and ST-MoE router z-loss mean(logsumexp^2).
        f = onehot.sum(1).float().mean(0)
        self.aux_loss = E * (f * probs.mean(0)).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        self.stats = (f.detach(), 1.0 - keep.float().mean().detach(), probs.detach())
        return y.view(shape)


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.norm, config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = Norm(config.n_embd, config.norm, config.bias)
        self.mlp = MoE(config) if config.n_experts else MLP(config)
        self.post_norm = config.norm_position == 'post'

    def forward(self, x, a, kv_cache=None):
        if self.post_norm:  # the original Transformer: normalise the sum (Xiong et al. 2020 show it needs warmup)
            x = self.ln_1(x + self.attn(x, a, kv_cache))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), a, kv_cache)  # pre-norm: the residual stream is never normalised
        return x + self.mlp(self.ln_2(x))


@dataclass
class AttnInputs:
    """Per-forward attention inputs, built once in GPT.forward and shared by every layer."""
    cos: torch.Tensor = None      # RoPE tables (B|1, 1, T, d/2) at the T new positions (queries, new keys)
    sin: torch.Tensor = None
    k_cos: torch.Tensor = None    # (B|1, 1, S, d/2) for all S visible keys, or None when keys are rotated as
    k_sin: torch.Tensor = None    # they enter the cache (one that keeps every token)
    manual: bool = False          # hand-written attention (attn_impl='manual' or return_attn)
    is_causal: bool = False       # SDPA fast path: no mask tensor
    mask: torch.Tensor = None     # SDPA mask: bool (True = may attend) or float (ALiBi bias, -inf)
    allowed: torch.Tensor = None  # manual path: bool (B|1, H|1, T, S)
    bias: torch.Tensor = None     # manual path: ALiBi (B|1, H, T, S)
    row_ok: torch.Tensor = None   # (B|1, H|1, T, 1) False where a query row had no allowed key
    weights: list = None          # collects attention weights when return_attn


# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            drop=Dropout(c.dropout),
            h=nn.ModuleList([Block(c, i) for i in range(c.n_layer)]),
            ln_f=Norm(c.n_embd, c.norm, c.bias),
        ))
        if c.pos_emb == 'learned':
            self.transformer.wpe = nn.Embedding(c.block_size, c.n_embd)
        if c.emb_norm:
            self.transformer.ln_emb = Norm(c.n_embd, c.norm, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_weights:  # one matrix embeds and un-embeds (Press & Wolf 2017), as GPT-2
            self.transformer.wte.weight = self.lm_head.weight
        if c.n_soft_prompt:  # prompt tuning (Lester et al. 2021, REFERENCE §16.3); filled by init_soft_prompt
            self.transformer.soft_prompt = nn.Parameter(torch.empty(c.n_soft_prompt, c.n_embd))
        # flags resolved once; forward and attn_inputs read only these (so editing self.config afterwards changes
        # nothing: to override flags, e.g. INFERENCE_FLAGS, build a new GPT from the edited config and load the weights)
        self.pos_emb, self.emb_norm, self.block_size = c.pos_emb, c.emb_norm, c.block_size
        self.rope_dim, self.rope_base = c.rope_dim, c.rope_base
        self.rope_scaling, self.rope_factor = c.rope_scaling, c.rope_factor
        self.sliding_window, self.attn_sinks, self.manual = c.sliding_window, c.attn_sinks, c.attn_impl == 'manual'
        self.softcap, self.grad_checkpoint, self.n_soft = c.logit_softcap, c.grad_checkpoint, c.n_soft_prompt
        self.moe_aux_coef, self.moe_z_coef = c.moe_aux_coef, c.moe_z_coef
        self.register_buffer('slopes', alibi_slopes(c.n_head) if c.pos_emb == 'alibi' else None, persistent=False)
        self.moe_layers = [b.mlp for b in self.transformer.h if isinstance(b.mlp, MoE)]
        self.aux_losses, self.last_attn = {}, None
        self.rope_freqs = {}  # (length for dynamic NTK else 0, device) -> (inv_freq, mscale)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight') and c.init_scheme == 'gpt2':  # residual projections / sqrt(2*n_layer)
                nn.init.normal_(p, 0.0, c.init_std / math.sqrt(2 * c.n_layer))
            if name.endswith('c_proj.weight') and c.zero_init:  # every residual branch starts as the identity
                nn.init.zeros_(p)                                # (nanochat, modded-nanogpt)
        if c.zero_init and not c.tie_weights:  # a tied head is the embedding table: zeroing it would zero every input
            nn.init.zeros_(self.lm_head.weight)  # initial loss = ln(vocab_size) exactly
        for m in self.modules():  # adapters last (B = 0, A random): the base draws what a lora_rank=0 model draws
            if isinstance(m, LoRALinear):
                m.reset_lora()
        if self.n_soft:  # from the initialised wte with its own generator: the global RNG stream is untouched
            self.init_soft_prompt()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if self.config.init_scheme == 'kaiming':  # He et al. 2015: N(0, 2 / fan_in), fan_in = weight.size(1)
                nn.init.kaiming_normal_(module.weight, mode='fan_in', nonlinearity='relu')
            else:
                nn.init.normal_(module.weight, 0.0, self.config.init_std)
            if getattr(module, 'bias', None) is not None:
                nn.init.zeros_(module.bias)

    def attn_inputs(self, T, S, kpos, qpos, pad_mask, attn_mask, return_attn, device, rerotate=False):
        """Positions and masks for T new queries over S visible keys (REFERENCE §1.2): causal is
        bottom-right aligned, then AND sliding window (|| sinks), key padding and the user's selective mask.
        rerotate: the cache holds keys before RoPE (it evicts, or dynamic NTK): tables for all S keys too."""
        a = AttnInputs(manual=self.manual or return_attn, weights=[] if return_attn else None)
        if self.pos_emb == 'rope':
            n = max(S, self.block_size) if self.rope_scaling == 'dynamic' else 0  # only dynamic NTK depends on length
            if (n, device) not in self.rope_freqs:  # memo: decoding would otherwise rebuild them every token
                inv_freq, mscale = rope_frequencies(self.rope_dim, self.rope_base, self.rope_scaling,
                                                    self.rope_factor, orig_len=self.block_size, seq_len=n)
                self.rope_freqs[n, device] = inv_freq.to(device), mscale
            inv_freq, mscale = self.rope_freqs[n, device]
            ang = (kpos if rerotate else qpos)[:, None, :, None].float() * inv_freq  # (B|1, 1, S|T, d/2)
            cos, sin = ang.cos() * mscale, ang.sin() * mscale
            a.cos, a.sin = cos[:, :, -T:], sin[:, :, -T:]
            if rerotate:
                a.k_cos, a.k_sin = cos, sin
        plain = (T == S or T == 1) and pad_mask is None and attn_mask is None and not self.sliding_window
        if plain and not a.manual and self.pos_emb != 'alibi':
            if T > 1:  # an `if`: torch.compile guards on T (a symbolic bool in AttnInputs breaks inductor's code)
                a.is_causal = True  # flash/efficient kernels, no mask tensor
            return a
        i = torch.arange(T, device=device)[:, None] + (S - T)
        allowed = (torch.arange(S, device=device)[None, :] <= i)[None, None]  # (1, 1, T, S)
        if self.sliding_window:  # keys at distance < W, plus the first attn_sinks positions
            near = (qpos[:, :, None] - kpos[:, None, :]) < self.sliding_window
            if self.attn_sinks:
                near = near | (kpos[:, None, :] < self.attn_sinks)
            allowed = allowed & near[:, None]
        if pad_mask is not None:
            allowed = allowed & pad_mask[:, None, None, :]
        if attn_mask is not None:
            allowed = allowed & attn_mask.bool()
        if pad_mask is not None or attn_mask is not None:  # let empty rows see their own key, zero them after
            a.row_ok = allowed.any(-1, keepdim=True)
            allowed = allowed | (~a.row_ok & (torch.arange(S, device=device) == i))
        a.allowed = a.mask = allowed
        if self.pos_emb == 'alibi':
            a.bias = alibi_bias(self.slopes, qpos, kpos)
            a.mask = a.bias.masked_fill(~allowed, float('-inf'))
        return a

    def forward(self, idx, targets=None, loss_mask=None, kv_cache=None, pad_mask=None, attn_mask=None,
                return_attn=False, label_smoothing=0.0):
        """idx (B, T) new tokens. targets (B, T) with -1 = ignore; loss_mask (B, T) 0/1 weights.
        pad_mask (B, S) True = real token over all visible keys (e.g. idx != pad_id), or (B,) lengths for
        right padding; left padding is fine (positions = cumsum(valid) - 1). attn_mask: bool, broadcastable
        to (B, n_head, T, S), True = may attend (selective masks). Returns (logits (B, T, V) fp32, loss).
        Soft prompt: its k vectors go first when a sequence starts (no cache or cache.pos == 0; the cache keeps and
        counts them) at positions 0..k-1, keys every token sees (pad_mask, attn_mask: real tokens only), no logits."""
        B, T = idx.shape
        device = idx.device
        past = 0
        if kv_cache is not None:  # visible keys: everything, or what a streaming cache keeps (sinks + window)
            past = min(kv_cache.pos, kv_cache.keep) if getattr(kv_cache, 'keep', 0) else kv_cache.pos
        pre = self.n_soft if kv_cache is None or kv_cache.pos == 0 else 0  # soft tokens entering now
        S = past + pre + T
        if pad_mask is not None:
            if pad_mask.dim() == 1:
                pad_mask = torch.arange(S - self.n_soft, device=device)[None, :] < pad_mask.to(device)[:, None]
            pad_mask = F.pad(pad_mask.bool(), (self.n_soft, 0), value=True)
            kpos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)
        else:
            kpos = torch.arange(S, device=device)[None, :]
        qpos = kpos[:, -(pre + T):]  # positions are indices into the visible window (StreamingLLM re-indexing)
        if attn_mask is not None and self.n_soft:  # every query may attend to the soft prompt
            attn_mask = F.pad(attn_mask.bool().expand(*attn_mask.shape[:-2], T, S - self.n_soft),
                              (self.n_soft, 0, pre, 0), value=True)

        x = self.transformer.wte(idx)
        if pre:
            x = torch.cat([self.transformer.soft_prompt.expand(B, -1, -1), x], dim=1)
        if self.emb_norm:
            x = self.transformer.ln_emb(x)
        if self.pos_emb == 'learned':
            assert S <= self.block_size, \
                f"length {S} (incl. n_soft_prompt={self.n_soft}) > block_size {self.block_size} (learned positions)"
            x = x + self.transformer.wpe(qpos)
        elif self.pos_emb == 'sinusoidal':  # token embeddings scaled by sqrt(d) (Vaswani et al. 2017, 3.4):
            # at init std 0.02 they would otherwise be drowned by the unit-amplitude sinusoids
            x = x * math.sqrt(x.size(-1)) + sinusoidal_embedding(qpos, x.size(-1)).to(x.dtype)
        x = self.transformer.drop(x)
        rerotate = kv_cache is not None and (getattr(kv_cache, 'keep', 0) or self.rope_scaling == 'dynamic')
        a = self.attn_inputs(pre + T, S, kpos=kpos, qpos=qpos, pad_mask=pad_mask, attn_mask=attn_mask,
                             return_attn=return_attn, device=device, rerotate=rerotate)
        for block in self.transformer.h:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, a, kv_cache, use_reentrant=False)
            else:
                x = block(x, a, kv_cache)
        x = self.transformer.ln_f(x[:, pre:])  # logits for the real tokens only
        logits = self.lm_head(x).float()
        if self.softcap:  # Gemma 2 / nanochat: bounded logits, in fp32
            logits = self.softcap * torch.tanh(logits / self.softcap)
        self.last_attn = a.weights

        aux = 0.0
        self.aux_losses = {}
        if self.moe_layers:  # averaged over MoE layers so the coefficients do not depend on depth
            moe_aux = torch.stack([m.aux_loss for m in self.moe_layers]).mean()
            moe_z = torch.stack([m.z_loss for m in self.moe_layers]).mean()
            self.aux_losses = {'moe_aux': moe_aux.detach(), 'moe_z': moe_z.detach()}
            aux = self.moe_aux_coef * moe_aux + self.moe_z_coef * moe_z
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                             reduction='none', label_smoothing=label_smoothing)
        w = (targets.reshape(-1) != -1).float()
        if loss_mask is not None:
            w = w * loss_mask.reshape(-1).float()
        if pad_mask is not None:
            w = w * pad_mask[:, -T:].reshape(-1).float()
        loss = (ce * w).sum() / w.sum().clamp(min=1.0)
        # MoE aux terms are a training objective: in eval mode the loss is the cross-entropy alone, so val loss,
        # ppl and bpb compare fairly with dense models (the terms are still in self.aux_losses)
        return logits, loss + aux if self.training else loss

    # ---- adapters: LoRA (Hu et al. 2021; folds into the base), soft prompt (Lester et al. 2021, REFERENCE §16.3) ----

    def lora_parameters(self):
        """{name: adapter tensor} of every lora_A, lora_B, e.g. for optimizer groups (REFERENCE §16.2 on wd and lr)."""
        return {n: p for n, p in self.named_parameters() if n.endswith(('.lora_A', '.lora_B'))}

    def mark_only_lora_trainable(self):
        """Freeze the base (Linears, embeddings, norms, router, head): only adapters train. Returns their count."""
        return self.mark_only_adapters_trainable(self.lora_parameters())

    def mark_only_adapters_trainable(self, keep=None):
        """Freeze all but `keep` ({name: tensor}; default: LoRA adapters + soft prompt). Returns their count."""
        keep = self.adapter_parameters() if keep is None else keep
        if not keep:
            raise ValueError("nothing to train: set lora_rank > 0 (LoRA) or n_soft_prompt > 0 (soft prompt)")
        for n, p in self.named_parameters():
            p.requires_grad_(n in keep)
        return sum(p.numel() for p in keep.values())

    def lora_state_dict(self):
        """Only the adapters (megabytes, not the base): model.load_state_dict(sd, strict=False) on the same base."""
        return {k: v for k, v in self.state_dict().items() if k.endswith(('.lora_A', '.lora_B'))}

    def merge_lora(self):
        """W <- W + (alpha/r) B A in every adapted Linear, adapters dropped: decoding runs at base speed, and the
        state dict and config (lora_rank=0 from here on) are those of a plain base model."""
        for m in self.modules():
            if isinstance(m, LoRALinear) and m.lora_A is not None:
                m.merge()
        self.config = replace(self.config, lora_rank=0)
        return self

    def quantize_int8(self):
        """Weight-only int8 for inference: every Linear but MoE routers becomes an Int8Linear (the tied head gets an
        int8 copy; the embedding lookup keeps its rows). Batch-1 decoding reads each weight once per token."""
        return self._replace_linears(Int8Linear)

    def _replace_linears(self, cls):
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(parent, MoE):
                    setattr(parent, name, cls(child))
        return self

    def transpose_wide_weights(self):
        """Store every 2-D weight that has more rows than columns (QKV, MLP up, the head/wte) transposed in memory:
        the same values, only the strides change, so state dicts and outputs stay the same up to the gemv's summation
        order. For fp32 batch-1 decoding on CPU: there a row-major W (out, in) with a short `in` ran ~1.6-2x slower
        than its column-major twin (1152x384: 237 vs 145 us, 8192x384: 1.59 vs 0.76 ms, AVX2 EPYC, torch 2.13), and
        matrix-matrix products (prompts) were within ~15% either way. bf16 weights want row-major (the transposed
        bf16 gemv was ~4x slower)."""
        for p in self.parameters():
            if p.dim() == 2 and p.size(0) > p.size(1) and p.is_contiguous():
                p.data = p.data.t().contiguous().t()
        return self

    def quantize_bf16(self):
        """Weight-only bf16 for inference: every Linear but MoE routers becomes a Bf16Linear (half the fp32 bytes;
        the tied head gets a bf16 copy, the embedding lookup keeps its rows); norms, softmax, residual stream and
        KV cache stay in the activations' dtype."""
        return self._replace_linears(Bf16Linear)

    @contextlib.contextmanager
    def lora_disabled(self):
        """Inside, the model is its base (adapters skipped): DPO's frozen reference with LoRA (REFERENCE §16.4)."""
        on = [m for m in self.modules() if isinstance(m, LoRALinear) and m.active]
        for m in on:
            m.active = False
        try:
            yield self
        finally:
            for m in on:
                m.active = m.lora_A is not None

    def soft_prompt_parameters(self):
        """{name: tensor} of the soft prompt ({} when n_soft_prompt=0), e.g. for an optimizer group without wd."""
        return {n: p for n, p in self.named_parameters() if n == 'transformer.soft_prompt'}

    @torch.no_grad()
    def init_soft_prompt(self, token_ids=None, seed=0):
        """Soft prompt <- wte rows of token_ids, or of distinct ids drawn with a seeded generator (sampled vocabulary
        beats random init, Lester et al. §3.2). __init__ calls it; call it again after loading base weights."""
        wte = self.transformer.wte.weight
        if token_ids is None:
            token_ids = torch.randperm(wte.size(0), generator=torch.Generator().manual_seed(seed))[:self.n_soft]
        self.transformer.soft_prompt.copy_(wte[torch.as_tensor(token_ids, device=wte.device)])
        return token_ids

    def adapter_parameters(self):
        """What a parameter-efficient finetune trains and saves: LoRA adapters + the soft prompt."""
        return {**self.lora_parameters(), **self.soft_prompt_parameters()}

    def adapter_state_dict(self):
        """LoRA adapters + soft prompt only: model.load_state_dict(sd, strict=False) on the same base."""
        keep = self.adapter_parameters()
        return {k: v for k, v in self.state_dict().items() if k in keep}

    # ---- dropout schedule, counts and estimates ----

    def set_dropout(self, p):
        """Set every dropout (embedding, attention weights, residual) to p, e.g. for a dropout schedule."""
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p

    def num_params(self, non_embedding=True):
        """Parameter count (tied weights once; LoRA adapters included until merge_lora). non_embedding drops lookup
        tables: wpe, soft prompt, and wte when untied (tied wte is the lm_head matmul), as nanoGPT's MFU convention."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.soft_prompt_parameters().values())
            if self.pos_emb == 'learned':
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def num_active_params(self, non_embedding=True):
        """Parameters used per token: MoE layers count only top_k routed experts (plus shared and router)."""
        n = self.num_params(non_embedding)
        for m in self.moe_layers:
            n -= (m.n_experts - m.top_k) * sum(p.numel() for p in m.experts[0].parameters())
        return n

    def flops_per_token(self, seq_len=None):
        """Training (fwd+bwd) FLOPs per token: 6*N_active + attention 6*L*H*T*(d_qk + d_v), i.e. the
        PaLM/nanoGPT 6N + 12*L*H*Dh*T for MHA (no causal halving); T capped by the window (+ sinks).
        N includes LoRA adapters; a frozen base still counts 6N (its weight gradients are skipped: nearer 4N)."""
        c = self.config
        T = seq_len or c.block_size
        if c.sliding_window:
            T = min(T, c.sliding_window + c.attn_sinks)
        d_qk = c.head_dim + c.rope_dim if c.attn_type == 'mla' else c.head_dim
        return 6 * self.num_active_params() + 6 * c.n_layer * c.n_head * T * (d_qk + c.head_dim)

    def kv_bytes_per_token(self, dtype=torch.bfloat16):
        """KV-cache bytes per token: 2*L*Hkv*Dh*bytes (MHA/GQA) or L*(kv_rank + rope_dim)*bytes (MLA latent)."""
        c = self.config
        size = (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize
        if c.attn_type == 'mla':
            return c.n_layer * (c.mla_kv_rank + c.rope_dim) * size
        return 2 * c.n_layer * c.n_kv_head * c.head_dim * size

    def moe_stats(self):
        """Per MoE layer, from the last forward: load = fraction of routed assignments per expert (sums to 1),
        dropped_frac = assignments over capacity, scores = router probabilities (N, E) for histograms."""
        out = []
        for m in self.moe_layers:
            if m.stats is not None:
                f, dropped, probs = m.stats
                out.append({'load': (f / f.sum()).tolist(), 'dropped_frac': float(dropped), 'scores': probs})
        return out

    @classmethod
    def from_checkpoint(cls, path, **overrides):
        """(model, checkpoint dict) from a train.py ckpt.pt, loaded on the CPU with weights_only=True.
        overrides: INFERENCE_FLAGS to change on the trained weights (e.g. rope_scaling='yarn', rope_factor=4)."""
        if set(overrides) - set(INFERENCE_FLAGS):
            raise ValueError(f"a checkpoint's {', '.join(sorted(set(overrides) - set(INFERENCE_FLAGS)))} cannot change: "
                             f"only {', '.join(INFERENCE_FLAGS)} may be overridden")
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        model = cls(GPTConfig(**{**ckpt['model_args'], **overrides}))
        state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
        if 'adapter_base' in ckpt:  # a LoRA run saves its adapters only: load them onto its base and merge them
            state = {**load_base_state(ckpt['adapter_base'], model.config.vocab_size, model.config.block_size), **state}
        model.load_state_dict(state)
        return (model.merge_lora() if 'adapter_base' in ckpt else model), ckpt

    def make_kv_cache(self, batch_size, max_len, kind='contiguous', page_size=256, offload=False,
                      device=None, dtype=None):
        """A cache for model(idx, kv_cache=cache). With sliding_window the cache may keep only
        attn_sinks + sliding_window - 1 tokens between calls (StreamingLLM), so decoding can go on forever.
        max_len counts real tokens (the soft prompt's room is added); streaming keeps the soft prompt as sinks."""
        c = self.config
        keep = self.attn_sinks + self.sliding_window - 1 if self.sliding_window else 0
        if keep and self.attn_sinks < self.n_soft:
            raise ValueError(f"streaming would evict the soft prompt: set attn_sinks >= n_soft_prompt={self.n_soft}")
        max_len += self.n_soft
        args = dict(device=device or self.transformer.wte.weight.device, dtype=dtype, keep=keep, sinks=self.attn_sinks)
        if kind == 'paged':
            return PagedKVCache(c.n_layer, batch_size, max_len, page_size=page_size, offload=offload, **args)
        return ContiguousKVCache(c.n_layer, batch_size, max_len, **args)


class Int8Linear(nn.Module):
    """y = x (q * scale)^T + b with q int8 and one fp32 scale per output row (symmetric, absmax / 127): a quarter of
    the fp32 weight bytes (gpt-fast's int8 weight-only). CPU: torch's int8 x float kernel; elsewhere dequantised."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer('q', torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        # kept in the weight's dtype, which is the activations' at inference: the kernel takes the scales in x's
        # dtype, and a cast per call would also stop torch.compile from lowering the int8 kernel
        self.register_buffer('scale', scale.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x):
        scale = self.scale.to(x.dtype)  # a no-op when the model was cast before quantising (sample.py)
        if x.device.type == 'cpu' and x.dtype in (torch.float32, torch.bfloat16):
            y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.q, scale)
            y = y.view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.q.to(x.dtype) * scale[:, None])
        return y if self.bias is None else y + self.bias


class Bf16Linear(nn.Module):
    """y = bf16(bf16(x) W^T) + b: a bf16 weight, products accumulated in fp32, the output rounded to bf16 (what a
    bf16 matmul gives) and returned in x's dtype, so the layers around it keep fp32 activations. Batch-1 decoding
    is memory-bound, and a bf16 gemv reads half the bytes: on an AVX2-only CPU it runs ~2-3x faster than fp32 even
    though bf16 matmuls are emulated there. Those CPUs run inputs of more than BF16_EMULATED_ROWS rows (prompts)
    as the same product in fp32 on an upcast copy of the weight, because the emulated matmul is ~100x slower."""

    def __init__(self, linear):
        super().__init__()
        self.register_buffer('weight', linear.weight.detach().to(torch.bfloat16).clone())
        self.bias = linear.bias

    def forward(self, x):
        rows = x.numel() // x.size(-1)
        if x.device.type == 'cpu' and rows > BF16_EMULATED_ROWS and not cpu_has_fast_bf16():
            y = F.linear(x.to(torch.bfloat16).float(), self.weight.float()).to(torch.bfloat16)
        else:
            y = F.linear(x.to(torch.bfloat16), self.weight)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


BF16_EMULATED_ROWS = 2  # AVX2 EPYC, 384-wide layers: the bf16 kernel wins at 1-2 rows, breaks even at 4, loses after


@functools.cache  # read /proc/cpuinfo once
def cpu_flags():
    """The CPU's feature flags (Linux /proc/cpuinfo), an empty set where they cannot be read."""
    try:
        with open('/proc/cpuinfo') as f:
            return frozenset(w for line in f if line.startswith('flags') for w in line.split(':', 1)[1].split())
    except OSError:
        return frozenset()


def cpu_has_fast_bf16():
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware (elsewhere, e.g. AVX2-only CPUs, they are emulated, slow)."""
    return bool({'avx512_bf16', 'amx_bf16'} & cpu_flags())


def cpu_has_amx():
    """AMX tiles (Intel Sapphire Rapids and later): oneDNN's bf16 attention kernels are fast there, while on an
    AVX512-BF16 CPU without AMX (AMD Zen 4) batch-1 SDPA over a bf16 cache ran 3-7x slower than over fp32."""
    return 'amx_bf16' in cpu_flags()


def keep_freed_cpu_memory(enable=True):
    """glibc gives every allocation over 32 MB fresh pages from mmap and unmaps them on free, so a training step
    that makes such tensors (the fp32 logits of 8x256 tokens x 4096 vocab are 33.5 MB) pays a page fault per 4 KB
    of each, every step: ~25 ms per tensor on a 2-core Xeon. Below 32 MB glibc already keeps and reuses freed
    blocks. This stops mmap (M_MMAP_MAX=0; glibc falls back to it when the heap cannot grow) and keeps up to
    1 GiB of freed memory in the process (M_TRIM_THRESHOLD), so big blocks are reused like small ones. The cost is
    a higher resident size (speedrun step: 1007 vs 880 MB peak). False sets glibc's defaults back, though its
    threshold then stays fixed at 128 KB instead of adapting. True if applied (glibc), else False (nothing done)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
    return bool(mallopt(M_MMAP_MAX, 0 if enable else 65536)) and \
        bool(mallopt(M_TRIM_THRESHOLD, (1 << 30) if enable else 128 * 1024))


def training_dtype(device_type):
    """What dtype='auto' trains in (train.py, bench.py): bf16 autocast on CUDA (fp16 before Ampere) and on CPUs
    with fast bf16, else float32."""
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'bfloat16' if device_type == 'cpu' and cpu_has_fast_bf16() else 'float32'


def peak_flops(device='cpu', dtype=torch.float32, quick=False):
    """Peak matmul FLOP/s of ONE device, the denominator of MFU (train.py and bench.py). Known GPUs: the dense
    spec sheet value (bf16/fp16 tensor cores, TF32 for fp32); otherwise measured here: the best of a few 50 ms
    windows of a square matmul (a peak: a busy machine only ever makes a window slower). n doubles from 256 while
    one warmed-up product takes < 5 ms, up to 2048 (8192 on GPU): small products under-state the peak (bf16 AMX:
    ~510 GFLOP/s at 256, ~1.4 TFLOP/s at 2048), and a CPU without bf16 units (~100x slower, emulated) stops early."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        specs = {'H100': (989e12, 495e12), 'H200': (989e12, 495e12), 'A100': (312e12, 156e12)}  # (bf16, tf32)
        for gpu, (half, tf32) in specs.items():
            if gpu in name:
                return tf32 if dtype == torch.float32 else half
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    n, cap = 256, (8192 if device.type == 'cuda' else 2048)
    gen = torch.Generator(device=device).manual_seed(0)  # never the global one: how many draws depends on timing,
    while True:                                          # and the dropout masks after it must not
        a, b = (torch.randn(n, n, device=device, generator=gen).to(dtype) for _ in range(2))
        a @ b, a @ b  # warm-up: thread pool, kernel selection / JIT
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        if quick or n >= cap or time.perf_counter() - t > 0.005:
            break
        n *= 2
    best = 0.0
    for _ in range(2 if quick else 4):
        sync()
        t, k = time.perf_counter(), 0
        while time.perf_counter() - t < 0.05 or k < 2:
            a @ b
            k += 1
        sync()
        best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t))
    return best


# OpenAI's GPT-2 in Hugging Face's published layout (model.safetensors of the gpt2* repos): the classic config
# of this file with biases, GELU-tanh ("gelu_new"), 1024 learned positions and the 50257-token vocabulary.
GPT2_SIZES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),
              'gpt2-xl': (48, 25, 1600)}  # (n_layer, n_head, n_embd)


def gpt2_config(name):
    n_layer, n_head, n_embd = GPT2_SIZES[name]
    return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, block_size=1024, bias=True,
                pos_emb='learned', norm='layernorm', mlp='gelu_tanh', tie_weights=True, dropout=0.0)


def gpt2_state_dict(hf, n_layer):
    """This model's state dict from HF GPT-2 tensors. Keys are `h.0.attn.c_attn.weight`, ... (files written by
    newer save_pretrained prefix `transformer.`); Conv1D matrices are stored (in, out), so they are transposed; the
    causal-mask buffers `h.N.attn.bias` / `attn.masked_bias` are skipped, and the head is the tied embedding.
    Raises ValueError naming missing or unexpected keys (shapes are checked by load_state_dict)."""
    out = {}
    for key, t in hf.items():
        k = key.removeprefix('transformer.')
        parts = k.split('.')
        if parts[-2:] in (['attn', 'bias'], ['attn', 'masked_bias']) or k == 'lm_head.weight':
            continue
        out['transformer.' + k] = t.t() if parts[-1] == 'weight' and parts[-2] in ('c_attn', 'c_proj', 'c_fc') else t
    want = {'wte.weight', 'wpe.weight', 'ln_f.weight', 'ln_f.bias'} | {
        f'h.{i}.{m}.{p}' for i in range(n_layer) for m in ('ln_1', 'ln_2', 'attn.c_attn', 'attn.c_proj', 'mlp.c_fc',
                                                           'mlp.c_proj') for p in ('weight', 'bias')}
    have = {k.removeprefix('transformer.') for k in out}
    if want - have or have - want:
        raise ValueError(f"not a {n_layer}-layer GPT-2 state dict: missing {sorted(want - have)[:4]}, "
                         f"unexpected {sorted(have - want)[:4]}")
    out['lm_head.weight'] = out['transformer.wte.weight']
    return out


def load_base_state(ref, vocab_size, block_size):
    """The weights a finetune starts from, and a LoRA run's frozen base: ref = {'init_from', 'path'} names another
    run's ckpt.pt or GPT-2's safetensors. Tokens the base lacks (e.g. ChatML's) get rows at its mean embedding;
    learned positions are cropped to block_size (a finetune may use a shorter context)."""
    if ref['init_from'] in GPT2_SIZES:
        from safetensors.torch import load_file
        state = gpt2_state_dict(load_file(ref['path']), GPT2_SIZES[ref['init_from']][0])
    else:
        ckpt = torch.load(ref['path'], map_location='cpu', weights_only=True)
        if 'adapter_base' in ckpt:
            raise ValueError(f"{ref['path']} holds LoRA adapters only: finetune from its base, or merge it first")
        state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    for k in ('transformer.wte.weight', 'lm_head.weight'):
        w = state[k]
        state[k] = torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - w.size(0), -1)])
    if 'transformer.wpe.weight' in state:
        state['transformer.wpe.weight'] = state['transformer.wpe.weight'][:block_size]
    return state


# ==== KV caches ====
# Owned by the sample helper. Model-side contract (what the attention layers rely on):
#   cache.pos   : int, absolute number of tokens already processed (advanced after the last layer).
#   cache.keep  : int, max tokens retained between calls (0 = keep everything). Streaming caches
#                 (sliding_window>0) keep the first attn_sinks tokens + the most recent sliding_window-1.
#   cache.update(layer_idx, *tensors) -> tuple: appends tensors (B, ..., T_new, d) (time on dim -2: keys and
#                 values (B, heads, T, head_dim), MLA's latent (B, T, rank)) and returns the visible tensors
#                 (B, ..., min(pos, keep or inf) + T_new, d), ordered [sinks, recent...].
#   Caches store whatever the attention passes: rotated keys when nothing is evicted; for streaming (and
#   dynamic NTK) PRE-RoPE keys, which the model re-rotates at positions inside the visible window (StreamingLLM).
#   Eviction is lazy (at layer 0 of the next call), so a cache holds at most keep + 1 = S + W tokens after a
#   one-token step; `sinks` (= attn_sinks) tells a streaming cache how many first tokens to keep.
class ContiguousKVCache:
    """Preallocated (B, ..., max_len, d) buffers per layer (nanochat, REFERENCE §11.2), allocated on first use
    with the shapes the attention passes: new entries are written in place, decoding never concatenates.
    Streaming caches are sized keep + T_new and evict by moving the recent tokens down once per forward."""

    def __init__(self, n_layer, batch_size, max_len, device=None, dtype=None, keep=0, sinks=0):
        self.n_layer, self.batch_size, self.max_len = n_layer, batch_size, max_len
        self.device, self.dtype, self.keep, self.sinks = device, dtype, keep, sinks
        self.bufs = [None] * n_layer  # per layer: list of buffers (B, ..., room, d)
        self.pos = 0       # absolute tokens processed
        self.seq_len = 0   # tokens held (== pos until a streaming eviction)

    def update(self, layer, *xs):
        if layer == 0 and self.keep and self.seq_len > self.keep:  # streaming: keep sinks + the newest
            S, R, L = self.sinks, self.keep - self.sinks, self.seq_len
            for bufs in self.bufs:
                for b in bufs or ():
                    b[..., S:S + R, :] = b[..., L - R:L, :].clone()
            self.seq_len = self.keep
        L, T = self.seq_len, xs[0].size(-2)
        if self.bufs[layer] is None or L + T > self.bufs[layer][0].size(-2):
            self._grow(layer, xs, L + T)
        for b, x in zip(self.bufs[layer], xs):
            b[..., L:L + T, :] = x
        if layer == self.n_layer - 1:
            self.pos, self.seq_len = self.pos + T, L + T
        return tuple(b[..., :L + T, :] for b in self.bufs[layer])

    def _grow(self, layer, xs, need):  # first use of a layer, or a streaming prefill longer than the room
        if not self.keep and need > self.max_len:
            raise ValueError(f"KV cache full: {need} tokens > max_len={self.max_len}; make a larger cache")
        room = max(need, self.keep + 1 if self.keep else self.max_len)
        old, L = self.bufs[layer], self.seq_len
        self.bufs[layer] = [x.new_zeros(x.shape[:-2] + (room, x.size(-1)), dtype=self.dtype or x.dtype,
                                        device=self.device or x.device) for x in xs]
        for b, o in zip(self.bufs[layer], old or ()):
            b[..., :L, :] = o[..., :L, :]

    def truncate(self, n):
        """Forget the newest n tokens (rejected speculative drafts): they are overwritten by the next update."""
        if self.keep:
            raise ValueError("a streaming cache cannot forget tokens: its evictions are final")
        self.pos, self.seq_len = self.pos - n, self.seq_len - n

    def reorder(self, indices):
        """Row i becomes old row indices[i] (beam parents; one prefill expanded to n samples; finished rows
        dropped). len(indices) may differ from the batch size. Copies the filled part of every buffer."""
        L = self.seq_len
        for layer, bufs in enumerate(self.bufs):
            if bufs is None:
                continue
            idx = indices.to(bufs[0].device)
            if len(idx) == bufs[0].size(0):  # in place, moving only the rows that change
                moved = (idx != torch.arange(len(idx), device=idx.device)).nonzero().flatten()
                for b in bufs:
                    b[moved, ..., :L, :] = b[idx[moved], ..., :L, :]
            else:
                self.bufs[layer] = [b.new_zeros((len(idx),) + b.shape[1:]) for b in bufs]
                for n, b in zip(self.bufs[layer], bufs):
                    n[..., :L, :] = b[idx, ..., :L, :]
        self.batch_size = len(indices)

    def nbytes(self):
        return sum(b.numel() * b.element_size() for bufs in self.bufs for b in bufs or ())


class PagedKVCache:
    """Paged cache (vLLM / PagedAttention, Kwon et al. 2023, REFERENCE §11.3). K/V live in a pool of
    fixed-size blocks of `page_size` tokens; each row has a block table (logical block -> physical block).
    Rows take one block at a time as they grow; blocks are ref-counted, so rows share a prefix (beams after
    `reorder`, n samples of one prompt) and a shared partial block is copied before it is written
    (copy-on-write). Rows dropped by `reorder` return their blocks to the free list. The pool grows by one
    block when the free list is empty (num_blocks preallocates it). offload=True: full blocks older than the
    newest `resident_blocks` of a row move to CPU memory (pinned on CUDA) and are copied back for each
    gather (REFERENCE §11.4). Attention reads a contiguous gather of the visible tokens (§11.3's reference),
    or a view of the pool when the rows' blocks happen to sit in consecutive slots (one sequence, in order)."""

    def __init__(self, n_layer, batch_size, max_len, page_size=256, offload=False, device=None, dtype=None,
                 keep=0, sinks=0, resident_blocks=2, num_blocks=0):
        self.n_layer, self.batch_size, self.max_len, self.page = n_layer, batch_size, max_len, page_size
        self.offload, self.resident, self.device, self.dtype = offload, max(1, resident_blocks), device, dtype
        self.keep, self.sinks = keep, sinks
        self.pools = [None] * n_layer        # per layer: list of (n_slots, page, ...) tensors
        self.n_slots = num_blocks            # physical blocks in the pool
        self.free = list(range(num_blocks))  # free physical blocks (the tests shuffle it)
        self.refs = {}                       # block id -> table entries pointing at it
        self.host = {}                       # offloaded block id (< 0) -> per layer list of CPU tensors
        self.tables = [[] for _ in range(batch_size)]  # per row: ids (>= 0 pool slot, < 0 host, None evicted)
        self.pos = 0      # absolute tokens processed (= logical tokens written per row)
        self.seq_len = 0  # tokens held (== pos until a streaming eviction)
        self._plan = None  # write/gather indices made by layer 0 of a forward, used by every layer

    def _alloc(self):
        if not self.free:  # grow the pool by one block
            for pools in self.pools:
                for i, p in enumerate(pools or ()):  # pools are (..., n_slots, page, d)
                    pools[i] = torch.cat([p, p.new_zeros(p.shape[:-3] + (1,) + p.shape[-2:])], dim=-3)
            self.free.append(self.n_slots)
            self.n_slots += 1
        b = self.free.pop()
        self.refs[b] = 1
        return b

    def _decref(self, b):
        if b is not None:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                del self.refs[b]
                self.free.append(b) if b >= 0 else self.host.pop(b)

    def stats(self):
        """Allocator state: total = used + free pool blocks, host = offloaded blocks, shared = blocks with refs > 1."""
        used = sum(1 for b in self.refs if b >= 0)
        return dict(total=self.n_slots, used=used, free=len(self.free), host=len(self.host),
                    shared=sum(1 for r in self.refs.values() if r > 1), page_size=self.page)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for pools in self.pools for t in pools or ()) + \
            sum(t.numel() * t.element_size() for blk in self.host.values() for ts in blk for t in ts)

    def reorder(self, indices):
        """Row i becomes old row indices[i]: tables are copied and blocks shared, no K/V moves.
        Rows not selected release their blocks; reorder(empty) frees everything."""
        new = [list(self.tables[i]) for i in indices.tolist()]
        for b in (b for t in new for b in t if b is not None):
            self.refs[b] += 1
        for b in (b for t in self.tables for b in t):
            self._decref(b)
        self.tables, self.batch_size, self._plan = new, len(new), None

    def _evict_and_offload(self):
        page, L = self.page, self.pos
        if self.keep and self.seq_len > self.keep:  # streaming: free the blocks between sinks and recent tokens
            self.seq_len = self.keep
            for table in self.tables:
                for j in range(-(-self.sinks // page), (L - (self.keep - self.sinks)) // page):
                    self._decref(table[j])
                    table[j] = None
        moved = {}  # device slot -> host id: a block shared by rows moves once
        for table in self.tables if self.offload else ():
            for j in range(max(0, L // page - self.resident)):
                b = table[j]
                if b is not None and b >= 0:
                    if b not in moved:
                        pin = self.pools[0][0].is_cuda
                        moved[b] = min(self.host, default=0) - 1
                        self.host[moved[b]] = [[torch.empty(p.shape[:-3] + p.shape[-2:], dtype=p.dtype,
                                                            pin_memory=pin).copy_(p[..., b, :, :], non_blocking=pin)
                                                for p in pools] for pools in self.pools]
                        self.refs[moved[b]] = 0
                    table[j] = moved[b]
                    self.refs[moved[b]] += 1
                    self._decref(b)
        if moved and self.pools[0][0].is_cuda:
            torch.cuda.current_stream().synchronize()  # the copies must land before the slots are reused

    def _prepare(self, T, device):
        """Layer 0 of a forward: evict/offload, give every row blocks for the T new tokens (copy-on-write of
        a shared partial block), then compute the write and gather indices used by every layer."""
        self._evict_and_offload()
        page, L = self.page, self.pos
        for table in self.tables:
            j = L // page
            if L % page and self.refs[table[j]] > 1:  # the partial block is shared: copy before writing
                old, table[j] = table[j], self._alloc()
                for pools in self.pools:
                    for p in pools or ():
                        p[..., table[j], :L % page, :] = p[..., old, :L % page, :]
                self._decref(old)
            while len(table) * page < L + T:
                table.append(self._alloc())
        tab = torch.tensor([[2**62 if b is None else b for b in t] for t in self.tables], dtype=torch.long)
        new = torch.arange(L, L + T)
        n_sink = min(self.sinks, L) if self.keep else 0  # streaming keeps the first S tokens + the newest
        vis = torch.cat([torch.arange(n_sink), torch.arange(L - (self.seq_len - n_sink), L + T)])
        blocks = torch.unique(vis // page)  # logical blocks holding visible tokens, in order
        ids = tab[:, blocks]                # (B, n_blocks) physical ids; offloaded (< 0) ones come first
        n_host = int((ids[0] < 0).sum())
        local = torch.searchsorted(blocks, vis // page) * page + vis % page  # visible token -> gathered slot
        dev = ids[:, n_host:].flatten()
        start = int(dev[0]) if len(dev) and torch.equal(dev, torch.arange(len(dev)) + dev[0]) else None
        self._plan = dict(w_blk=tab[:, new // page].to(device), w_off=(new % page).to(device),
                          dev=dev.to(device), dev_start=start, host=ids[:, :n_host].tolist(), n_host=n_host,
                          n_vis=len(vis), local=None if torch.equal(local, torch.arange(len(vis))) else local.to(device))

    def update(self, layer, *xs):
        T, device = xs[0].size(-2), self.device or xs[0].device
        if not self.keep and self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos + T} tokens > max_len={self.max_len}; make a larger cache")
        if self.pools[layer] is None:  # a pool per tensor: (..., n_slots, page, d), e.g. (heads, n_slots, page, d)
            self.pools[layer] = [x.new_zeros(x.shape[1:-2] + (self.n_slots, self.page, x.size(-1)),
                                             dtype=self.dtype or x.dtype, device=device) for x in xs]
        if layer == 0:
            self._prepare(T, device)
        plan, out, B = self._plan, [], xs[0].size(0)
        for k, (p, x) in enumerate(zip(self.pools[layer], xs)):
            mid, slots = p.shape[:-3], p.dim() - 3
            p[..., plan['w_blk'], plan['w_off'], :] = x.to(p.dtype).movedim(0, -3)  # (..., B, T, d)
            if plan['dev_start'] is not None:  # the rows' blocks sit in consecutive slots: a view, no copy
                y = p.narrow(slots, plan['dev_start'], len(plan['dev']))
            else:  # gather whole blocks: one memcpy each
                y = p.index_select(slots, plan['dev'])
            y = y.view(mid + (B, y.size(slots) // B * self.page, p.size(-1)))
            if plan['n_host']:  # offloaded blocks come back (async from pinned memory) straight into place
                page, n_host = self.page, plan['n_host']
                full = p.new_empty(mid + (B, n_host * page + y.size(-2), p.size(-1)))
                for b, row in enumerate(plan['host']):
                    for j, h in enumerate(row):
                        full[..., b, j * page:(j + 1) * page, :].copy_(self.host[h][layer][k], non_blocking=True)
                full[..., n_host * page:, :] = y
                y = full
            y = y.movedim(-3, 0)  # (B, ..., tokens, d)
            out.append(y[..., :plan['n_vis'], :] if plan['local'] is None else y.index_select(-2, plan['local']))
        if layer == self.n_layer - 1:
            self.pos, self.seq_len = self.pos + T, self.seq_len + T
        return tuple(out)
# ==== end KV caches ====
