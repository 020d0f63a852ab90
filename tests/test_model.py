"""model.py: every flag proven on CPU with tiny shapes (REFERENCE.md §1-7 for the formulas)."""
import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

from model import (GPT, GPTConfig, MoE, alibi_bias, alibi_slopes, apply_rope, rope_frequencies,
                   sinusoidal_embedding)

V = 61  # odd vocab on purpose


def tiny(**kw):
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=V, dropout=0.0)
    args.update(kw)
    return GPTConfig(**args)


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def twin(model, **kw):
    """Same weights, different (weight-compatible) flags."""
    other = GPT(GPTConfig(**{**model.config.__dict__, **kw})).eval()
    other.load_state_dict(model.state_dict())
    return other


def tokens(B=2, T=16, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- attention core: causality, manual == sdpa, cache path, for every combination -------------

COMBOS = list(itertools.product(['learned', 'sinusoidal', 'rope', 'alibi', 'none'], ['mha', 'mla']))


@pytest.mark.parametrize('pos_emb,attn_type', COMBOS)
def test_causal_leak_manual_equals_sdpa_and_cache(pos_emb, attn_type):
    m = build(pos_emb=pos_emb, attn_type=attn_type, n_kv_head=2, mla_q_rank=16)
    man = twin(m, attn_impl='manual')
    x = tokens()
    x2 = x.clone()
    x2[:, 9:] = (x2[:, 9:] + 7) % V  # change the future
    with torch.no_grad():
        for model in (m, man):
            a, b = model(x)[0], model(x2)[0]
            assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6), "future tokens leaked into the past"
            assert not torch.allclose(a[:, 9:], b[:, 9:])
        full = m(x)[0]
        torch.testing.assert_close(man(x)[0], full, atol=1e-5, rtol=1e-5)
        # cached decode (prefill 5, a chunk of 4 = bottom-right causal mask, then 1 token at a time)
        for model in (m, man):
            cache = model.make_kv_cache(2, 16)
            outs = [model(x[:, :5], kv_cache=cache)[0], model(x[:, 5:9], kv_cache=cache)[0]]
            outs += [model(x[:, t:t + 1], kv_cache=cache)[0] for t in range(9, 16)]
            assert cache.pos == 16
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_attention_weights_causal_and_normalised():
    m = build(attn_impl='manual')
    m(tokens(T=10), return_attn=True)
    assert len(m.last_attn) == 2
    att = m.last_attn[0]
    assert att.shape == (2, 4, 10, 10)
    assert (att.triu(1) == 0).all()  # attn[i, j] == 0 for every j > i
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 10))
    # return_attn also works on an sdpa model (it takes the hand-written path for that call)
    sd = twin(m, attn_impl='sdpa')
    sd(tokens(T=10), return_attn=True)
    torch.testing.assert_close(sd.last_attn[1], m.last_attn[1])


@pytest.mark.parametrize('attn_impl,pos_emb', [('sdpa', 'learned'), ('manual', 'learned'), ('sdpa', 'rope'),
                                               ('manual', 'alibi'), ('sdpa', 'alibi')])
@pytest.mark.parametrize('side', ['right', 'left'])
def test_padding_matches_each_sequence_alone(attn_impl, pos_emb, side):
    m = build(attn_impl=attn_impl, pos_emb=pos_emb)
    lengths = [10, 7, 7, 4]
    seqs = [tokens(1, L, seed=10 + i)[0] for i, L in enumerate(lengths)]
    tgts = [tokens(1, L, seed=20 + i)[0] for i, L in enumerate(lengths)]
    idx = torch.zeros(4, 10, dtype=torch.long)
    tg = torch.full((4, 10), 5)  # targets at pads are junk on purpose: pad_mask must exclude them
    pad = torch.zeros(4, 10, dtype=torch.bool)
    for b, (s, t) in enumerate(zip(seqs, tgts)):
        sl = slice(0, len(s)) if side == 'right' else slice(10 - len(s), 10)
        idx[b, sl], tg[b, sl], pad[b, sl] = s, t, True
    logits, loss = m(idx, tg, pad_mask=pad if side == 'left' else torch.tensor(lengths))
    total, count = 0.0, 0
    for b, (s, t) in enumerate(zip(seqs, tgts)):
        alone, alone_loss = m(s[None], t[None])
        torch.testing.assert_close(logits[b][pad[b]], alone[0], atol=1e-5, rtol=1e-5)
        total, count = total + alone_loss.item() * len(s), count + len(s)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)  # pads are not in the loss


@pytest.mark.parametrize('pos_emb', ['learned', 'rope', 'alibi'])
def test_left_padded_batch_decodes_like_each_prompt_alone(pos_emb):
    m = build(pos_emb=pos_emb)
    prompts = [tokens(1, 6, seed=30)[0], tokens(1, 3, seed=31)[0]]
    nxt = tokens(2, 4, seed=32)  # tokens fed after the prompts
    idx = torch.zeros(2, 6, dtype=torch.long)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, 6 - len(p):], pad[b, 6 - len(p):] = p, True
    cache = m.make_kv_cache(2, 10)
    with torch.no_grad():
        outs = [m(idx, kv_cache=cache, pad_mask=pad)[0][:, -1]]
        for t in range(4):  # pad_mask covers every visible key: past and new
            pad = torch.cat([pad, torch.ones(2, 1, dtype=torch.bool)], 1)
            outs.append(m(nxt[:, t:t + 1], kv_cache=cache, pad_mask=pad)[0][:, -1])
        for b, p in enumerate(prompts):
            alone = m(torch.cat([p, nxt[b]])[None])[0][0, len(p) - 1:]
            torch.testing.assert_close(torch.stack([o[b] for o in outs]), alone, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_give_zeros_not_nan():
    for impl in ('sdpa', 'manual'):
        m = build(attn_impl=impl)
        m.train()
        x = tokens(T=8)
        block = torch.ones(8, 8, dtype=torch.bool)
        block[3] = False  # query 3 may attend nothing
        logits, loss = m(x, x, attn_mask=block)
        loss.backward()
        assert torch.isfinite(logits).all() and torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    m(x, attn_mask=block, return_attn=True)
    assert (m.last_attn[0][:, :, 3] == 0).all()


def test_selective_mask_blocks_positions_and_changes_loss():
    m = build()
    x = tokens(T=12)
    blocked = torch.tensor([2, 5])
    sel = torch.ones(12, 12, dtype=torch.bool)
    sel[:, blocked] = False  # e.g. "block attention to determiners"
    sel[blocked, blocked] = True  # a token may still see itself (so no row is empty)
    _, base = m(x, x)
    _, loss = m(x, x, attn_mask=sel, return_attn=True)
    for att in m.last_attn:
        for j in blocked.tolist():
            assert (att[:, :, j + 1:, j] == 0).all()
    assert not math.isclose(loss.item(), base.item(), rel_tol=1e-6)
    # same thing through sdpa
    _, loss_sdpa = m(x, x, attn_mask=sel)
    assert loss_sdpa.item() == pytest.approx(loss.item(), rel=1e-5)


def test_manual_equals_sdpa_with_every_mask_combined():
    m = build(pos_emb='alibi', n_head=4, n_kv_head=1, sliding_window=5, attn_sinks=2)
    man = twin(m, attn_impl='manual')
    x = tokens(T=14)
    pad = torch.ones(2, 14, dtype=torch.bool)
    pad[1, :3] = False  # left padding
    sel = torch.rand(2, 1, 14, 14, generator=torch.Generator().manual_seed(0)) > 0.2
    a, la = m(x, x, pad_mask=pad, attn_mask=sel)
    b, lb = man(x, x, pad_mask=pad, attn_mask=sel)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la, lb)


def test_loss_mask_and_ignore_index():
    m = build()
    x, y = tokens(T=12), tokens(T=12, seed=3)
    mask = (torch.arange(12) % 3 != 0).float().expand(2, 12)
    logits, loss = m(x, y, loss_mask=mask)
    ce = F.cross_entropy(logits.view(-1, V), y.view(-1), reduction='none')
    assert loss.item() == pytest.approx((ce * mask.reshape(-1)).sum().item() / mask.sum().item(), rel=1e-5)
    y2 = y.clone()
    y2[mask == 0] = (y2[mask == 0] + 1) % V  # masked-out targets do not matter
    assert m(x, y2, loss_mask=mask)[1].item() == pytest.approx(loss.item(), rel=1e-6)
    y3 = y.clone()
    y3[mask == 0] = -1  # -1 ignored: same loss without a mask
    assert m(x, y3)[1].item() == pytest.approx(loss.item(), rel=1e-6)
    ls = m(x, y, label_smoothing=0.1)[1]
    assert ls.item() == pytest.approx(F.cross_entropy(logits.view(-1, V), y.view(-1), label_smoothing=0.1).item(),
                                      rel=1e-5)


# ---- positions -------------------------------------------------------------------------------

def rope_tables(pos, dim=16, **kw):
    inv_freq, mscale = rope_frequencies(dim, 10000.0, **kw)
    ang = torch.as_tensor(pos, dtype=torch.float32)[None, :, None] * inv_freq
    return (ang.cos() * mscale)[:, :, None, :], (ang.sin() * mscale)[:, :, None, :]


def test_rope_preserves_norm_and_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    pos = torch.arange(200)
    cos, sin = rope_tables(pos)
    qs = apply_rope(q.expand(1, 200, 1, 16), cos, sin)
    torch.testing.assert_close(qs.norm(dim=-1), q.norm(dim=-1).expand(1, 200, 1), atol=1e-6, rtol=0)
    ks = apply_rope(k.expand(1, 200, 1, 16), cos, sin)
    dot = lambda m_, n_: (qs[0, m_, 0] * ks[0, n_, 0]).sum()
    assert dot(5, 2).item() == pytest.approx(dot(105, 102).item(), abs=1e-5)
    assert dot(5, 2).item() != pytest.approx(dot(5, 3).item(), abs=1e-3)


def model_rope_tables(model, pos):
    """cos, sin as the model builds them for its attention (rope_frequencies + angles in attn_inputs)."""
    pos = torch.as_tensor(pos)[None]
    a = model.attn_inputs(pos.size(1), pos.size(1), kpos=pos, qpos=pos, pad_mask=None, attn_mask=None,
                          return_attn=False, device=pos.device)
    return a.cos, a.sin  # (1, 1, T, d/2)


def test_rope_rotates_by_hand_computed_angles():
    m = build(pos_emb='rope', n_embd=8, n_head=2)  # head_dim 4: pairs (0, 2) at theta_0 = 1, (1, 3) at 1e4^(-1/2)
    cos, sin = model_rope_tables(m, [0, 1, 2, 3])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = apply_rope(x.view(1, 1, 1, 4), cos[:, :, 3:], sin[:, :, 3:]).flatten().tolist()
    c0, s0, c1, s1 = math.cos(3.0), math.sin(3.0), math.cos(0.03), math.sin(0.03)  # position 3 * theta_i
    want = [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1]  # (x1 cos - x2 sin, x2 cos + x1 sin)
    assert got == pytest.approx(want, abs=1e-6)


def rotate_half(x):  # HF Llama's reference
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def test_rope_equals_rotate_half_reference():
    torch.manual_seed(0)
    m = build(pos_emb='rope')  # head_dim 8
    pos = torch.arange(40)
    cos, sin = model_rope_tables(m, pos)
    q = torch.randn(2, 4, 40, 8)
    # HF LlamaRotaryEmbedding: inv_freq = 1 / base^(2i/d), freqs duplicated over both halves; float64 here
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    emb = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)
    want = q.double() * emb.cos() + rotate_half(q.double()) * emb.sin()
    torch.testing.assert_close(apply_rope(q, cos, sin), want.float(), atol=1e-5, rtol=0)


def test_rope_linear_interpolation_maps_positions_exactly():
    cos_pi, sin_pi = rope_tables([4 * m for m in range(50)], scaling='linear', factor=4.0)
    cos, sin = rope_tables(list(range(50)))
    torch.testing.assert_close(cos_pi, cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin_pi, sin, atol=1e-6, rtol=0)


def test_rope_ntk_dynamic_yarn_match_reference_examples():
    d, s = 128, 4.0
    base_inv, _ = rope_frequencies(d, 10000.0)
    ntk, _ = rope_frequencies(d, 10000.0, 'ntk', s)
    base_prime = 10000.0 * s ** (d / (d - 2))
    assert base_prime == pytest.approx(40889.9, abs=0.1)  # REFERENCE §2.4 worked example
    assert ntk[0].item() == 1.0  # highest frequency untouched
    assert ntk[-1].item() == pytest.approx(base_inv[-1].item() / s, rel=1e-5)  # lowest interpolated by s
    # dynamic: original base up to L, then base' = base*((s*L'/L) - (s-1))^(d/(d-2))
    dyn_short, _ = rope_frequencies(d, 10000.0, 'dynamic', s, orig_len=2048, seq_len=2048)
    torch.testing.assert_close(dyn_short, base_inv)
    dyn, _ = rope_frequencies(d, 10000.0, 'dynamic', s, orig_len=2048, seq_len=4096)
    b2 = 10000.0 * (s * 2 - (s - 1)) ** (d / (d - 2))
    torch.testing.assert_close(dyn, (b2 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)).float())
    # YaRN, d=128, base 1e4, L=4096: low=20, high=46; s=4 -> mscale 1.1386, logit factor 1.2965
    yarn, mscale = rope_frequencies(d, 10000.0, 'yarn', s, orig_len=4096)
    torch.testing.assert_close(yarn[:21], base_inv[:21])  # i <= low kept
    torch.testing.assert_close(yarn[46:], base_inv[46:] / s)  # i >= high interpolated
    assert (yarn[21:46] < base_inv[21:46]).all() and (yarn[21:46] > base_inv[21:46] / s).all()
    assert mscale == pytest.approx(1.1386, abs=1e-4) and mscale ** 2 == pytest.approx(1.2965, abs=1e-4)


@pytest.mark.parametrize('scaling', ['none', 'linear', 'ntk', 'dynamic', 'yarn'])
def test_rope_scalings_run_at_8192_positions(scaling):
    m = build(pos_emb='rope', rope_scaling=scaling, rope_factor=8.0, n_layer=1, n_head=2, n_embd=16,
              block_size=1024)
    with torch.no_grad():
        logits, _ = m(tokens(1, 8192))
    assert logits.shape == (1, 8192, V) and torch.isfinite(logits).all()


def test_dynamic_ntk_cached_decode_is_exact():
    # keys are cached before RoPE and rotated with the current base, so decode == full forward (1 layer)
    m = build(pos_emb='rope', rope_scaling='dynamic', rope_factor=2.0, n_layer=1, block_size=8)
    x = tokens(1, 20)
    cache = m.make_kv_cache(1, 20)
    with torch.no_grad():
        for t in range(20):
            step = m(x[:, t:t + 1], kv_cache=cache)[0][:, -1]
            if t in (5, 12, 19):
                torch.testing.assert_close(step, m(x[:, :t + 1])[0][:, -1], atol=1e-5, rtol=1e-5)


def test_alibi_slopes_and_bias():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -k for k in range(1, 9)])
    expect12 = [2 ** -k for k in range(1, 9)] + [0.7071, 0.3536, 0.1768, 0.0884]
    assert alibi_slopes(12).tolist() == pytest.approx(expect12, abs=1e-4)
    pos = torch.arange(101)[None]
    bias = alibi_bias(alibi_slopes(8), pos, pos)[0]  # (H, T, S)
    for h in range(8):
        assert bias[h, 100, 0] < bias[h, 100, 50] < bias[h, 100, 100] == 0
    assert bias[0, 7, 3].item() == pytest.approx(-0.5 * 4)
    m = build(pos_emb='alibi', block_size=16)  # no position table: runs past the training length
    assert torch.isfinite(m(tokens(1, 64))[0]).all()


def test_sinusoidal_is_a_fixed_rotation_of_position():
    pe = sinusoidal_embedding(torch.arange(64), 16)
    assert pe.shape == (64, 16)
    assert pe[0, 0::2].abs().max() == 0 and (pe[0, 1::2] == 1).all()  # sin(0), cos(0)
    k = 5  # PE(p+k) = R_k PE(p) with R_k independent of p: check with two p's
    w = 10000.0 ** (-torch.arange(0, 16, 2).float() / 16)
    c, s = (k * w).cos(), (k * w).sin()
    for p in (3, 40):
        sin_p, cos_p = pe[p, 0::2], pe[p, 1::2]
        torch.testing.assert_close(pe[p + k, 0::2], sin_p * c + cos_p * s, atol=1e-5, rtol=0)
        torch.testing.assert_close(pe[p + k, 1::2], cos_p * c - sin_p * s, atol=1e-5, rtol=0)


def test_nope_is_permutation_invariant_in_the_prefix():
    m = build(pos_emb='none', n_layer=1)
    x = tokens(1, 10)
    perm = torch.cat([torch.randperm(9, generator=torch.Generator().manual_seed(0)), torch.tensor([9])])
    torch.testing.assert_close(m(x)[0][:, -1], m(x[:, perm])[0][:, -1], atol=1e-5, rtol=1e-5)


# ---- attention variants ----------------------------------------------------------------------

def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    g = build(n_kv_head=2)
    assert build(n_kv_head=4).state_dict().keys() == build().state_dict().keys()
    torch.testing.assert_close(build(n_kv_head=4)(tokens())[0], build(n_kv_head=None)(tokens())[0])
    mha = build(n_kv_head=4)
    sd = g.state_dict()
    hd, C = 8, 32
    for i in range(2):
        w, b = sd[f'transformer.h.{i}.attn.c_attn.weight'], sd[f'transformer.h.{i}.attn.c_attn.bias']
        def expand(t):
            q, k, v = t.split([C, 2 * hd, 2 * hd])
            rep = lambda z: z.view(2, hd, *z.shape[1:]).repeat_interleave(2, 0).reshape(4 * hd, *z.shape[1:])
            return torch.cat([q, rep(k), rep(v)])
        sd[f'transformer.h.{i}.attn.c_attn.weight'], sd[f'transformer.h.{i}.attn.c_attn.bias'] = expand(w), expand(b)
    mha.load_state_dict(sd)
    torch.testing.assert_close(mha(tokens())[0], g(tokens())[0], atol=1e-5, rtol=1e-5)
    assert g.kv_bytes_per_token(torch.float32) * 2 == mha.kv_bytes_per_token(torch.float32)


def test_mla_shapes_backward_and_latent_cache():
    m = build(attn_type='mla', pos_emb='rope', mla_q_rank=16, mla_kv_rank=12, mla_rope_dim=4)
    m.train()
    logits, loss = m(tokens(), tokens(seed=2))
    loss.backward()
    assert logits.shape == (2, 16, V)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    cache = m.make_kv_cache(2, 20, dtype=torch.float32)
    m(tokens(T=7), kv_cache=cache)
    assert cache.nbytes() == 2 * 2 * 20 * (12 + 4) * 4  # layers * B * max_len * (latent + rope key) * fp32
    assert m.kv_bytes_per_token(torch.bfloat16) == 2 * (12 + 4) * 2
    assert m.kv_bytes_per_token('float32') == 2 * (12 + 4) * 4


def window_allowed(model, T):
    model(tokens(1, T), return_attn=True)
    return model.last_attn[0][0, 0] > 0


def test_sliding_window():
    full = build(attn_impl='manual')
    x = tokens(T=12)
    for W in (12, 40):  # W >= T: identical to full attention
        torch.testing.assert_close(twin(full, sliding_window=W)(x)[0], full(x)[0])
    m = twin(full, sliding_window=4)
    allowed = window_allowed(m, 12)
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing='ij')
    assert torch.equal(allowed, (j <= i) & (i - j < 4))  # W keys including self
    assert allowed.sum(-1).tolist() == [min(r + 1, 4) for r in range(12)]
    assert not torch.allclose(m(x)[0], full(x)[0])


def test_attention_sinks_keep_first_keys():
    m = build(attn_impl='manual', sliding_window=3, attn_sinks=2)
    allowed = window_allowed(m, 12)
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing='ij')
    assert torch.equal(allowed, (j <= i) & ((i - j < 3) | (j < 2)))
    assert allowed[:, :2][2:].all()  # every later query still sees the sinks


class EvictingCache:
    """A streaming cache written from the model-side contract in model.py: keeps the first `sinks`
    tokens and the most recent `keep - sinks` ones between calls."""

    def __init__(self, n_layer, keep, sinks):
        self.n_layer, self.keep, self.sinks, self.pos = n_layer, keep, sinks, 0
        self.store = [None] * n_layer

    def update(self, layer_idx, *tensors):
        old = self.store[layer_idx]
        out = tuple(t if old is None else torch.cat([o, t], -2) for o, t in zip(old or tensors, tensors))  # time: -2
        self.store[layer_idx] = tuple(torch.cat([o[..., :self.sinks, :], o[..., -(self.keep - self.sinks):, :]], -2)
                                      if o.size(-2) > self.keep else o for o in out)
        if layer_idx == self.n_layer - 1:
            self.pos += tensors[0].size(-2)
        return out


@pytest.mark.parametrize('attn_type', ['mha', 'mla'])
def test_streaming_sinks_decode_forever(attn_type):
    S, W = 2, 4
    m = build(n_layer=1, pos_emb='rope', sliding_window=W, attn_sinks=S, block_size=16, attn_type=attn_type)
    x = tokens(1, 40)
    cache = EvictingCache(1, S + W - 1, S)
    with torch.no_grad():
        outs = [m(x[:, t:t + 1], kv_cache=cache)[0] for t in range(40)]  # 40 > block_size
        full = m(x[:, :S + W])[0]
        torch.testing.assert_close(torch.cat(outs[:S + W], 1), full, atol=1e-5, rtol=1e-5)  # before eviction
        for t in (20, 39):  # after eviction = a forward over [sinks, last W-1 tokens, new token], re-indexed
            kept = torch.cat([x[:, :S], x[:, t - W + 1:t + 1]], 1)
            torch.testing.assert_close(outs[t][:, -1], m(kept)[0][:, -1], atol=1e-5, rtol=1e-5)
    assert all(t.size(-2) == S + W - 1 for t in cache.store[0])
    for kind in ('contiguous', 'paged'):  # model.py's own caches honour the same contract
        real = m.make_kv_cache(1, 16, kind=kind, page_size=4)
        with torch.no_grad():
            got = [m(x[:, t:t + 1], kv_cache=real)[0] for t in range(40)]
        torch.testing.assert_close(torch.cat(got, 1), torch.cat(outs, 1), atol=1e-5, rtol=1e-5)


def test_qk_norm_changes_output_and_trains():
    m = build(pos_emb='rope', qk_norm=True)
    assert not torch.allclose(m(tokens())[0], twin(m, qk_norm=False)(tokens())[0])
    assert loss_drops(qk_norm=True, pos_emb='rope')


@pytest.mark.parametrize('attn_type', ['mha', 'mla'])
def test_qk_norm_gives_unit_rms_q_and_k(attn_type, monkeypatch):
    """The q and k that reach attention have RMS 1 over head_dim, per head and position, only with qk_norm."""
    seen = []
    sdpa = F.scaled_dot_product_attention
    def spy(q, k, v, **kw):
        seen.append((q, k))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    m = build(pos_emb='rope', qk_norm=True, n_kv_head=2, attn_type=attn_type)
    for model, normed in ((m, True), (twin(m, qk_norm=False), False)):
        seen.clear()
        with torch.no_grad():
            model(tokens())
        assert len(seen) == 2  # one call per layer
        for q, k in seen:
            for t in (q, k):
                rms = t.square().mean(-1).sqrt()  # (B, heads, T)
                if normed:
                    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
                else:
                    assert (rms - 1).abs().min() > 0.5


# ---- norms, MLPs, training -------------------------------------------------------------------

def loss_drops(steps=25, **kw):
    torch.manual_seed(0)
    m = GPT(tiny(n_layer=1, block_size=16, **kw))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x, y = tokens(4, 16), tokens(4, 16, seed=5)
    first = None
    for _ in range(steps):
        _, loss = m(x, y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item() < 0.6 * first


def test_norms():
    from model import Norm
    x = torch.randn(4, 32) * 3 + 1
    ln, rms, rms0 = Norm(32, 'layernorm'), Norm(32, 'rmsnorm'), Norm(32, 'rmsnorm_noparam')
    torch.testing.assert_close(ln(x).mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(ln(x).var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(rms0(x).square().mean(-1).sqrt(), torch.ones(4), atol=1e-4, rtol=0)
    assert len(list(rms0.parameters())) == 0 and len(list(rms.parameters())) == 1
    assert len(list(Norm(32, 'layernorm', bias=False).parameters())) == 1


@pytest.mark.parametrize('kw', [dict(norm='layernorm'), dict(norm='rmsnorm'), dict(norm='rmsnorm_noparam'),
                                dict(emb_norm=True), dict(mlp='gelu_tanh'), dict(mlp='relu2'),
                                dict(mlp='swiglu'), dict(mlp='gelu', mlp_ratio=2.0), dict(bias=False)])
def test_variant_trains(kw):
    m = build(**kw)
    assert m(tokens())[0].shape == (2, 16, V)
    assert loss_drops(**kw)


@pytest.mark.parametrize('norm', ['layernorm', 'rmsnorm', 'rmsnorm_noparam'])
@pytest.mark.parametrize('pos_emb', ['rope', 'learned'])
def test_emb_norm_normalises_the_token_embedding(norm, pos_emb):
    """With emb_norm block 0 gets the normalised token embedding (learned positions are added after the norm)."""
    x = tokens()
    for emb_norm in (True, False):
        m = build(emb_norm=emb_norm, norm=norm, pos_emb=pos_emb)
        seen = []
        m.transformer.h[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        with torch.no_grad():
            m(x)
        h = seen[0] - (m.transformer.wpe.weight[:16] if pos_emb == 'learned' else 0)
        e = m.transformer.wte.weight[x].detach()
        rms = h.square().mean(-1).sqrt()
        if not emb_norm:
            torch.testing.assert_close(h, e)
            assert rms.max() < 0.1  # N(0, 0.02) rows: far from unit scale
            continue
        if norm == 'layernorm':  # weight 1, bias 0 at init; eps 1e-5 (it shows: var(e) is only 4e-4)
            want = (e - e.mean(-1, keepdim=True)) / (e.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
            assert h.mean(-1).abs().max() < 1e-5
        else:  # RMSNorm, eps 1e-6
            want = e / (e.square().mean(-1, keepdim=True) + 1e-6).sqrt()
        torch.testing.assert_close(h, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=0.03, rtol=0)


def test_mlp_variants_and_param_counts():
    from model import MLP
    x = torch.randn(3, 384)
    c = lambda **kw: GPTConfig(n_embd=384, n_head=6, bias=False, **kw)
    gelu, swiglu = MLP(c()), MLP(c(mlp='swiglu'))
    assert sum(p.numel() for p in gelu.parameters()) == sum(p.numel() for p in swiglu.parameters())  # 8d^2
    assert swiglu.c_proj.in_features == 1024  # 2/3 * 4 * 384
    assert MLP(c(mlp_ratio=2.0)).c_fc.out_features == 768
    relu2 = MLP(c(mlp='relu2'))
    relu2.load_state_dict(gelu.state_dict())
    h = gelu.c_fc(x)
    torch.testing.assert_close(relu2(x), relu2.c_proj(F.relu(h) ** 2))
    tanh = MLP(c(mlp='gelu_tanh'))
    tanh.load_state_dict(gelu.state_dict())
    torch.testing.assert_close(tanh(x), tanh.c_proj(F.gelu(h, approximate='tanh')))


# ---- MoE -------------------------------------------------------------------------------------

def moe_cfg(**kw):
    return tiny(n_layer=1, n_experts=4, moe_top_k=2, **kw)


def test_moe_routes_each_token_to_top_k_plus_shared():
    torch.manual_seed(0)
    moe = MoE(moe_cfg(n_shared_experts=1))
    seen = {}
    for name, mod in [('shared', moe.shared)] + [(f'e{i}', e) for i, e in enumerate(moe.experts)]:
        mod.register_forward_hook(lambda mod_, inp, out, name=name: seen.__setitem__(name, inp[0].size(0)))
    x = torch.randn(2, 5, 32)
    y = moe(x)
    assert y.shape == x.shape
    assert seen['shared'] == 10 and sum(v for k, v in seen.items() if k != 'shared') == 10 * 2
    f, dropped, probs = moe.stats
    assert f.sum().item() == pytest.approx(2.0) and dropped.item() == 0 and probs.shape == (10, 4)


def test_moe_single_expert_equals_dense_mlp():
    torch.manual_seed(0)
    dense = build(n_layer=1)
    moe = GPT(tiny(n_layer=1, n_experts=1, moe_top_k=1, moe_aux_coef=0.0, moe_z_coef=0.0)).eval()
    sd = {k.replace('mlp.experts.0.', 'mlp.'): v for k, v in moe.state_dict().items() if 'router' not in k}
    dense.load_state_dict(sd)
    torch.testing.assert_close(moe(tokens())[0], dense(tokens())[0])


def test_moe_aux_and_z_loss():
    moe = MoE(moe_cfg())
    x = torch.randn(64, 32)
    torch.nn.init.zeros_(moe.router.weight)  # uniform router probabilities: the minimum, = top_k (HF form)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(2.0)
    assert moe.z_loss.item() == pytest.approx(math.log(4) ** 2, rel=1e-5)
    with torch.no_grad():
        moe.router.weight[0] = 1.0  # skewed routing
    moe(x.abs())
    assert moe.aux_loss.item() > 2.0 and moe.z_loss.item() >= 0
    m = GPT(moe_cfg())
    _, loss = m(tokens(), tokens(seed=4))
    assert set(m.aux_losses) == {'moe_aux', 'moe_z'}
    m2 = GPT(GPTConfig(**{**m.config.__dict__, 'moe_aux_coef': 0.0, 'moe_z_coef': 0.0}))
    m2.load_state_dict(m.state_dict())
    extra = loss - m2(tokens(), tokens(seed=4))[1]
    want = 0.01 * m.aux_losses['moe_aux'] + 0.001 * m.aux_losses['moe_z']
    assert extra.item() == pytest.approx(want.item(), rel=1e-4)


def test_moe_loss_is_cross_entropy_in_eval_and_adds_aux_terms_in_train():
    """Val loss/ppl/bpb are the cross-entropy alone; training adds moe_aux_coef*aux + moe_z_coef*z."""
    m = GPT(tiny(n_experts=4, moe_top_k=2, moe_aux_coef=0.5, moe_z_coef=0.1))
    x, y = tokens(), tokens(seed=4)
    for training in (False, True):
        m.train(training)
        logits, loss = m(x, y)
        ce = F.cross_entropy(logits.view(-1, V), y.view(-1))
        assert set(m.aux_losses) == {'moe_aux', 'moe_z'}  # reported in both modes
        want = ce + 0.5 * m.aux_losses['moe_aux'] + 0.1 * m.aux_losses['moe_z'] if training else ce
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        if training:
            assert loss.item() > ce.item() + 0.5  # the aux terms are really there (z-loss >= 0, aux >= top_k)


def test_moe_capacity_drops_tokens_and_reports():
    torch.manual_seed(0)
    moe = MoE(moe_cfg(moe_capacity=0.5))
    with torch.no_grad():
        moe.router.weight[0] = 2.0  # everyone wants expert 0
    x = torch.randn(40, 32).abs()
    y = moe(x)
    f, dropped, _ = moe.stats
    assert 0 < dropped.item() < 1
    probs = moe.router(x).softmax(-1)
    chosen = probs.topk(2, -1).indices
    assert (chosen == 0).sum() == 40  # all 40 chose expert 0, capacity ceil(2*40/4*0.5) = 10
    m = GPT(moe_cfg(moe_capacity=0.5))
    m(tokens())
    st = m.moe_stats()
    assert len(st) == 1 and sum(st[0]['load']) == pytest.approx(1.0) and 0 <= st[0]['dropped_frac'] < 1
    # a token dropped by every expert it chose gets exactly 0 from the MoE
    moe.top_k = 1
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 2.0
    y = moe(x)
    assert (y[10:] == 0).all() and (y[:10] != 0).any()


def test_moe_total_vs_active_params_and_flops():
    dense = GPT(tiny())
    moe = GPT(tiny(n_experts=4, moe_top_k=1, n_shared_experts=1))
    per_expert = sum(p.numel() for p in dense.transformer.h[0].mlp.parameters())
    router = 4 * 32
    assert moe.num_params() == dense.num_params() + 2 * (3 * per_expert + per_expert + router)  # 4 routed + 1 shared
    assert moe.num_active_params() == dense.num_params() + 2 * (per_expert + router)  # 1 routed + shared
    assert moe.flops_per_token() - dense.flops_per_token() == 6 * 2 * (per_expert + router)


# ---- head, init, counts ----------------------------------------------------------------------

def test_softcap_bounds_logits():
    m = build(logit_softcap=2.0, tie_weights=False)
    with torch.no_grad():
        m.lm_head.weight.mul_(30)  # raw logits well beyond the cap (not so far that tanh rounds to 1)
    logits = m(tokens())[0]
    assert logits.abs().max() < 2.0 and logits.dtype == torch.float32
    raw = twin(m, logit_softcap=0.0)(tokens())[0]
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))


def test_zero_init_makes_blocks_identity():
    m = build(zero_init=True, tie_weights=False, n_experts=2, n_shared_experts=1)
    outs = []
    for b in m.transformer.h:
        b.attn.register_forward_hook(lambda mod, i, o: outs.append(o))
        b.mlp.register_forward_hook(lambda mod, i, o: outs.append(o))
    logits, loss = m(tokens(), tokens(seed=3))
    assert len(outs) == 4 and all((o == 0).all() for o in outs)
    assert (logits == 0).all()
    assert loss.item() == pytest.approx(math.log(V), abs=1e-5)  # eval mode: cross-entropy alone = ln V exactly


def test_init_std():
    torch.manual_seed(0)
    m = GPT(tiny(n_embd=256, n_head=4, n_layer=2))
    std = lambda t: t.float().std().item()
    assert std(m.transformer.h[0].mlp.c_fc.weight) == pytest.approx(0.02, rel=0.02)
    assert std(m.transformer.h[0].mlp.c_proj.weight) == pytest.approx(0.02 / math.sqrt(4), rel=0.02)
    assert std(m.transformer.wte.weight) == pytest.approx(0.02, rel=0.02)
    assert (m.transformer.h[0].attn.c_attn.bias == 0).all()
    m2 = GPT(tiny(n_embd=256, n_head=4, init_std=0.05))
    assert std(m2.transformer.h[1].attn.c_attn.weight) == pytest.approx(0.05, rel=0.02)


def test_tied_weights_share_storage():
    m = build()
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    u = build(tie_weights=False)
    assert u.lm_head.weight.data_ptr() != u.transformer.wte.weight.data_ptr()
    assert u.num_params(non_embedding=False) - m.num_params(non_embedding=False) == V * 32


def test_grad_checkpoint_same_grads():
    torch.manual_seed(0)
    a = GPT(tiny(n_experts=2, moe_top_k=1, n_shared_experts=1, pos_emb='rope'))
    b = GPT(GPTConfig(**{**a.config.__dict__, 'grad_checkpoint': True}))
    b.load_state_dict(a.state_dict())
    x, y = tokens(), tokens(seed=7)
    for m in (a, b):
        m.train()
        m(x, y)[1].backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_gpt2_small_counts_and_estimates():
    with torch.device('meta'):
        m = GPT(GPTConfig())  # classic GPT-2 124M defaults, no memory used
    assert m.num_params() == 123_689_472  # nanoGPT prints "123.69M" (wpe excluded)
    assert m.num_params(non_embedding=False) == 123_689_472 + 1024 * 768
    assert m.flops_per_token() == 6 * 123_689_472 + 12 * 12 * 12 * 64 * 1024  # 6N + 12*L*H*Dh*T
    assert m.kv_bytes_per_token(torch.bfloat16) == 36_864  # REFERENCE §11.1
    with torch.device('meta'):
        assert GPT(GPTConfig(n_kv_head=4)).kv_bytes_per_token(torch.bfloat16) == 12_288
        assert GPT(GPTConfig(sliding_window=128)).flops_per_token() == 6 * 123_689_472 + 12 * 12 * 12 * 64 * 128


def test_forward_reads_flags_resolved_in_init_not_config():
    class NoConfig:
        def __getattr__(self, name):
            raise AssertionError(f"forward read config.{name}: resolve it in GPT.__init__")
    for kw in (dict(pos_emb='rope', rope_scaling='dynamic', rope_factor=2.0, block_size=8, emb_norm=True, qk_norm=True),
               dict(pos_emb='alibi', sliding_window=4, attn_sinks=2, attn_impl='manual', logit_softcap=5.0),
               dict(pos_emb='learned', n_experts=2, moe_top_k=1, grad_checkpoint=True),
               dict(attn_type='mla', pos_emb='rope', rope_scaling='yarn', rope_factor=2.0, sliding_window=6)):
        m = build(**kw)
        cache = m.make_kv_cache(2, 20)
        m.config = NoConfig()
        m.train()
        m(tokens(), tokens(seed=2))[1].backward()
        m.eval()
        with torch.no_grad():
            m(tokens(T=5), kv_cache=cache, return_attn=True)
            m(tokens(T=1), kv_cache=cache)


def test_head_dim_and_rope_dim_have_one_home():
    assert tiny().head_dim == 8 and tiny().rope_dim == 8
    mla = tiny(attn_type='mla', mla_rope_dim=4)
    assert mla.head_dim == 8 and mla.rope_dim == 4
    assert tiny(attn_type='mla').rope_dim == 4  # default head_dim // 2
    m = GPT(mla)
    assert m.rope_dim == 4 and m.transformer.h[0].attn.head_dim == 8 and m.transformer.h[0].attn.rope_dim == 4


def test_config_roundtrip_and_validation():
    from dataclasses import asdict
    c = tiny(attn_type='mla', n_kv_head=None)
    assert GPTConfig(**asdict(c)) == c and c.n_kv_head == 4
    for bad in (dict(n_embd=30), dict(n_kv_head=3), dict(pos_emb='rotary'), dict(n_experts=2, moe_top_k=3)):
        with pytest.raises(ValueError):
            tiny(**bad)


def test_set_dropout_and_bf16_autocast():
    m = build(dropout=0.1)
    m.set_dropout(0.3)
    ps = [mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    assert len(ps) == 1 + 2 * 3 and all(p == 0.3 for p in ps)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, loss = m(tokens(), tokens(seed=2))
    assert logits.dtype == torch.float32 and torch.isfinite(loss)



def test_keep_mask_is_bernoulli_and_dropout_scales():
    from model import dropout, keep_mask
    torch.manual_seed(0)
    keep, scale = keep_mask((400, 1000), 0.2, torch.bfloat16)
    assert keep.dtype == torch.bfloat16 and set(keep.unique().tolist()) == {0.0, 1.0} and scale == 65536 / 52429
    k = keep.float()
    assert abs(k.mean().item() - 0.8) < 0.003  # 400k draws: std 0.0006
    for lag in (1, 2, 3, 4, 5):  # the four lanes of one draw, and neighbouring draws, are independent
        assert abs((k[:, lag:] * k[:, :-lag]).mean().item() - 0.64) < 0.004
    assert abs(k[:, 0::4].mean().item() - k[:, 3::4].mean().item()) < 0.006  # no lane is biased
    torch.manual_seed(0)
    assert torch.equal(keep_mask((400, 1000), 0.2, torch.bfloat16)[0], keep)  # the global generator governs it
    x = torch.randn(64, 512, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.3, True)
    torch.manual_seed(1)
    mask, s = keep_mask(x.shape, 0.3, x.dtype)
    assert torch.equal(y, x * mask * s) and abs(s - 1 / 0.7) < 1e-4
    y.sum().backward()
    assert torch.equal(x.grad, mask * s)  # backward multiplies by the same mask
    assert dropout(x, 0.3, False) is x and dropout(x, 0.0, True) is x
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    import model as model_module
    model_module.FAST_CPU_DROPOUT = False  # PyTorch's stock kernel, bench.py's nanoGPT-equivalent baseline
    try:
        torch.manual_seed(2)
        y = dropout(x, 0.3, True)
        torch.manual_seed(2)
        assert torch.equal(y, F.dropout(x, 0.3, True))
    finally:
        model_module.FAST_CPU_DROPOUT = True


@pytest.mark.parametrize('kw', [dict(), dict(n_kv_head=2), dict(sliding_window=5), dict(pos_emb='alibi'),
                                dict(block_rows=5), dict(n_kv_head=2, block_rows=6)])
def test_cpu_training_attention_dropout_is_the_formula(kw, monkeypatch):
    """With dropout in training mode on CPU, attention weights are softmax(QK^T*scale + mask) times a keep mask,
    and the output is (P*keep)V/(1-p): rebuilt here from the same keep_mask draws, and with p -> 0 it is the
    eval-mode (SDPA) output. Causal attention runs as blocks of query rows over the keys up to their end
    (block_rows: blocks of 5 or 6 of the 17 rows), each block drawing its own mask."""
    import model as model_module
    from model import causal_blocks, keep_mask
    kw = dict(kw)
    monkeypatch.setattr(model_module, 'CAUSAL_BLOCK', kw.pop('block_rows', model_module.CAUSAL_BLOCK))
    m = build(dropout=0.25, **kw)
    attn = m.transformer.h[0].attn
    x = torch.randn(3, 17, 32)
    T = x.size(1)
    a = m.attn_inputs(T, T, torch.arange(T)[None], torch.arange(T)[None], None, None, False, 'cpu')
    attn.train()
    torch.manual_seed(5)
    y = attn(x, a)
    B, H, hd = 3, 4, 8
    q, k, v = attn.c_attn(x).split([H * hd, attn.n_kv_head * hd, attn.n_kv_head * hd], dim=-1)
    q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(H // k.size(1), 1), v.repeat_interleave(H // v.size(1), 1)
    s = (q @ k.transpose(-2, -1)) * hd ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if a.bias is not None:
        s = s + a.bias
    s = s.masked_fill(~(causal if a.allowed is None else a.allowed), float('-inf'))
    torch.manual_seed(5)
    if a.is_causal:  # the blocks' masks, in order, placed in the square (beyond a block's keys P is 0 anyway)
        keep = torch.zeros(B, H, T, T)
        for start, end in causal_blocks(T):
            keep[:, :, start:end, :end], scale = keep_mask((B, H, end - start, end), 0.25, torch.float32)
        assert len(causal_blocks(T)) == (1 if model_module.CAUSAL_BLOCK >= T else -(-T // model_module.CAUSAL_BLOCK))
        assert 0.6 < keep[causal.expand_as(keep)].mean() < 0.9
    else:
        keep, scale = keep_mask((B, H, T, T), 0.25, torch.float32)
        assert 0.6 < keep.mean() < 0.9
    ref = ((s.softmax(-1) * keep) @ v * scale).transpose(1, 2).reshape(B, T, H * hd)
    torch.manual_seed(5)
    resid = attn.resid_dropout  # the residual dropout draws after the weights' mask: turn it off to compare
    resid.p = 0.0
    assert torch.allclose(attn(x, a), attn.c_proj(ref), atol=1e-6)
    resid.p = 0.25
    assert not torch.allclose(y, attn.c_proj(ref), atol=1e-3)  # with it on, the residual mask did act
    for mod in (attn.attn_dropout, resid):
        mod.p = 1e-9  # rounds to p = 0: every weight kept
    out = attn(x, a)
    attn.eval()
    assert torch.allclose(out, attn(x, a), atol=1e-6)


def test_cpu_bf16_training_attention_blocks_match_sdpa(monkeypatch):
    """Without dropout, causal bf16 training on CPU runs cpu_dropout_attention's blocks (cpu_blocks_win), not SDPA:
    the same outputs and gradients to bf16 rounding, and no random draws. fp32, non-causal masks, dropout-free eval
    and contexts beyond CPU_BLOCKS_MAX_T keep SDPA."""
    import model as model_module
    from model import cpu_blocks_win
    q32, q16 = torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4, dtype=torch.bfloat16)
    assert cpu_blocks_win(q16, True) and not cpu_blocks_win(q16, False) and not cpu_blocks_win(q32, True)
    assert not cpu_blocks_win(torch.zeros(1, 1, model_module.CPU_BLOCKS_MAX_T + 1, 4, dtype=torch.bfloat16), True)
    monkeypatch.setattr(model_module, 'CAUSAL_BLOCK', 5)  # 17 positions: 4 blocks
    m = build(n_kv_head=2).to(torch.bfloat16).train()
    x = torch.randint(0, V, (3, 17))
    calls = []
    real = type(m.transformer.h[0].attn).cpu_dropout_attention
    monkeypatch.setattr(type(m.transformer.h[0].attn), 'cpu_dropout_attention',
                        lambda self, *a: calls.append(a[-1]) or real(self, *a))
    outs = []
    for blocks in (True, False):
        monkeypatch.setattr(model_module, 'FAST_CPU_DROPOUT', blocks)  # False: F.dropout and SDPA
        m.zero_grad()
        rng = torch.get_rng_state()
        logits, loss = m(x, x)
        loss.backward()
        assert torch.equal(torch.get_rng_state(), rng)  # p = 0: nothing drawn
        outs.append((logits, [p.grad.float() for p in m.parameters()]))
    assert calls == [0.0] * len(m.transformer.h)  # the first pass took the blocks in every layer, the second none
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0.05, rtol=0.02)
    for g0, g1 in zip(outs[0][1], outs[1][1]):
        assert (g0 - g1).norm() <= 0.05 * g1.norm() + 1e-6


# ---- recipes -----------------------------------------------------------------------------------

def test_model_recipes_set_only_known_keys_and_build():
    import ast
    import glob
    import os
    from dataclasses import fields
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, 'train.py')).read())
    train_keys = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                  if isinstance(t, ast.Name)}
    model_keys = {f.name for f in fields(GPTConfig)}
    paths = sorted(glob.glob(os.path.join(root, 'config', 'ablate_*.py'))) + [os.path.join(root, 'config', 'modern.py')]
    assert len(paths) >= 8
    base = {}
    exec(open(os.path.join(root, 'config', 'ablate_base.py')).read(), base)
    for path in paths:
        ns = {}
        exec(open(path).read(), ns)
        keys = {k for k in ns if not k.startswith('__')}
        assert keys <= train_keys | model_keys, f"{path}: unknown keys {keys - train_keys - model_keys}"
        merged = {k: v for k, v in {**base, **ns}.items() if k in model_keys}
        merged.update(n_layer=1, n_embd=48, block_size=16, vocab_size=V)  # tiny, same flags
        m = GPT(GPTConfig(**merged))
        assert torch.isfinite(m(tokens(1, 16), tokens(1, 16))[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_bf16_manual_equals_sdpa_and_masked_rows_finite():
    m = build(pos_emb='rope', n_kv_head=2).cuda()
    man = twin(m, attn_impl='manual').cuda()
    x = tokens(T=16).cuda()
    pad = torch.ones(2, 16, dtype=torch.bool, device='cuda')
    pad[0, :5] = False
    with torch.autocast('cuda', dtype=torch.bfloat16):
        a, b = m(x)[0], man(x)[0]
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
        m.train()
        logits, loss = m(x, x, pad_mask=pad)
    loss.backward()
    assert torch.isfinite(logits).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_mla_sdpa_avoids_the_math_fallback():
    """MLA's q/k heads (hd + rope_dim) are wider than v (hd): V is padded so SDPA can pick a fused kernel;
    the result still equals manual attention."""
    from torch.profiler import profile
    m = build(attn_type='mla', pos_emb='rope')
    ref = build(attn_type='mla', pos_emb='rope', attn_impl='manual')
    x = tokens()
    with torch.no_grad(), profile() as p:
        out = m(x)[0]
    kernels = [e.key for e in p.key_averages() if 'scaled_dot_product' in e.key]
    assert kernels and not any('math' in k for k in kernels), kernels
    torch.testing.assert_close(out, ref(x)[0], atol=1e-5, rtol=1e-5)


# ---- norm position and init scheme -------------------------------------------------------------

def test_post_norm_block_normalises_the_residual_sum():
    pre = build()
    post = twin(pre, norm_position='post')  # same weights: the norms move, no parameter changes
    blk, x = post.transformer.h[0], torch.randn(2, 8, 32)
    a = post.attn_inputs(8, 8, torch.arange(8), torch.arange(8), None, None, False, x.device)
    with torch.no_grad():
        h = blk.ln_1(x + blk.attn(x, a))  # Vaswani et al. 2017: LN(x + Sublayer(x))
        want = blk.ln_2(h + blk.mlp(h))
        torch.testing.assert_close(blk(x, a), want)
        y = blk(x, a)  # every position of the output is normalised (LayerNorm without affine drift at init)
        torch.testing.assert_close(y.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
        assert not torch.allclose(pre.transformer.h[0](x, a), y)
        full = post(tokens())[0]  # and the KV-cache path still equals the full forward
        cache = post.make_kv_cache(2, 16)
        outs = [post(tokens()[:, :5], kv_cache=cache)[0]] + [post(tokens()[:, t:t + 1], kv_cache=cache)[0]
                                                            for t in range(5, 16)]
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_kaiming_init_is_he_normal_and_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    he = GPT(tiny(init_scheme='kaiming', n_embd=256, n_head=4, tie_weights=False))
    torch.manual_seed(0)
    g2 = GPT(tiny(n_embd=256, n_head=4, tie_weights=False))
    for name, p in he.named_parameters():
        if p.dim() == 2:  # He et al. 2015: std = sqrt(2 / fan_in), fan_in = weight.size(1), no residual scaling
            assert p.std().item() == pytest.approx(math.sqrt(2 / p.size(1)), rel=0.05), name
    proj = dict(g2.named_parameters())['transformer.h.0.attn.c_proj.weight']
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.05)
    assert dict(g2.named_parameters())['transformer.h.0.mlp.c_fc.weight'].std().item() == pytest.approx(0.02, rel=0.05)
    z = GPT(tiny(init_scheme='kaiming', zero_init=True))  # zero_init still zeroes the residual projections
    assert (dict(z.named_parameters())['transformer.h.1.mlp.c_proj.weight'] == 0).all()
    with pytest.raises(ValueError, match='init_scheme'):
        tiny(init_scheme='xavier')
    with pytest.raises(ValueError, match='norm_position'):
        tiny(norm_position='sandwich')


# ---- int8 / bf16 weight-only inference ---------------------------------------------------------

def test_int8_linear_is_per_row_absmax_and_close_to_fp32():
    from model import Int8Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 20)
    q = Int8Linear(lin)
    assert q.q.dtype == torch.int8 and q.q.abs().amax(1).eq(127).all()  # every row uses its full range
    torch.testing.assert_close(q.scale, lin.weight.abs().amax(1) / 127)
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        torch.testing.assert_close(q(x), F.linear(x, q.q.float() * q.scale[:, None], lin.bias), atol=1e-5, rtol=1e-5)
        assert ((q(x) - lin(x)).norm() / lin(x).norm()).item() < 0.01
        xb = x.bfloat16()  # the bf16 CPU kernel too
        torch.testing.assert_close(q(xb).float(), q(x), atol=0.05, rtol=0.05)


def test_bf16_linear_rounds_like_a_bf16_matmul_on_both_paths(monkeypatch):
    """bf16(bf16(x) W^T) + b, returned in x's dtype; a prompt on a CPU without bf16 units takes the fp32 route on an
    upcast weight, batch-1 decoding the bf16 kernel: the two give the same numbers (to one bf16 rounding step)."""
    import model as model_module
    from model import Bf16Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 20)
    q = Bf16Linear(lin)
    assert q.weight.dtype == torch.bfloat16 and q.bias is lin.bias
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        ref = F.linear(x.bfloat16().double(), q.weight.double()).bfloat16().float() + lin.bias
        for fast in (True, False):
            monkeypatch.setattr(model_module, 'cpu_has_fast_bf16', lambda: fast)
            y, y1 = q(x), q(x[:1, :1])  # 10 rows, then one row (the decoding path)
            assert y.dtype == torch.float32
            torch.testing.assert_close(y, ref, atol=0.02, rtol=2 ** -7)  # one bf16 ulp at most
            assert (y != ref).float().mean() < 0.05
            torch.testing.assert_close(y1, y[:1, :1], atol=0.02, rtol=2 ** -7)
        assert ((y - lin(x)).norm() / lin(x).norm()).item() < 0.01
        nobias = Bf16Linear(torch.nn.Linear(48, 20, bias=False))
        out = nobias(x)
        assert torch.equal(out, out.bfloat16().float())  # the product is rounded to bf16 once


@pytest.fixture(scope='module')
def trained_tiny():
    """A tiny RoPE model trained 150 steps on a learnable stream (mostly t + 1), and 64 val rows of 33 tokens."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    stream = lambda n: torch.cumsum(torch.randint(1, 3, (n,), generator=g), 0) % V
    m = GPT(tiny(pos_emb='rope', n_embd=64, n_head=4, tie_weights=True, block_size=32))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    train, val = stream(20000), stream(33 * 64).view(-1, 33)
    for _ in range(150):
        ix = torch.randint(len(train) - 33, (16,), generator=g)
        batch = torch.stack([train[i:i + 33] for i in ix])
        loss = m(batch[:, :-1], batch[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), val


@pytest.mark.parametrize('kind,tol', [('int8', 1e-4), ('bf16', 2e-2)])
def test_weight_only_model_keeps_val_perplexity_within_1pct_and_cache_equals_no_cache(trained_tiny, kind, tol):
    import copy
    m, val = trained_tiny
    q = getattr(copy.deepcopy(m), f'quantize_{kind}')()
    assert sum(isinstance(mod, torch.nn.Linear) for mod in q.modules()) == 0
    assert q.transformer.wte.weight.dtype == torch.float32  # the lookup keeps its fp32 rows
    with torch.no_grad():
        ppl = math.exp(m(val[:, :-1], val[:, 1:])[1].item())
        ppl_q = math.exp(q(val[:, :-1], val[:, 1:])[1].item())
        assert ppl < V / 4, ppl  # a trained model, so the comparison means something
        assert abs(ppl_q - ppl) / ppl < 0.01, (ppl, ppl_q)
        assert ppl_q != ppl
        x = val[:2, :20]
        full = q(x)[0]
        cache = q.make_kv_cache(2, 20)  # bf16: the 8-row prefill and the 2-row steps take different routes
        steps = [q(x[:, :4], kv_cache=cache)[0]] + [q(x[:, t:t + 1], kv_cache=cache)[0] for t in range(4, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=tol, rtol=tol)


@pytest.mark.parametrize('kw', [
    dict(),                                                                 # GPT-2 classic, tied head
    dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', n_kv_head=2, tie_weights=False),
    dict(attn_type='mla', pos_emb='rope', mla_q_rank=16, mla_kv_rank=12, mla_rope_dim=4),
    dict(n_experts=4, moe_top_k=2, pos_emb='rope'),
])
def test_transposed_wide_weights_keep_values_logits_and_cache(kw):
    m = build(**kw)
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ref = m(x)[0]
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        m.transpose_wide_weights()
        wide = [p for p in m.parameters() if p.dim() == 2 and p.size(0) > p.size(1)]
        assert wide and all(p.t().is_contiguous() and not p.is_contiguous() for p in wide)
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
        torch.testing.assert_close(m(x)[0], ref, atol=1e-5, rtol=1e-5)
        cache = m.make_kv_cache(2, 12)
        steps = [m(x[:, :5], kv_cache=cache)[0]] + [m(x[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=1e-5)
        m.load_state_dict(sd)  # loading into the transposed storage works and keeps it
        assert all(not p.is_contiguous() for p in wide)


def test_peak_flops_leaves_the_global_rng_alone():
    """train.py measures the peak before the loop; its timing-dependent number of draws must not shift dropout masks."""
    from model import peak_flops
    state = torch.get_rng_state()
    assert peak_flops('cpu', torch.float32, quick=True) > 0 and peak_flops('cpu', 'bfloat16', quick=True) > 0
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_keep_freed_cpu_memory_reuses_big_blocks():
    """64 MB tensors made and freed again and again: with glibc's defaults every one page-faults in fresh memory;
    after keep_freed_cpu_memory() freed blocks are reused, so most fault nowhere (the kernel may still reclaim
    the kept pages now and then: up to 3 of 10 tensors faulted in on a loaded 2-core VM)."""
    code = textwrap.dedent('''
        import resource, sys, torch
        from model import keep_freed_cpu_memory
        torch.set_num_threads(1)
        if sys.argv[1] == 'keep':
            assert keep_freed_cpu_memory()
        faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(1 << 24)  # warm-up: the first one faults in either case
        before = faults()
        for _ in range(20):
            torch.ones(1 << 24)  # 64 MB = 16384 pages of 4 KB, freed at once
        print(faults() - before)''')
    faults = {}
    for mode in ('default', 'keep'):
        r = subprocess.run([sys.executable, '-c', code, mode], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        faults[mode] = int(r.stdout.split()[-1])
    tensor = (64 << 20) // 4096
    assert faults['keep'] < 8 * tensor, faults  # of twenty: most reuse the kept block
    thp = '/sys/kernel/mm/transparent_hugepage/enabled'  # 'always': 2 MB pages, far fewer faults either way
    if not (os.path.exists(thp) and '[always]' in open(thp).read()):
        assert faults['default'] > 18 * tensor, faults  # what the helper is for: every one faults
