"""KV caches (model.py) against the no-cache path: tokens and per-step logits, every pos_emb, GQA, MLA,
paged with random block order, offload, streaming, and the paged allocator's bookkeeping."""
import random

import pytest
import torch

from model import GPT, GPTConfig, ContiguousKVCache, PagedKVCache
import sample

STEPS = 70  # >= 64 decode steps after a short prompt


CONFIGS = {
    'learned': dict(),
    'sinusoidal': dict(pos_emb='sinusoidal'),
    'rope': dict(pos_emb='rope'),
    'alibi': dict(pos_emb='alibi'),
    'nope': dict(pos_emb='none'),
    'gqa': dict(pos_emb='rope', n_kv_head=2),
    'mqa_manual': dict(pos_emb='alibi', n_kv_head=1, attn_impl='manual'),
    'mla': dict(attn_type='mla', pos_emb='rope'),
}


def tiny(block_size=128, vocab_size=64, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


def shuffled(cache, n=64, seed=0):
    """Preallocate the paged pool and hand its blocks out in a random physical order."""
    cache.n_slots, cache.free = n, random.Random(seed).sample(range(n), n)
    return cache


def make(model, kind, max_len=200, batch_size=1):
    if kind == 'contiguous':
        return model.make_kv_cache(batch_size, max_len, kind='contiguous')
    cache = model.make_kv_cache(batch_size, max_len, kind='paged', page_size=8, offload=kind == 'paged+offload')
    cache.resident = 1  # offload everything but the newest block, so the round trip is exercised every step
    return shuffled(cache)


@pytest.mark.parametrize('name', list(CONFIGS))
@pytest.mark.parametrize('kind', ['contiguous', 'paged', 'paged+offload'])
@torch.no_grad()
def test_cached_equals_no_cache(kind, name):
    model = tiny(**CONFIGS[name])
    prompt = [3, 1, 4, 1, 5]
    ref, toks = [], list(prompt)
    for _ in range(STEPS):  # the reference: re-run the whole sequence for every token
        logits = model(torch.tensor([toks]))[0][:, -1]
        ref.append(logits)
        toks.append(int(logits.argmax()))
    cache = make(model, kind)
    logits = model(torch.tensor([prompt]), kv_cache=cache)[0][:, -1]
    out = list(prompt)
    for i in range(STEPS):
        torch.testing.assert_close(logits, ref[i], atol=1e-4, rtol=0)
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[0][:, -1]
    assert out == toks
    assert cache.pos == len(prompt) + STEPS
    if kind == 'paged+offload':
        assert cache.stats()['host'] > 0  # blocks really went to CPU memory and came back


@pytest.mark.parametrize('kind', ['none', 'contiguous', 'paged'])
def test_generate_greedy_same_for_every_cache(kind):
    model = tiny(pos_emb='rope', n_kv_head=2)
    ref = sample.generate(model, [1, 2, 3], 40, num_samples=3, strategy='greedy', kv_cache='none')
    out = sample.generate(model, [1, 2, 3], 40, num_samples=3, strategy='greedy', kv_cache=kind, page_size=4)
    assert out == ref and out[0] == out[1] == out[2]


# -- cache unit tests: what update() returns, step by step, against the ground truth ---------------------

def visible(full, L, T, S, keep):
    """Tokens a streaming cache shows for T new tokens after L: sinks + the newest keep - S, + the new ones."""
    if keep and L > keep:
        return torch.cat([full[..., :S, :], full[..., L - (keep - S):L + T, :]], dim=-2)
    return full[..., :L + T, :]


def drive(cache, n=60, B=3, S=0, keep=0, prefill=5, chunk=1, reorder_every=0, n_layer=2):
    torch.manual_seed(1)
    k, v = torch.randn(B, 2, n, 4), torch.randn(B, n, 3)  # time on dim -2: (B, heads, T, d) and (B, T, d)
    L = 0
    while L < n:
        T = min(prefill if L == 0 else chunk, n - L)
        for layer in range(n_layer):
            ok, ov = cache.update(layer, k[:, :, L:L + T] * (layer + 1), v[:, L:L + T])
            assert torch.equal(ok, visible(k, L, T, S, keep) * (layer + 1))
            assert torch.equal(ov, visible(v, L, T, S, keep))
        L += T
        assert cache.pos == L
        if keep and T == 1:
            assert cache.seq_len <= keep + 1  # = attn_sinks + sliding_window
        if reorder_every and L % reorder_every == 0:
            idx = torch.randint(0, B, (B,))
            cache.reorder(idx)
            k[:, :, :L], v[:, :L] = k[idx, :, :L].clone(), v[idx, :L].clone()
    return cache


@pytest.mark.parametrize('S,W', [(0, 0), (4, 12), (0, 8), (2, 5)])
@pytest.mark.parametrize('prefill,chunk', [(5, 1), (30, 3)])
def test_cache_update_contract(S, W, prefill, chunk):
    keep = S + W - 1 if W else 0
    drive(ContiguousKVCache(2, 3, 60, keep=keep, sinks=S), S=S, keep=keep, prefill=prefill, chunk=chunk,
          reorder_every=7)
    for page in (1, 4, 16):
        for offload in (False, True):
            c = shuffled(PagedKVCache(2, 3, 60, page_size=page, offload=offload, keep=keep, sinks=S,
                                      resident_blocks=1), n=8)
            drive(c, S=S, keep=keep, prefill=prefill, chunk=chunk, reorder_every=7)
            st = c.stats()
            assert st['used'] + st['free'] == st['total']
            c.reorder(torch.arange(0))  # every sequence ended: nothing may leak
            st = c.stats()
            assert st['used'] == 0 and st['free'] == st['total'] and st['host'] == 0 and not c.refs


def test_paged_prefix_sharing_and_copy_on_write():
    c = PagedKVCache(1, 1, 100, page_size=4)
    x = torch.arange(10.).view(1, 10, 1)
    c.update(0, x)                        # 10 tokens: blocks [0..4) [4..8) [8..10) (partial)
    c.reorder(torch.zeros(3, dtype=torch.long))  # 3 beams share all three blocks
    assert c.stats()['used'] == 3 and c.stats()['shared'] == 3
    out, = c.update(0, torch.tensor([[[10.], [11.], [12.]]]).view(3, 1, 1))
    st = c.stats()
    assert st['used'] == 5 and st['shared'] == 2  # the partial block was copied for 2 of the 3 beams
    assert torch.equal(out[:, :10], x.expand(3, 10, 1)) and out[:, 10, 0].tolist() == [10., 11., 12.]
    c.reorder(torch.tensor([2]))          # two beams end: their private blocks go back to the pool
    assert c.stats()['used'] == 3 and c.stats()['shared'] == 0 and c.stats()['free'] == 2


def test_paged_memory_grows_by_blocks_no_leak_small_waste():
    model = tiny(pos_emb='rope')
    page, ends = 8, {0: 5, 1: 17, 2: 30, 3: 44}  # rows stop after different numbers of tokens
    counts = [0] * 4

    def on_token(row, token):
        counts[row] += 1
        return counts[row] == ends[row]
    logits, step = sample.start_decoding(model, [1, 2, 3], 100, kv_cache='paged', page_size=page)
    cache = step.cache
    assert cache.stats()['used'] == 1
    alive = [0, 1, 2, 3]
    for t in range(50):
        tokens = logits.argmax(-1) if logits.size(0) == len(alive) else logits.argmax(-1).expand(len(alive))
        keep = [i for i, r in enumerate(alive) if not on_token(r, int(tokens[i]))]
        alive = [alive[i] for i in keep]
        if not alive:
            break
        logits = step(torch.tensor(keep) if t else torch.zeros(len(keep), dtype=torch.long), tokens[keep])
        st = cache.stats()
        assert st['used'] + st['free'] == st['total']
        held = cache.pos * len(alive)  # tokens actually held (no sharing left after the first write)
        assert st['used'] * page - held < page * len(alive)  # waste < one page per sequence
    cache.reorder(torch.arange(0))
    st = cache.stats()
    assert st['used'] == 0 and st['free'] == st['total'] and cache.nbytes() == st['total'] * 2 * 2 * page * 32 * 4


@pytest.mark.parametrize('pos_emb', ['rope', 'alibi', 'none', 'learned'])
@pytest.mark.parametrize('kind', ['contiguous', 'paged'])
@torch.no_grad()
def test_streaming_sinks_far_past_block_size(pos_emb, kind):
    """StreamingLLM: 4x block_size tokens with a cache bounded to S+W, no NaN. Before the first eviction it
    equals the no-cache path; after, with one layer and relative positions (rope/alibi/none), every step
    equals a no-cache run over exactly the tokens the cache keeps: that is what re-indexed positions mean.
    (With more layers the kept K/V still carry the evicted context, and learned positions are absolute.)"""
    S, W, block = 2, 6, 16
    keep = S + W - 1
    for n_layer in (1, 2):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=block, vocab_size=64, n_layer=n_layer, n_head=4, n_embd=32,
                              pos_emb=pos_emb, sliding_window=W, attn_sinks=S)).eval()
        if kind == 'contiguous':
            cache = ContiguousKVCache(n_layer, 1, 10, keep=keep, sinks=S)
        else:
            cache = shuffled(PagedKVCache(n_layer, 1, 10, page_size=4, keep=keep, sinks=S, offload=True), n=8)
        toks = [7, 3, 9]
        logits = model(torch.tensor([toks]), kv_cache=cache)[0][:, -1]
        for _ in range(4 * block):
            assert torch.isfinite(logits).all()
            if len(toks) <= keep + 1:
                torch.testing.assert_close(logits, model(torch.tensor([toks]))[0][:, -1], atol=1e-4, rtol=0)
            elif n_layer == 1 and pos_emb != 'learned':
                held = toks[:S] + toks[len(toks) - (keep + 1 - S):]
                torch.testing.assert_close(logits, model(torch.tensor([held]))[0][:, -1], atol=1e-4, rtol=0)
            toks.append(int(torch.multinomial(logits.softmax(-1), 1)))
            logits = model(torch.tensor([[toks[-1]]]), kv_cache=cache)[0][:, -1]
            assert cache.seq_len <= S + W
        if kind == 'paged':  # memory stays bounded too: the sinks' block + the window's blocks + a partial one
            assert cache.stats()['used'] + cache.stats()['host'] <= 1 + -(-W // 4) + 1


@pytest.mark.parametrize('kind', ['contiguous', 'paged'])
def test_streaming_through_make_kv_cache_and_generate(kind):
    """The model's own make_kv_cache streams too: 4x block_size tokens via sample.py, bounded cache."""
    model = tiny(block_size=16, pos_emb='rope', sliding_window=6, attn_sinks=2)
    logits, step = sample.start_decoding(model, [1, 2, 3], 8, kv_cache=kind, page_size=4)
    for _ in range(64):
        assert torch.isfinite(logits).all() and step.cache.seq_len <= 2 + 6
        logits = step(torch.zeros(1, dtype=torch.long), logits.argmax(-1))
    assert step.cache.pos == 3 + 64
    out = sample.generate(model, [1, 2, 3], 64, num_samples=2, seed=0, kv_cache=kind, page_size=4)
    assert [len(o) for o in out] == [64, 64]


def test_learned_positions_past_block_size():
    """The cache path stops with an error naming block_size; generate() falls back to the cropped re-run."""
    model = tiny(block_size=16)
    cache = model.make_kv_cache(1, 40)
    with pytest.raises(Exception, match='block_size'):
        for t in range(20):
            model(torch.tensor([[t]]), kv_cache=cache)
    ref = sample.generate(model, [1, 2], 30, strategy='greedy', kv_cache='none')
    assert sample.generate(model, [1, 2], 30, strategy='greedy', kv_cache='contiguous') == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (pinned host memory)')
def test_offload_pinned_roundtrip_cuda():
    model = tiny(pos_emb='rope').cuda()
    ref = sample.generate(model, [1, 2, 3], 80, strategy='greedy', kv_cache='contiguous')
    cache_out = sample.generate(model, [1, 2, 3], 80, strategy='greedy', kv_cache='paged', page_size=8, offload=True)
    assert ref == cache_out


def test_paged_reads_a_view_when_blocks_are_consecutive_and_gathers_otherwise():
    """One sequence whose blocks sit in consecutive pool slots is read in place (no per-step copy of the
    whole context); a shuffled pool is gathered. Both return the same tokens."""
    x = torch.randn(1, 2, 10, 4)  # (B, heads, T, d)
    for cache, in_place in ((PagedKVCache(1, 1, 16, page_size=4), True),
                            (shuffled(PagedKVCache(1, 1, 16, page_size=4), n=8, seed=3), False)):
        out, = cache.update(0, x)
        assert torch.equal(out, x)
        pool = cache.pools[0][0]
        assert (out.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()) == in_place


@pytest.mark.parametrize('name', ['rope', 'gqa', 'mla', 'mqa_manual'])
@pytest.mark.parametrize('kind', ['contiguous', 'paged'])
@torch.no_grad()
def test_bf16_weights_with_fp32_cache_track_the_fp32_model(kind, name):
    """sample.py --dtype=bfloat16 on CPU: weights cast to bf16, K/V kept in fp32 (kv_dtype auto). Every
    decode step stays within bf16 rounding of the fp32 model's no-cache logits, and the cache really is fp32."""
    ref_model, model = tiny(**CONFIGS[name]), tiny(**CONFIGS[name]).to(torch.bfloat16)
    toks = [3, 1, 4, 1, 5]
    cache = model.make_kv_cache(1, 64, kind=kind, page_size=4, dtype=torch.float32)
    logits = model(torch.tensor([toks]), kv_cache=cache)[0][:, -1]
    for _ in range(30):
        ref = ref_model(torch.tensor([toks]))[0][:, -1]
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, ref, atol=2e-2, rtol=0)
        toks.append(int(ref.argmax()))
        logits = model(torch.tensor([toks[-1:]]), kv_cache=cache)[0][:, -1]
    bufs = cache.bufs if kind == 'contiguous' else cache.pools
    assert all(b.dtype == torch.float32 for layer in bufs for b in layer)
