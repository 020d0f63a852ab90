"""Soft prompts (prompt tuning, Lester et al. 2021) in model.py: the base init is untouched, the soft tokens start
as real vocabulary embeddings and behave exactly like those tokens written before the input (positions, masks),
only they train when the base is frozen, cached decoding equals the no-cache path, and they save/load alone."""
import io

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
import sample

P = 4  # soft tokens
CONFIGS = {
    'learned': dict(),
    'sinusoidal_emb_norm': dict(pos_emb='sinusoidal', emb_norm=True),
    'rope': dict(pos_emb='rope'),
    'alibi': dict(pos_emb='alibi'),
    'nope': dict(pos_emb='none'),
    'gqa_rope_manual': dict(pos_emb='rope', n_kv_head=2, attn_impl='manual'),
    'mla': dict(attn_type='mla', pos_emb='rope'),
    'untied_rmsnorm_lora': dict(tie_weights=False, norm='rmsnorm', lora_rank=4),
}
IDX = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


def with_prefix(ids, idx):
    return torch.cat([torch.as_tensor(ids).expand(idx.size(0), -1), idx], dim=1)


@pytest.mark.parametrize('cfg', list(CONFIGS.values()) + [dict(tie_weights=False, zero_init=True)])
@torch.no_grad()
def test_base_init_untouched_and_soft_rows_are_vocabulary_embeddings(cfg):
    base = tiny(**cfg)
    base_rng = torch.get_rng_state()
    soft = tiny(**cfg, n_soft_prompt=P)
    assert torch.equal(torch.get_rng_state(), base_rng)  # same global RNG consumption as n_soft_prompt=0
    b, sd = base.state_dict(), {k: v.clone() for k, v in soft.state_dict().items()}
    assert set(sd) - set(b) == {'transformer.soft_prompt'} and set(b) <= set(sd)
    for k in b:
        assert torch.equal(b[k], sd[k]), k
    ids = soft.init_soft_prompt()  # the same seeded draw as __init__'s
    assert len(set(ids.tolist())) == P
    assert torch.equal(sd['transformer.soft_prompt'], soft.transformer.wte.weight[ids])
    assert soft.transformer.soft_prompt.shape == (P, 32)


@pytest.mark.parametrize('name', list(CONFIGS))
@torch.no_grad()
def test_soft_prompt_is_those_tokens_written_first(name):
    """At init the soft rows are wte rows of `ids`: the model on idx must be the base on ids + idx, cut to the
    real tokens. This pins positions (the first real token sits at P), causal masks and the logits slice."""
    base, soft = tiny(**CONFIGS[name]), tiny(**CONFIGS[name], n_soft_prompt=P)
    ids = soft.init_soft_prompt()
    logits = soft(IDX)[0]
    assert logits.shape == (2, 12, 64)
    torch.testing.assert_close(logits, base(with_prefix(ids, IDX))[0][:, P:], atol=1e-5, rtol=0)
    assert (logits - base(IDX)[0]).abs().max() > 1e-3  # the prefix matters


def test_loss_is_cross_entropy_on_the_real_tokens():
    soft = tiny(n_soft_prompt=P)
    targets = torch.roll(IDX, -1, 1)
    targets[0, :3] = -1
    loss_mask = torch.ones_like(IDX)
    loss_mask[1, 5:] = 0
    logits, loss = soft(IDX, targets, loss_mask=loss_mask)
    ce = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), ignore_index=-1, reduction='none')
    w = ((targets != -1) & (loss_mask == 1)).reshape(-1).float()
    torch.testing.assert_close(loss, (ce * w).sum() / w.sum(), atol=1e-6, rtol=0)
    loss.backward()
    g = soft.transformer.soft_prompt.grad
    assert g is not None and g.abs().sum() > 0  # gradients reach the soft prompt


@pytest.mark.parametrize('lora', [0, 4])
def test_frozen_base_only_the_soft_prompt_trains(lora):
    soft = tiny(n_soft_prompt=P, lora_rank=lora).train()
    n = soft.mark_only_adapters_trainable()
    lora_n = sum(p.numel() for p in soft.lora_parameters().values())
    assert n == P * 32 + lora_n == sum(p.numel() for p in soft.parameters() if p.requires_grad)
    assert set(soft.adapter_parameters()) == {'transformer.soft_prompt'} | set(soft.lora_parameters())
    before = {k: v.clone() for k, v in soft.state_dict().items()}
    opt = torch.optim.SGD([p for p in soft.parameters() if p.requires_grad], lr=0.1)
    soft(IDX, torch.roll(IDX, -1, 1))[1].backward()
    for name, p in soft.named_parameters():
        assert (p.grad is not None) == (name in soft.adapter_parameters()), name
    opt.step()
    for k, v in soft.state_dict().items():
        changed = not torch.equal(v, before[k])
        assert changed == (k == 'transformer.soft_prompt' or k.endswith('lora_B')), k  # A gets no grad while B=0
    if lora:  # LoRA only: the soft prompt is frozen too
        assert soft.mark_only_lora_trainable() == lora_n and not soft.transformer.soft_prompt.requires_grad
    with pytest.raises(ValueError, match='n_soft_prompt'):
        tiny().mark_only_adapters_trainable()


def test_counts():
    base, soft = tiny(), tiny(n_soft_prompt=P)
    assert soft.num_params(non_embedding=False) - base.num_params(non_embedding=False) == P * 32
    assert soft.num_params() == base.num_params()  # a lookup table, like wpe: MFU's N is unchanged
    assert soft.flops_per_token() == base.flops_per_token()
    assert soft.soft_prompt_parameters()['transformer.soft_prompt'].numel() == P * 32
    assert base.soft_prompt_parameters() == {} and base.adapter_state_dict() == {}
    with pytest.raises(ValueError, match='n_soft_prompt'):
        tiny(n_soft_prompt=-1)


@pytest.mark.parametrize('name', [n for n in CONFIGS if n != 'untied_rmsnorm_lora'])
@pytest.mark.parametrize('kind', ['contiguous', 'paged'])
@torch.no_grad()
def test_cached_greedy_equals_uncached(kind, name):
    model = tiny(**CONFIGS[name], n_soft_prompt=P)
    with torch.no_grad():  # a trained-looking prompt, not vocabulary rows
        model.transformer.soft_prompt.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    prompt, steps = [3, 1, 4, 1, 5, 9, 2], 30
    ref, toks = [], list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([toks]))[0][:, -1]
        ref.append(logits)
        toks.append(int(logits.argmax()))
    cache = model.make_kv_cache(1, len(prompt) + steps, kind=kind, page_size=4)
    model(torch.tensor([prompt[:3]]), kv_cache=cache)  # chunked prefill: the prefix enters with the first chunk
    logits = model(torch.tensor([prompt[3:]]), kv_cache=cache)[0][:, -1]
    out = list(prompt)
    for i in range(steps):
        torch.testing.assert_close(logits, ref[i], atol=1e-4, rtol=0)
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[0][:, -1]
    assert out == toks and cache.pos == P + len(prompt) + steps  # the cache holds the soft tokens too
    assert sample.generate(model, prompt, steps, strategy='greedy', kv_cache=kind) == [toks[len(prompt):]]


@pytest.mark.parametrize('name', ['learned', 'rope', 'alibi', 'sinusoidal_emb_norm'])
@torch.no_grad()
def test_left_padding_and_masks_with_the_prefix(name):
    """A left-padded row gives the unpadded row's logits, in the prefill and in cached decoding: pad_mask covers
    the real tokens and the soft prompt is always a valid key. An explicit causal attn_mask changes nothing."""
    model = tiny(**CONFIGS[name], n_soft_prompt=P)
    long, short = [5, 6, 7, 8, 9], [7, 8, 9]
    idx = torch.tensor([long, [0, 0] + short])
    pad = torch.tensor([[True] * 5, [False] * 2 + [True] * 3])
    cache = model.make_kv_cache(2, 8)
    logits = model(idx, pad_mask=pad, kv_cache=cache)[0]
    for row, toks in enumerate((long, short)):
        torch.testing.assert_close(logits[row, -1], model(torch.tensor([toks]))[0][0, -1], atol=1e-5, rtol=0)
    nxt = torch.tensor([[11], [12]])
    step = model(nxt, pad_mask=torch.cat([pad, torch.ones(2, 1, dtype=torch.bool)], 1), kv_cache=cache)[0]
    for row, toks in enumerate((long, short)):
        want = model(torch.tensor([toks + [int(nxt[row])]]))[0][0, -1]
        torch.testing.assert_close(step[row, -1], want, atol=1e-5, rtol=0)
    right = torch.tensor([short + [0, 0], long])  # (B,) lengths: right padding
    got = model(right, pad_mask=torch.tensor([3, 5]))[0]
    torch.testing.assert_close(got[0, :3], model(torch.tensor([short]))[0][0], atol=1e-5, rtol=0)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(model(idx, attn_mask=causal)[0], model(idx)[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_adapter_state_dict_roundtrip_and_reinit_after_loading_a_base():
    trained = tiny(n_soft_prompt=P, lora_rank=4, lora_targets='attn_in,mlp_out')
    g = torch.Generator().manual_seed(2)
    for p in trained.adapter_parameters().values():
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
    sd = trained.adapter_state_dict()
    assert set(sd) == {'transformer.soft_prompt'} | set(trained.lora_state_dict())
    assert 'transformer.soft_prompt' not in trained.lora_state_dict()  # lora_state_dict unchanged
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = tiny(n_soft_prompt=P, lora_rank=4, lora_targets='attn_in,mlp_out')  # same base (seed)
    fresh.init_soft_prompt(seed=5)
    assert (fresh(IDX)[0] - trained(IDX)[0]).abs().max() > 1e-3
    missing, unexpected = fresh.load_state_dict(torch.load(buf, weights_only=True), strict=False)
    assert not unexpected and not set(sd) & set(missing)
    assert torch.equal(fresh(IDX)[0], trained(IDX)[0])
    # a finetune loads its base after construction: re-draw the prompt from the loaded embeddings
    other = tiny(seed=3)
    fresh.load_state_dict(other.state_dict(), strict=False)
    ids = fresh.init_soft_prompt(token_ids=[1, 2, 3, 4])
    assert torch.equal(fresh.transformer.soft_prompt, other.transformer.wte.weight[ids])


@torch.no_grad()
def test_learned_positions_count_the_prefix_and_streaming_keeps_it():
    model = tiny(n_soft_prompt=P)
    assert model(torch.zeros(1, 64 - P, dtype=torch.long))[0].shape == (1, 60, 64)
    with pytest.raises(AssertionError, match='n_soft_prompt=4.*block_size'):
        model(torch.zeros(1, 64 - P + 1, dtype=torch.long))
    with pytest.raises(ValueError, match='attn_sinks >= n_soft_prompt'):
        tiny(n_soft_prompt=P, pos_emb='rope', sliding_window=6, attn_sinks=2).make_kv_cache(1, 10)
    model = tiny(n_soft_prompt=P, pos_emb='rope', sliding_window=6, attn_sinks=P)  # the soft tokens are the sinks
    cache, toks = model.make_kv_cache(1, 10), [7, 3]
    logits = model(torch.tensor([toks]), kv_cache=cache)[0][:, -1]
    for _ in range(40):  # equal to the no-cache path until the first eviction, then bounded and finite
        if P + len(toks) <= P + 6:
            torch.testing.assert_close(logits, model(torch.tensor([toks]))[0][:, -1], atol=1e-4, rtol=0)
        assert torch.isfinite(logits).all() and cache.seq_len <= P + 6
        toks.append(int(logits.argmax()))
        logits = model(torch.tensor([[toks[-1]]]), kv_cache=cache)[0][:, -1]


def test_forward_reads_no_config():
    class NoConfig:
        def __getattr__(self, name):
            raise AssertionError(f"forward read config.{name}")
    model = tiny(n_soft_prompt=P, pos_emb='rope')
    cache = model.make_kv_cache(2, 20)
    model.config = NoConfig()
    with torch.no_grad():
        model(IDX[:, :5], kv_cache=cache)
        model(IDX[:, 5:6], kv_cache=cache)
