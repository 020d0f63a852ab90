"""LoRA (Hu et al. 2021) in model.py: starts exactly at the base, merges to the same function, trains only the
adapters, counts r*(in + out) per adapted Linear, saves/loads adapters alone, and decodes the same with a KV cache."""
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, LoRALinear

ALL = 'attn_in,attn_out,mlp_in,mlp_out'
CONFIGS = {
    'mha': dict(),
    'gqa_rope_zero_init': dict(pos_emb='rope', n_kv_head=2, bias=False, zero_init=True),
    'mla': dict(attn_type='mla', pos_emb='rope'),
    'mla_low_rank_q': dict(attn_type='mla', pos_emb='rope', mla_q_rank=16),
    'moe': dict(n_experts=4, n_shared_experts=1, moe_top_k=2, mlp='swiglu'),
    'untied_rmsnorm_relu2': dict(tie_weights=False, norm='rmsnorm', mlp='relu2', pos_emb='alibi'),
}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


def perturb(model, seed=1):
    """Random B (and keep A): the adapters now change the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.lora_parameters().items():
            if n.endswith('lora_B'):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


IDX = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('name', list(CONFIGS))
@torch.no_grad()
def test_at_init_the_lora_model_is_its_base(name):
    base, lora = tiny(**CONFIGS[name]), tiny(**CONFIGS[name], lora_rank=4, lora_targets=ALL)
    b, sd = base.state_dict(), lora.state_dict()
    assert set(sd) - set(b) == set(lora.lora_state_dict()) and set(b) <= set(sd)  # base names unchanged
    for k in b:  # same seed -> same base weights: adapters did not disturb the base init (c_proj scaled, zero_init)
        assert torch.equal(b[k], sd[k]), k
    for n, p in lora.lora_parameters().items():  # B = 0, A random (not zeroed by _init_weights or zero_init)
        assert (p == 0).all() if n.endswith('lora_B') else p.abs().min() > 0, n
    assert torch.equal(base(IDX)[0], lora(IDX)[0])
    adapted = {n.rsplit('.', 1)[-1] for n, m in lora.named_modules() if isinstance(m, LoRALinear)}
    want = {'wq_a', 'wq_b', 'wkv_a', 'wkv_b'} if CONFIGS[name].get('mla_q_rank') else \
        {'wq', 'wkv_a', 'wkv_b'} if name.startswith('mla') else {'c_attn'}
    assert adapted == want | {'c_proj', 'c_fc'}  # never the router or lm_head


@pytest.mark.parametrize('name', list(CONFIGS))
@torch.no_grad()
def test_merged_equals_unmerged_and_is_a_plain_model(name):
    base = tiny(**CONFIGS[name])
    lora = perturb(tiny(**CONFIGS[name], lora_rank=4, lora_targets=ALL))
    ref = lora(IDX)[0]
    assert (ref - base(IDX)[0]).abs().max() > 1e-3  # the adapters matter
    lora.merge_lora()
    torch.testing.assert_close(lora(IDX)[0], ref, atol=1e-5, rtol=0)
    assert not lora.lora_parameters() and lora.config.lora_rank == 0
    assert not any(m.active for m in lora.modules() if isinstance(m, LoRALinear))
    plain = GPT(lora.config).eval()  # no adapter left: the merged weights load strictly into a plain model
    plain.load_state_dict(lora.state_dict())
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert torch.equal(plain(IDX)[0], lora(IDX)[0])


@torch.no_grad()
def test_lora_disabled_is_the_base_and_restores():
    base, lora = tiny(), perturb(tiny(lora_rank=4, lora_targets=ALL))
    on = lora(IDX)[0]
    with lora.lora_disabled():
        assert torch.equal(lora(IDX)[0], base(IDX)[0])
    assert torch.equal(lora(IDX)[0], on)


@pytest.mark.parametrize('name', ['mha', 'mla_low_rank_q', 'moe'])
def test_only_adapters_get_gradients(name):
    model = perturb(tiny(**CONFIGS[name], lora_rank=4, lora_targets=ALL)).train()
    n_trainable = model.mark_only_lora_trainable()
    _, loss = model(IDX, targets=torch.roll(IDX, -1, 1))
    loss.backward()
    lora = model.lora_parameters()
    assert n_trainable == sum(p.numel() for p in lora.values()) > 0
    idle = {f'transformer.h.{i}.mlp.experts.{e}.' for i, s in enumerate(model.moe_stats())
            for e, load in enumerate(s['load']) if load == 0}  # a routed expert that got no token has no gradient
    for n, p in model.named_parameters():
        if n in lora:
            assert p.requires_grad, n
            if not any(n.startswith(x) for x in idle):
                assert p.grad is not None and p.grad.abs().sum() > 0, n  # B != 0, so A gets a gradient too
        else:  # Linears, embeddings, norms, router, head
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize('targets', ['attn_in', 'attn_out,mlp_out', ALL])
@pytest.mark.parametrize('name', ['gqa', 'mla_low_rank_q', 'moe_gelu'])
def test_trainable_count_is_r_times_in_plus_out(name, targets):
    cfg = {'gqa': dict(n_kv_head=2), 'mla_low_rank_q': dict(attn_type='mla', mla_q_rank=16, mla_kv_rank=24,
           mla_rope_dim=4), 'moe_gelu': dict(n_experts=3, n_shared_experts=1)}[name]
    r, L, d, H, hd = 3, 2, 32, 4, 8
    model = tiny(**cfg, lora_rank=r, lora_targets=targets)
    if name == 'mla_low_rank_q':  # wq_a d->16, wq_b 16->H*(hd+4), wkv_a d->24+4, wkv_b 24->H*2*hd
        attn_in = (d + 16) + (16 + H * (hd + 4)) + (d + 24 + 4) + (24 + H * 2 * hd)
    else:  # c_attn d -> (H + 2*Hkv)*hd
        attn_in = d + (H + 2 * cfg.get('n_kv_head', H)) * hd
    mlps = 3 + 1 if name == 'moe_gelu' else 1  # every routed expert and the shared one
    per_layer = {'attn_in': attn_in, 'attn_out': H * hd + d,
                 'mlp_in': mlps * (d + 4 * d), 'mlp_out': mlps * (4 * d + d)}
    want = L * r * sum(per_layer[t] for t in targets.split(','))
    assert model.mark_only_lora_trainable() == want
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want
    assert model.num_params() - tiny(**cfg).num_params() == want  # num_params counts the adapters


def test_adapters_save_alone_and_load_onto_the_same_base(tmp_path):
    cfg = dict(pos_emb='rope', n_kv_head=2, lora_rank=4, lora_targets=ALL)
    trained = perturb(tiny(**cfg))
    sd = trained.lora_state_dict()
    assert set(sd) == set(trained.lora_parameters())
    torch.save(sd, tmp_path / 'adapters.pt')
    torch.save(trained.state_dict(), tmp_path / 'full.pt')
    assert (tmp_path / 'adapters.pt').stat().st_size < 0.5 * (tmp_path / 'full.pt').stat().st_size
    fresh = tiny(seed=123, **cfg)  # different random base and A: everything must come from the files
    base = {k: v for k, v in tiny(pos_emb='rope', n_kv_head=2).state_dict().items()}
    missing, unexpected = fresh.load_state_dict(base, strict=False)
    assert set(missing) == set(sd) and not unexpected
    missing, unexpected = fresh.load_state_dict(torch.load(tmp_path / 'adapters.pt', weights_only=True), strict=False)
    assert not unexpected and not set(missing) & set(sd)
    with torch.no_grad():
        assert torch.equal(fresh.merge_lora()(IDX)[0], trained.merge_lora()(IDX)[0])


@pytest.mark.parametrize('name', ['gqa_rope_zero_init', 'mla'])
@torch.no_grad()
def test_cached_decoding_equals_uncached_with_lora(name):
    model = perturb(tiny(**CONFIGS[name], lora_rank=4, lora_targets=ALL), seed=2)
    prompt, steps = [3, 1, 4, 1, 5], 24
    ref, toks = [], list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([toks]))[0][:, -1]
        ref.append(logits)
        toks.append(int(logits.argmax()))
    cache = model.make_kv_cache(1, 64)
    logits, out = model(torch.tensor([prompt]), kv_cache=cache)[0][:, -1], list(prompt)
    for i in range(steps):
        torch.testing.assert_close(logits, ref[i], atol=1e-4, rtol=0)
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[0][:, -1]
    assert out == toks


def test_layer_formula_alpha_and_dropout():
    torch.manual_seed(0)
    m = LoRALinear(8, 6, True, rank=2, alpha=5.0, dropout=0.5)
    m.reset_lora()
    x = torch.randn(4, 8)
    m.train()
    assert torch.equal(m(x), F.linear(x, m.weight, m.bias))  # B = 0: dropout only touches the adapter branch
    with torch.no_grad():
        m.lora_B.normal_()
    assert not torch.equal(m(x), m(x))  # training: the adapter's input is dropped out
    m.eval()
    want = x @ m.weight.T + m.bias + (5.0 / 2) * (x @ m.lora_A.T @ m.lora_B.T)  # h = Wx + b + (alpha/r) BAx
    torch.testing.assert_close(m(x), want, atol=1e-6, rtol=0)


def test_targets_are_validated_and_rank_zero_is_off():
    with pytest.raises(ValueError, match="'mlp_up'"):
        GPTConfig(lora_rank=4, lora_targets='attn_in,mlp_up')
    with pytest.raises(ValueError, match="'qkv'"):
        GPTConfig(lora_targets='qkv')  # a typo is an error even while LoRA is off
    with pytest.raises(ValueError, match='lora_rank'):
        GPTConfig(lora_rank=4, lora_targets='')
    with pytest.raises(ValueError, match='lora_rank'):
        GPTConfig(lora_rank=-1)
    assert GPTConfig(lora_rank=2, lora_targets=' attn_in , mlp_in').lora_targets == 'attn_in,mlp_in'
    model = tiny(lora_rank=0, lora_targets=ALL)
    assert not model.lora_parameters() and not any(isinstance(m, LoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match='lora_rank'):
        model.mark_only_lora_trainable()
