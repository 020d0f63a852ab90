"""sample.py: decoding strategies against brute force, penalties, determinism, beam search against
exhaustive search, the length-penalty case, diversity (self-BLEU), self-consistency, ChatML, the CLI."""
import ast
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn

import sample
from model import GPT, GPTConfig, ContiguousKVCache, PagedKVCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEG = float('-inf')


def tiny(vocab_size=64, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


def tied_logits(B=64, V=20, seed=0):
    """Random logits with many exact ties (values on a coarse grid)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-6, 6, (B, V), generator=g).float() / 2


def kept(logits):
    return set(torch.isfinite(logits).nonzero().tolist()) if logits.dim() == 1 else \
        [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in logits]


# -- strategies vs brute force ---------------------------------------------------------------------------

def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(50, 30)
    assert torch.equal(sample.choose(logits, 'greedy'), logits.argmax(-1))
    assert torch.equal(sample.choose(logits, 'sample', temperature=0), logits.argmax(-1))  # no division by 0
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(sample.choose(sample.process_logits(logits, top_k=1), 'sample', 1.0, g), logits.argmax(-1))


def test_top_k_keeps_ties_and_k_equal_v_is_identity():
    logits = tied_logits()
    for k in (1, 3, 7):
        for row, keep in zip(logits, kept(sample.top_k_filter(logits, k))):
            kth = sorted(row.tolist(), reverse=True)[k - 1]
            assert keep == {i for i, x in enumerate(row.tolist()) if x >= kth}
    assert torch.equal(sample.top_k_filter(logits, logits.size(1)), logits)


def brute_top_p(row, p):
    """Smallest set of most probable tokens with mass >= p, taking tied tokens together; top token always."""
    probs = row.softmax(-1).tolist()
    for v in sorted(set(probs), reverse=True):
        keep = {i for i, q in enumerate(probs) if q >= v}
        if sum(probs[i] for i in keep) >= p:
            return keep
    return set(range(len(probs)))


@pytest.mark.parametrize('p', [0.0, 0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_brute_force_with_ties(p):
    for logits in (tied_logits(seed=1), torch.randn(64, 20) * 2):
        out = kept(sample.top_p_filter(logits, p))
        assert out == [brute_top_p(r, p) for r in logits]
        assert all(int(r.argmax()) in k for r, k in zip(logits, out))
    assert torch.equal(sample.top_p_filter(logits, 1.0), logits)


@pytest.mark.parametrize('min_p', [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_brute_force_with_ties(min_p):
    for logits in (tied_logits(seed=2), torch.randn(64, 20) * 2):
        out = kept(sample.min_p_filter(logits, min_p))
        for row, keep in zip(logits, out):
            probs = row.softmax(-1).tolist()
            assert keep == {i for i, q in enumerate(probs) if q >= min_p * max(probs)}
            assert int(row.argmax()) in keep


def test_sampling_frequencies_follow_the_kept_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    proc = sample.process_logits(logits, temperature=0.7, top_k=4, top_p=0.9)
    target = proc.softmax(-1)[0]
    g = torch.Generator().manual_seed(0)
    draws = sample.choose(proc.expand(20000, -1), 'sample', 0.7, g)
    freq = torch.bincount(draws, minlength=6).float() / 20000
    assert torch.allclose(freq, target, atol=0.015) and freq[target == 0].sum() == 0


# -- penalties --------------------------------------------------------------------------------------------

def test_repetition_penalty_hf_ctrl_convention():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -0.5]])
    out = sample.apply_repetition_penalty(logits, torch.tensor([[0, 1, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, -0.5]]  # once per id, whatever its count
    p0, p1 = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert p1[0] < p0[0] and p1[1] < p0[1]   # penalized tokens lose probability whatever their sign


def test_frequency_presence_openai_convention():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0., 1., 3., 0.]])
    out = sample.apply_frequency_presence(logits, counts, 0.5, 0.25)
    assert out.tolist() == [[0.0, -0.75, -1.75, 0.0]]


def test_no_repeat_ngram_bans_exactly_and_generation_has_no_repeats():
    seq = [1, 2, 3, 1, 2, 4, 1, 2]
    out = sample.ban_repeated_ngrams(torch.zeros(1, 6), [seq], 3)
    assert {i for i in range(6) if out[0, i] == NEG} == {3, 4}  # (1,2)->3 and (1,2)->4 were seen
    assert not torch.isinf(sample.ban_repeated_ngrams(torch.zeros(1, 6), [[1, 2]], 3)).any()
    model = tiny(vocab_size=16)
    toks = sample.generate(model, [1, 2, 3], 40, strategy='greedy', no_repeat_ngram=2)[0]
    full = [1, 2, 3] + toks
    grams = list(zip(full, full[1:]))
    assert len(grams) == len(set(grams))


def test_penalties_in_generate_change_only_what_they_should():
    model = tiny(vocab_size=16)
    plain = sample.generate(model, [1, 2], 30, strategy='greedy')[0]
    assert len(set(plain)) < len(plain)  # the tiny random model repeats itself
    pen = sample.generate(model, [1, 2], 30, strategy='greedy', presence_penalty=100.0)[0]
    # -100 outweighs any logit gap of this model: no token twice while fresh ones remain, so the first
    # 16 tokens are the whole vocabulary once each
    assert len(pen) == 30 and sorted(pen[:16]) == list(range(16))


# -- determinism ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('knobs', [
    dict(strategy='greedy'), dict(strategy='sample', temperature=1.0), dict(strategy='sample', top_k=5),
    dict(strategy='sample', top_p=0.9), dict(strategy='sample', min_p=0.1, temperature=1.3),
    dict(strategy='sample', repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5, no_repeat_ngram=3)])
@pytest.mark.parametrize('kv_cache', ['contiguous', 'paged'])
def test_same_seed_same_text(knobs, kv_cache):
    model = tiny()
    runs = [sample.generate(model, [5, 6], 30, num_samples=3, seed=7, kv_cache=kv_cache, page_size=8, **knobs)
            for _ in range(2)]
    assert runs[0] == runs[1]
    if knobs['strategy'] == 'sample':
        other = sample.generate(model, [5, 6], 30, num_samples=3, seed=8, kv_cache=kv_cache, page_size=8, **knobs)
        assert other != runs[0]


def test_beam_is_deterministic_and_beam_1_is_greedy():
    model = tiny()
    a = sample.beam_search(model, [5, 6], 12, beam_size=4, n_best=4)
    assert a == sample.beam_search(model, [5, 6], 12, beam_size=4, n_best=4, kv_cache='paged', page_size=4)
    greedy = sample.generate(model, [5, 6], 12, strategy='greedy')[0]
    assert sample.beam_search(model, [5, 6], 12, beam_size=1)[0][0] == greedy


def test_stop_tokens_and_on_token_stop():
    model = tiny(vocab_size=16)
    full = sample.generate(model, [1], 20, strategy='greedy')[0]
    cut = sample.generate(model, [1], 20, strategy='greedy', stop_ids=[full[5]])[0]
    assert cut == full[:full.index(full[5])]
    seen = []
    out = sample.generate(model, [1], 20, strategy='greedy', on_token=lambda r, t: seen.append(t) or len(seen) == 3)[0]
    assert out == seen == full[:3]


# -- beam search ------------------------------------------------------------------------------------------

def exhaustive(model, prompt, V, max_len, eos, alpha):
    """Score every hypothesis: sequences of non-EOS tokens ending in EOS (or cut at max_len)."""
    hyps = []
    for n in range(1, max_len + 1):
        for body in itertools.product([t for t in range(V) if t != eos], repeat=n - 1):
            for last in ([eos] if n < max_len else [eos]) + ([] if n < max_len else [t for t in range(V) if t != eos]):
                seq = list(body) + [last]
                with torch.no_grad():
                    logp = model(torch.tensor([prompt + seq]))[0][0, len(prompt) - 1:-1].log_softmax(-1)
                s = logp.gather(1, torch.tensor(seq)[:, None]).sum().item()
                hyps.append((sample.sequence_score(s, n, alpha), seq))
    return sorted(hyps, key=lambda h: -h[0])


@pytest.mark.parametrize('alpha', [0.0, 1.0, -0.5])
@pytest.mark.parametrize('kv_cache', ['contiguous', 'paged', 'none'])
def test_beam_equals_exhaustive_search(alpha, kv_cache):
    V, L, eos = 4, 3, 0
    model = tiny(vocab_size=V)
    K = V ** L  # more beams than extensions at any step: nothing is pruned, so beam search is exhaustive
    best = exhaustive(model, [1, 2], V, L, eos, alpha)[:K]
    got = sample.beam_search(model, [1, 2], L, beam_size=K, length_penalty=alpha, early_stopping='never',
                             eos_ids=[eos], n_best=K, kv_cache=kv_cache, page_size=2)
    assert [toks for toks, _ in got] == [toks for _, toks in best]
    assert [s for _, s in got] == pytest.approx([s for s, _ in best], abs=1e-5)


class ScriptedLM(nn.Module):
    """A fake LM whose next-token log-probs are a function of the history, kept in a real KV cache."""

    def __init__(self, fn, vocab_size):
        super().__init__()
        self.fn, self.V, self.dummy = fn, vocab_size, nn.Parameter(torch.zeros(1))
        self.config = GPTConfig(block_size=1000, vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=4)

    def make_kv_cache(self, batch_size, max_len, kind='contiguous', page_size=256, offload=False, device=None,
                      dtype=None):  # GPT.make_kv_cache's signature
        if kind == 'paged':
            return PagedKVCache(1, batch_size, max_len, page_size=page_size, offload=offload, dtype=dtype)
        return ContiguousKVCache(1, batch_size, max_len, dtype=dtype)

    def forward(self, idx, kv_cache=None):
        hist = idx if kv_cache is None else kv_cache.update(0, idx[..., None].float())[0][..., 0].long()
        logits = torch.zeros(idx.size(0), idx.size(1), self.V)
        for b, row in enumerate(hist.tolist()):
            logits[b, -1] = torch.tensor(self.fn(row[1:]))  # row[0] is the prompt token
        return logits, None


def length_penalty_lm(gen):
    """EOS=0, A=1, B=2, F=3 (filler), D=4 (dead end, then uniform over 999 tokens: -6.9 per step).
    A F*8 EOS: 10 tokens, total log-prob -10.0; B F*18 EOS: 20 tokens, total -10.5."""
    V = 1000
    if not gen:
        lp = {1: math.log(0.45), 2: math.log(0.45), 4: math.log(0.1)}
    elif 4 in gen:
        return [-60.0] + [-math.log(V - 1)] * (V - 1)
    else:
        n_fill, step = (8, (-10.0 - math.log(0.45)) / 9) if gen[0] == 1 else (18, (-10.5 - math.log(0.45)) / 19)
        lp = {3 if len(gen) <= n_fill else 0: step, 4: math.log(1 - math.exp(step))}
    return [lp.get(i, -60.0) for i in range(V)]


@pytest.mark.parametrize('kv_cache', ['contiguous', 'paged', 'none'])
def test_length_penalty_short_vs_long(kv_cache):
    """The course's test: penalty off, the 10-token hypothesis wins; length_penalty=0.6, the 20-token one
    with a slightly lower total log-prob wins."""
    model = ScriptedLM(length_penalty_lm, 1000)
    kw = dict(beam_size=4, early_stopping='never', eos_ids=[0], kv_cache=kv_cache, page_size=4)
    off = sample.beam_search(model, [9], 25, length_penalty=0.0, **kw)
    assert off[0][0] == [1] + [3] * 8 + [0] and off[0][1] == pytest.approx(-10.0, abs=1e-4)
    on = sample.beam_search(model, [9], 25, length_penalty=0.6, **kw)
    assert on[0][0] == [2] + [3] * 18 + [0] and on[0][1] == pytest.approx(-10.5 / 20 ** 0.6, abs=1e-4)
    assert sample.sequence_score(-10.0, 10, 0.0) > sample.sequence_score(-10.5, 20, 0.0)
    assert sample.sequence_score(-10.0, 10, 0.6) < sample.sequence_score(-10.5, 20, 0.6)


def test_beam_early_stopping_modes():
    """True stops first, False (heuristic) no sooner, 'never' (exact bound) last: best scores in that order."""
    model = tiny(vocab_size=6)
    best = {}
    for mode in (True, False, 'never'):
        hyps = sample.beam_search(model, [1, 2], 12, beam_size=3, length_penalty=1.0, early_stopping=mode, eos_ids=[0])
        assert len(hyps) == 3 and all(h[0][-1] == 0 or len(h[0]) == 12 for h in hyps)
        best[mode] = hyps[0][1]
    assert best[True] <= best[False] <= best['never']


# -- diversity: self-BLEU ---------------------------------------------------------------------------------

def bleu(hyp, refs, n_max=4):
    """BLEU-4 of token list `hyp` against `refs`: clipped n-gram precisions with add-one smoothing for
    n > 1 (Lin & Och 2004), geometric mean, brevity penalty with the closest reference length."""
    logs = []
    for n in range(1, n_max + 1):
        grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        best = Counter()
        for r in refs:
            best |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        match, total = sum(min(c, best[g]) for g, c in grams.items()), max(1, sum(grams.values()))
        logs.append(math.log((match + (n > 1)) / (total + (n > 1))) if match + (n > 1) else -1e9)
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / max(1, len(hyp)))
    return bp * math.exp(sum(logs) / n_max)


def self_bleu(samples):
    """Self-BLEU (Zhu et al. 2018): mean BLEU-4 of each sample against all the others. 1.0 = identical."""
    return sum(bleu(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples)) / len(samples)


class BigramLM(nn.Module):
    """A Zipfian bigram model: p(next) ~ 1 / (rank + 1)^1.2 under a random permutation per token."""

    def __init__(self, V=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        rank = torch.stack([torch.randperm(V, generator=g) for _ in range(V)]).float()
        self.table, self.dummy = -1.2 * torch.log(rank + 1), nn.Parameter(torch.zeros(1))
        self.config = GPTConfig(block_size=1000, vocab_size=V, n_layer=1, n_head=1, n_embd=4)

    def forward(self, idx, kv_cache=None):
        return self.table[idx], None


def test_self_bleu_falls_as_k_grows_and_top_p_sits_between():
    model = BigramLM()
    assert self_bleu([[1, 2, 3, 4, 5]] * 4) == pytest.approx(1.0)

    def sb(**knobs):
        return self_bleu(sample.generate(model, [0], 24, num_samples=50, seed=0, kv_cache='none', **knobs))
    curve = {f'k={k}': sb(top_k=k) for k in (1, 2, 5, 10, 20, 50)}
    curve['p=0.95'] = sb(top_p=0.95)
    print('\nself-BLEU over 50 samples of 24 tokens:', {k: round(v, 3) for k, v in curve.items()})
    ks = [curve[f'k={k}'] for k in (1, 2, 5, 10, 20, 50)]
    assert ks[0] == pytest.approx(1.0)  # k=1 is greedy: 50 identical samples
    assert all(a > b for a, b in zip(ks, ks[1:]))
    assert ks[-1] < curve['p=0.95'] < ks[0]
    greedy = sample.generate(model, [0], 24, kv_cache='none', strategy='greedy')[0]
    assert sample.generate(model, [0], 24, kv_cache='none', top_k=1, seed=3)[0] == greedy


# -- self-consistency -------------------------------------------------------------------------------------

def test_majority_vote_ties_go_to_first_and_extract_answer():
    assert sample.majority_vote(['7', '5', '5', '7'])[0] == '7'
    assert sample.majority_vote(['3', '5', '5'])[0] == '5'
    assert sample.extract_answer('<think>2+2 is 4, no 5</think>\n 4 \nbecause<|im_end|>junk') == '4'
    assert sample.extract_answer('plain answer\n') == 'plain answer'


class CharTok:
    """A char tokenizer with ChatML/think special tokens, in the shape of prepare.load_tokenizer's."""

    def __init__(self):
        self.chars = [chr(i) for i in range(32, 127)] + ['\n']
        names = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<think>', '</think>']
        self.special_tokens = {n: len(self.chars) + i for i, n in enumerate(names)}
        self.vocab_size, self.eot_id, self.kind = len(self.chars) + len(names), self.special_tokens['<|endoftext|>'], 'char'

    def encode(self, text, allowed_special=()):
        return [self.chars.index(c) for c in text]  # specials never come from text in this toy

    def decode(self, ids):
        inv = {v: k for k, v in self.special_tokens.items()}
        return ''.join(inv.get(i) or self.chars[i] for i in ids)


def test_self_consistency_n1_is_one_sample_and_vote_is_deterministic():
    tok = CharTok()
    model = tiny(vocab_size=tok.vocab_size)
    one = sample.generate(model, [1, 2], 10, num_samples=1, seed=3)[0]
    ans, votes, texts = sample.self_consistent_answer(model, tok, [1, 2], n=1, max_new_tokens=10, seed=3)
    assert texts == [tok.decode(one)] and ans == sample.extract_answer(texts[0]) and votes[ans] == 1
    a = sample.self_consistent_answer(model, tok, [1, 2], n=5, max_new_tokens=10, seed=4)
    assert a == sample.self_consistent_answer(model, tok, [1, 2], n=5, max_new_tokens=10, seed=4)


# -- ChatML and streaming text ----------------------------------------------------------------------------

def test_chat_prompt_has_no_injected_specials_and_keeps_history():
    tok = CharTok()
    first = sample.chat_prompt_ids(tok, [], 'hi <|im_end|> there')
    assert tok.decode(first) == '<|im_start|>user\nhi <|im_end|> there<|im_end|>\n<|im_start|>assistant\n'
    assert first.count(tok.special_tokens['<|im_end|>']) == 1 and first.count(tok.special_tokens['<|im_start|>']) == 2
    history = first + tok.encode('4') + [tok.special_tokens['<|im_end|>']]
    second = sample.chat_prompt_ids(tok, history, 'and 5?')
    assert tok.decode(second).startswith(tok.decode(history) + '\n<|im_start|>user\nand 5?<|im_end|>')


def test_text_stream_hides_think_and_stops_on_string():
    import io
    tok, sp = CharTok(), CharTok().special_tokens
    ids = [sp['<think>']] + tok.encode('secret') + [sp['</think>']] + tok.encode('\nthe answer. END more')
    for show_think, expect in ((False, '\nthe answer. '), (True, '<think>secret</think>\nthe answer. ')):
        out = io.StringIO()
        stream = sample.TextStream(tok, show_think=show_think, stop='END', out=out)
        stops = [stream(t) for t in ids]
        assert stops.index(True) == len(ids) - len(' more') - 1  # stops on the D of END
        assert out.getvalue() == expect and stream.text() == expect


# -- CLI end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def chat_ckpt(tmp_path_factory):
    """A random-weight checkpoint over the offline synth twin's char tokenizer (ChatML + think tokens)."""
    import prepare
    root = tmp_path_factory.mktemp('chat')
    data = str(root / 'synth')
    prepare.main(['synth', '--source=local', '--n_samples=100', '--tokenizer=char', f'--out={data}'])
    tok = prepare.load_tokenizer(data)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, pos_emb='rope'))
    from dataclasses import asdict
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config),
                'config': {'dataset': 'synth', 'data_dir': data}}, root / 'ckpt.pt')
    return str(root)


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, 'sample.py', *args], cwd=ROOT, capture_output=True, text=True,
                          input=stdin, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)


def samples_of(stdout, n):
    """The n texts printed by a num_samples > 1 run: each is prompt + continuation, then a dashed line."""
    blocks = stdout.split('---------------\n')
    assert len(blocks) == n + 1 and blocks[-1] == ''
    return [b.removesuffix('\n') for b in blocks[:-1]]


def beams_of(stdout):
    """[(score, n_tokens, text)] of a beam run: '--- score S (N tokens)' then the text."""
    parts = re.split(r'^--- score (-?[\d.]+) \((\d+) tokens\)\n', stdout, flags=re.M)
    assert parts[0] == ''
    return [(float(s), int(n), t.rstrip('\n')) for s, n, t in zip(parts[1::3], parts[2::3], parts[3::3])]


def check_samples(stdout):
    texts = samples_of(stdout, 2)
    assert all(t.startswith('12') for t in texts) and any(len(t) > 2 for t in texts)


def check_beams(n_best, max_new):
    def check(stdout):
        hyps = beams_of(stdout)
        assert len(hyps) == n_best and all(s <= 0 and 1 <= n <= max_new for s, n, _ in hyps)
        assert [s for s, _, _ in hyps] == sorted((s for s, _, _ in hyps), reverse=True)  # best first
        assert all(t.startswith('12') for _, _, t in hyps)
    return check


def check_streamed(stdout):  # one sample: the prompt, the text as it streams, a newline and the dashed line
    assert stdout.startswith('12') and stdout.endswith('\n---------------\n') and len(stdout) > len('12\n' + '-' * 16)


def check_chat(stdout):  # the assistant's reply: one line of random-model text
    assert stdout.endswith('\n') and stdout.strip()


def check_vote(stdout):  # the majority answer, then the votes of the 3 samples
    votes = ast.literal_eval(stdout.splitlines()[-1].removeprefix('(votes: ').removesuffix(')'))
    assert sum(votes.values()) == 3 and max(votes.values()) == votes[stdout.splitlines()[-2]]


@pytest.mark.parametrize('args,check', [
    (['--start=12', '--num_samples=2', '--max_new_tokens=20', '--top_p=0.9', '--kv_cache=paged', '--page_size=4'],
     check_samples),
    (['--start=12', '--strategy', 'beam', '--beam_size=3', '--n_best=2', '--max_new_tokens=10'], check_beams(2, 10)),
    (['--prompt=What is 2+3?', '--max_new_tokens=20', '--show_think'], check_chat),
    (['--prompt=What is 2+3?', '--max_new_tokens=10', '--self_consistency=3', '--temperature=1.0'], check_vote),
    (['--start=12', '--max_new_tokens=10', '--dtype=bfloat16', '--kv_cache=paged', '--page_size=4'],  # fp32 cache
     check_streamed),
    (['--start=12', '--max_new_tokens=10', '--dtype=bfloat16', '--kv_dtype=bfloat16', '--strategy=beam'],
     check_beams(1, 10)),
])
def test_cli_generates(chat_ckpt, args, check):
    r = run_cli(f'--out_dir={chat_ckpt}', *args)
    assert r.returncode == 0, r.stderr
    check(r.stdout)


def test_cli_int8_greedy_is_the_same_with_and_without_the_cache(chat_ckpt):
    outs = [run_cli(f'--out_dir={chat_ckpt}', '--start=12', '--max_new_tokens=12', '--strategy=greedy',
                    '--quantize=int8', f'--kv_cache={kv}') for kv in ('contiguous', 'none')]
    assert all(r.returncode == 0 for r in outs), outs[0].stderr
    assert outs[0].stdout == outs[1].stdout and len(outs[0].stdout.split('---')[0]) > len('12')
    r = run_cli(f'--out_dir={chat_ckpt}', '--quantize=int4')
    assert r.returncode == 2 and 'quantize must be none|int8|bf16' in r.stderr


def test_cli_bf16_weights_decode_with_fp32_activations(chat_ckpt):
    r = run_cli(f'--out_dir={chat_ckpt}', '--start=12', '--max_new_tokens=12', '--strategy=greedy', '--quantize=bf16')
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split('---')[0]) > len('12')


def test_cli_chat_keeps_history_until_eof(chat_ckpt):
    r = run_cli(f'--out_dir={chat_ckpt}', '--chat', '--max_new_tokens=5', '--strategy=greedy',
                stdin='What is 2+3?\n/reset\nSort 3, 1, 2.\n')
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('>>> ') == 4  # three inputs, then EOF ends the chat


def test_cli_start_from_file_and_bad_values(chat_ckpt, tmp_path):
    p = tmp_path / 'prompt.txt'
    p.write_text('12+3')
    assert run_cli(f'--out_dir={chat_ckpt}', f'--start=FILE:{p}', '--max_new_tokens=5').returncode == 0
    for bad in (['--strategy=best'], [f'--start=FILE:{tmp_path}/nope.txt'], ['--dtype=fp8'], ['--kv_dtype=int8']):
        r = run_cli(f'--out_dir={chat_ckpt}', *bad)
        assert r.returncode == 2 and r.stderr.startswith('error:'), r.stderr


def test_cli_missing_checkpoint_is_exit_2(tmp_path):
    r = subprocess.run([sys.executable, 'sample.py', f'--out_dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and 'ckpt.pt' in r.stderr and r.stderr.count('\n') == 1


def test_cli_unknown_key_is_exit_2():
    r = subprocess.run([sys.executable, 'sample.py', '--top_kk=3'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and 'top_k' in r.stderr


@pytest.fixture
def main(monkeypatch, capsys):
    """sample.main(argv) in this process: (exit code, stdout, stderr); the config globals it sets are restored."""
    from configurator import config_keys
    for k in config_keys(vars(sample)):
        monkeypatch.setattr(sample, k, getattr(sample, k))

    def run(*argv):
        try:
            sample.main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


def one_error_line(code, err):
    return code == 2 and err.startswith('error: ') and err.count('\n') == 1


@pytest.mark.parametrize('args,valid', [
    (['--temperature=-1'], '>= 0'), (['--top_p=2'], 'in [0, 1]'), (['--top_p=-0.1'], 'in [0, 1]'),
    (['--top_k=-1'], '>= 0'), (['--min_p=1.5'], 'in [0, 1]'), (['--repetition_penalty=0'], '> 0'),
    (['--no_repeat_ngram=-2'], '>= 0'), (['--max_new_tokens=-5'], '>= 1'), (['--max_new_tokens=0'], '>= 1'),
    (['--num_samples=0'], '>= 1'), (['--strategy=beam', '--beam_size=0'], '>= 1'),
    (['--beam_size=3', '--n_best=4'], 'in [1, beam_size=3]'), (['--n_best=0'], 'in [1, beam_size=4]'),
    (['--page_size=0'], '>= 1'), (['--self_consistency=-1'], '>= 0'), (['--eval_per_type=0'], '>= 1'),
])
def test_knob_out_of_range_is_one_line_naming_value_and_range(main, chat_ckpt, args, valid):
    code, out, err = main(f'--out_dir={chat_ckpt}', *args)
    key, value = args[-1][2:].split('=')
    assert one_error_line(code, err) and not out, err
    assert f'{key}={value}' in err.replace('.0 ', ' ') and valid in err, err


def test_knob_range_edges_are_valid(main, chat_ckpt):
    """The ends of each range run: temperature 0 (greedy), top_p 0 and 1, min_p 1, n_best = beam_size."""
    for args in (['--temperature=0', '--top_p=0', '--min_p=1', '--top_k=0'], ['--top_p=1', '--no_repeat_ngram=0'],
                 ['--strategy=beam', '--beam_size=2', '--n_best=2']):
        code, out, err = main(f'--out_dir={chat_ckpt}', '--start=12', '--max_new_tokens=1', *args)
        assert code == 0 and '12' in out, err


# -- inference-time overrides of the checkpoint's model flags ---------------------------------------------

def test_streaming_override_generates_past_block_size_on_a_bounded_cache(chat_ckpt):
    """--sliding_window/--attn_sinks on a RoPE checkpoint trained without them: 4x block_size tokens, the cache
    holding at most sinks + window tokens (without the override it holds everything)."""
    path = os.path.join(chat_ckpt, 'ckpt.pt')
    model = sample.load_checkpoint(path, {'sliding_window': 16, 'attn_sinks': 4})[0].eval()
    plain = sample.load_checkpoint(path)[0].eval()
    assert model.config.block_size == 64 and plain.config.sliding_window == 0
    for m, bounded in ((model, True), (plain, False)):
        logits, step = sample.start_decoding(m, [1, 2, 3], 3 + 256)
        for _ in range(256):
            assert torch.isfinite(logits).all()
            logits = step(torch.zeros(1, dtype=torch.long), logits.argmax(-1))
        assert step.cache.pos == 3 + 256 and (step.cache.seq_len <= 4 + 16) == bounded
    assert [len(o) for o in sample.generate(model, [1, 2, 3], 256, num_samples=2, seed=0)] == [256, 256]


def test_cli_streaming_override_long_generation(chat_ckpt):
    r = run_cli(f'--out_dir={chat_ckpt}', '--sliding_window=16', '--attn_sinks=4', '--max_new_tokens=256',
                '--start=12', '--strategy=greedy', '--kv_cache=paged', '--page_size=8')
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith('note: inference overrides') and 'sliding_window=16' in r.stderr \
        and 'attn_sinks=4' in r.stderr
    text = r.stdout.removesuffix('\n---------------\n')
    assert text.startswith('12') and len(text) - 2 > 64  # char tokens: the text went past block_size=64


@torch.no_grad()
def test_rope_scaling_override_changes_the_logits(tmp_path):
    """Linear scaling divides positions by rope_factor: the same weights give the same logits at position 0
    (angle 0 either way) and different ones after it. init_std 0.5: attention far from uniform, so positions
    matter (at 0.02 they move the logits by ~1e-5)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=32, n_layer=1, n_head=2, n_embd=16, pos_emb='rope', init_std=0.5))
    path = str(tmp_path / 'ckpt.pt')
    torch.save({'model': model.state_dict(), 'model_args': model.config.__dict__}, path)
    plain = sample.load_checkpoint(path)[0].eval()
    scaled = sample.load_checkpoint(path, {'rope_scaling': 'linear', 'rope_factor': 4.0})[0].eval()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), scaled.state_dict().values()))
    x = torch.randint(32, (1, 64), generator=torch.Generator().manual_seed(0))  # 2x block_size
    a, b = plain(x)[0], scaled(x)[0]
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert (a[:, 1:] - b[:, 1:]).abs().amax(-1).min() > 1e-2


@pytest.mark.parametrize('flag', ['--n_layer=4', '--vocab_size=10', '--n_embd=32', '--pos_emb=alibi', '--bias=False'])
def test_shape_flag_override_is_exit_2(main, chat_ckpt, flag):
    code, out, err = main(f'--out_dir={chat_ckpt}', flag)
    assert one_error_line(code, err) and flag.split('=')[0] in err and 'inference flags' in err, err


@pytest.mark.parametrize('args,says', [
    (['--rope_scaling=foo', '--rope_factor=4'], "rope_scaling='foo'"), (['--rope_factor=0.5'], 'rope_factor=0.5'),
    (['--rope_scaling=yarn'], 'changes nothing'), (['--rope_factor=4'], 'changes nothing'),
    (['--sliding_window=-1'], 'sliding_window=-1'), (['--sliding_window=abc'], "'abc'"),
    (['--attn_sinks=4'], 'sliding_window'), (['--attn_sinks=True', '--sliding_window=8'], 'attn_sinks'),
    (['--attn_impl=flash'], "attn_impl='flash'"),
])
def test_bad_override_is_one_error_line(main, chat_ckpt, args, says):
    code, out, err = main(f'--out_dir={chat_ckpt}', *args)
    assert one_error_line(code, err) and says in err, err


# -- checkpoint discovery ---------------------------------------------------------------------------------

def test_newest_out_checkpoint_when_out_dir_not_given(main, chat_ckpt, tmp_path, monkeypatch):
    """No --out_dir and no out/ckpt.pt: the newest out*/ckpt.pt by mtime (not by name), said first on stderr.
    The older one is not a checkpoint, so loading it would fail."""
    monkeypatch.chdir(tmp_path)
    code, out, err = main('--max_new_tokens=2')
    assert one_error_line(code, err) and 'out/ckpt.pt' in err  # none at all: the one-line error
    (tmp_path / 'out-z').mkdir()
    (tmp_path / 'out-z' / 'ckpt.pt').write_bytes(b'not a checkpoint')
    (tmp_path / 'out-a').mkdir()
    shutil.copy(os.path.join(chat_ckpt, 'ckpt.pt'), tmp_path / 'out-a' / 'ckpt.pt')
    os.utime(tmp_path / 'out-z' / 'ckpt.pt', (1e9, 1e9))  # out-a is newer
    code, out, err = main('--start=12', '--max_new_tokens=2')
    assert code == 0 and out.startswith('12'), err
    assert err.splitlines()[0] == 'note: --out_dir not given and out/ has no checkpoint: ' \
                                  f'using {os.path.join("out-a", "ckpt.pt")} (newest of 2)'
    os.utime(tmp_path / 'out-z' / 'ckpt.pt')  # now out-z is the newest
    code, out, err = main('--start=12', '--max_new_tokens=2')
    assert code == 2 and 'out-z' in err.splitlines()[0] and 'cannot load checkpoint out-z' in err
    code, out, err = main('--out_dir=out', '--max_new_tokens=2')  # asked for out/: no fallback
    assert one_error_line(code, err) and 'no checkpoint at out/ckpt.pt' in err


def test_exercise_scoring_counts_exact_matches(chat_ckpt, monkeypatch):
    """score_exercises: per-type exact match (greedy, majority vote, verifier-gated, pass@k), with generation
    faked so the right answers are known."""
    import prepare
    import sample
    tok = prepare.load_tokenizer(os.path.join(chat_ckpt, 'synth'))
    exercises = [{'type': 'arithmetic', 'prompt': 'What is 2 + 3?', 'answer': '5'},
                 {'type': 'arithmetic', 'prompt': 'What is 2 + 4?', 'answer': '6'},
                 {'type': 'sort', 'prompt': 'Sort these numbers in ascending order: 3, 1, 2.', 'answer': '1, 2, 3'},
                 {'type': 'genre', 'prompt': 'a passage', 'answer': 'comedy'}]
    replies = {'What is 2 + 3?': ['7', '5', '5'], 'What is 2 + 4?': ['7', '8', '9'],
               'Sort these numbers in ascending order: 3, 1, 2.': ['1, 2, 3'] * 3, 'a passage': ['tragedy', 'comedy', 'comedy']}

    def fake_generate(model, ids, max_new_tokens, num_samples=1, strategy='sample', **kw):
        user = tok.decode(ids).split('user\n')[1].split('<|im_end|>')[0]
        answers = replies[user][:1] if strategy == 'greedy' else replies[user][:num_samples]
        return [tok.encode(f'<think>x</think>\n{a}', allowed_special='all') for a in answers]
    monkeypatch.setattr(sample, 'generate', fake_generate)
    scores = sample.score_exercises(None, tok, exercises, n=3, max_new_tokens=8, strategy='sample')
    # 2 + 3: greedy wrong, the vote right, the verifier accepts the 2nd sample, 2 of 3 right;
    # 2 + 4: all wrong, the verifier accepts none and the last sample counts
    assert scores['arithmetic'] == pytest.approx({'n': 2, 'greedy': 0.0, 'sc@3': 0.5, 'verifier@3': 0.5,
                                                 'pass@1': 1 / 3, 'pass@3': 0.5})
    assert scores['sort'] == {'n': 1, 'greedy': 1.0, 'sc@3': 1.0, 'verifier@3': 1.0, 'pass@1': 1.0, 'pass@3': 1.0}
    assert scores['genre'] == pytest.approx({'n': 1, 'greedy': 0.0, 'sc@3': 1.0, 'verifier@3': None,
                                            'pass@1': 2 / 3, 'pass@3': 1.0})  # no verifier for genre


def test_cli_eval_exercises_prints_a_table(chat_ckpt, tmp_path):
    r = run_cli(f'--out_dir={chat_ckpt}', '--eval_exercises=True', '--eval_per_type=1', '--max_new_tokens=4',
                '--self_consistency=2', f'--eval_json={tmp_path / "eval.json"}')
    assert r.returncode == 0, r.stderr
    saved = json.load(open(tmp_path / 'eval.json'))
    assert saved['n'] == 2 and saved['calculator'] is True  # the twin's tokenizer has the tool tokens
    assert set(next(iter(saved['scores'].values()))) == {'n', 'greedy', 'sc@2', 'verifier@2', 'pass@1', 'pass@2'}
    rows = [line for line in r.stdout.splitlines() if line.startswith('| ') and 'type' not in line]
    types = [row.split('|')[1].strip() for row in rows]  # 100 tiny samples: not every type reaches val
    assert types and set(types) <= {'arithmetic', 'count', 'sort', 'reverse', 'rag'}
    assert all(row.split('|')[2].strip() == '1' for row in rows)  # eval_per_type=1


# ---- speculative greedy: prompt lookup and draft models ----------------------------------------------------

def test_lookup_draft_finds_the_latest_longest_ngram():
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    assert sample.lookup_draft(seq, 3, 2) == [7, 5]  # the latest earlier "1 2 3" is followed by 7 5
    assert sample.lookup_draft([4, 8, 6, 8], 3, 3) == [6, 8]  # falls back to the last 1-gram "8"
    assert sample.lookup_draft([5, 2, 2, 2, 2], 1, 2) == [2, 2]  # the latest "2" with 2 tokens after it
    assert sample.lookup_draft([1, 2, 3], 3, 4) == []


@pytest.mark.parametrize('pos_emb,init_std', [('rope', 0.02), ('alibi', 1.0), ('learned', 1.0)])
def test_lookup_greedy_gives_greedy_tokens(pos_emb, init_std):
    """A small init repeats a token (every draft accepted); a large one wanders (most drafts rejected): both paths
    give the no-cache greedy tokens exactly, with or without a stop token, for every draft length."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=160, vocab_size=50, pos_emb=pos_emb,
                      init_std=init_std)).eval().double()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8] * 4 + [1, 2]
    full = sample.generate(m, prompt, 100, strategy='greedy', kv_cache='none')[0]  # the reference: no cache at all
    late = next((t for i, t in enumerate(full) if i >= 10 and full.index(t) == i), None)  # first seen after 10
    for draft_len in (1, 4, 8):
        out, forwards = sample.speculative_greedy(m, prompt, 100, draft_len=draft_len)
        assert out == full
        if init_std < 0.1:  # drafts accepted: draft_len + 1 tokens a forward
            assert forwards <= len(full) / (draft_len + 1) + 5, (draft_len, forwards)  # + the start-up
        if late is not None:
            stopped = sample.speculative_greedy(m, prompt, 100, stop_ids=[late], draft_len=draft_len)[0]
            assert stopped == full[:full.index(late)]
    assert init_std < 0.1 or len(set(full)) > 3
    streamed = []  # on_token sees every token and can stop the row
    out, _ = sample.speculative_greedy(m, prompt, 100, on_token=lambda r, t: streamed.append(t) or len(streamed) == 7)
    assert streamed == out == full[:7]


def test_cli_lookup_matches_greedy_and_refuses_other_strategies(chat_ckpt):
    args = [f'--out_dir={chat_ckpt}', '--start=12+12+12+12', '--max_new_tokens=20', '--strategy=greedy']
    plain, fast = run_cli(*args), run_cli(*args, '--speculative=lookup', '--draft_len=4')
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout and 'forwards' in fast.stderr
    r = run_cli(f'--out_dir={chat_ckpt}', '--speculative=lookup', '--strategy=sample')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'greedy' in r.stderr


@pytest.mark.parametrize('pos_emb', ['rope', 'learned'])
def test_draft_model_speculation_gives_greedy_tokens(pos_emb):
    """With a small model's drafts the tokens are the no-cache greedy tokens exactly, for every draft length, a
    stop token and on_token; a draft that is the model itself has every draft accepted (draft_len + 1 tokens per
    forward of the model), an unrelated one most rejected, and the draft's cache follows either way."""
    torch.manual_seed(1)
    kw = dict(block_size=160, vocab_size=50, pos_emb=pos_emb, init_std=1.0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, **kw)).eval().double()
    small = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, **kw)).eval().double()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    full = sample.generate(m, prompt, 100, strategy='greedy', kv_cache='none')[0]
    assert len(set(full[50:])) > 5  # it wanders: drafts of an unrelated model are mostly wrong
    late = next(t for i, t in enumerate(full) if i >= 10 and full.index(t) == i)
    for draft_len in (1, 3, 8):
        for draft_model in (small, m):
            draft = sample.DraftModel(draft_model, len(prompt) + 100 + draft_len)
            out, forwards = sample.speculative_greedy(m, prompt, 100, draft_len=draft_len, draft=draft)
            assert out == full, (draft_len, draft_model is m)
            if draft_model is m:
                assert forwards <= len(full) / (draft_len + 1) + 2, (draft_len, forwards)
            assert draft.seen == (prompt + out)[:len(draft.seen)]  # its cache holds the sequence, no stale drafts
            draft = sample.DraftModel(draft_model, len(prompt) + 100 + draft_len)
            stopped = sample.speculative_greedy(m, prompt, 100, stop_ids=[late], draft_len=draft_len, draft=draft)[0]
            assert stopped == full[:full.index(late)]
    streamed, draft = [], sample.DraftModel(small, 200)
    out, _ = sample.speculative_greedy(m, prompt, 100, on_token=lambda r, t: streamed.append(t) or len(streamed) == 7,
                                       draft=draft)
    assert streamed == out == full[:7]


def test_cli_draft_speculation_matches_greedy_and_checks_the_draft(chat_ckpt, tmp_path):
    args = [f'--out_dir={chat_ckpt}', '--start=12+12+12+12', '--max_new_tokens=20', '--strategy=greedy']
    plain = run_cli(*args)
    from dataclasses import asdict
    ckpt = torch.load(os.path.join(chat_ckpt, 'ckpt.pt'), weights_only=True)
    torch.manual_seed(1)
    # the same tokenizer, other weights
    other = GPT(GPTConfig(**{**ckpt['model_args'], 'n_embd': 8, 'n_head': 1, 'n_kv_head': 1}))
    os.makedirs(tmp_path / 'small')
    torch.save({**ckpt, 'model': other.state_dict(), 'model_args': asdict(other.config)},
               tmp_path / 'small' / 'ckpt.pt')
    for draft_dir, all_accepted in ((chat_ckpt, True), (tmp_path / 'small', False)):
        fast = run_cli(*args, '--speculative=draft', f'--draft_dir={draft_dir}', '--draft_len=4')
        assert fast.returncode == 0, fast.stderr
        assert fast.stdout == plain.stdout and 'forwards' in fast.stderr
        forwards = int(re.search(r'in (\d+) forwards', fast.stderr).group(1))
        assert (forwards == 5) == all_accepted, fast.stderr  # the prompt's, then 4 of 1 + 4 accepted drafts
    bad = GPT(GPTConfig(**{**ckpt['model_args'], 'vocab_size': ckpt['model_args']['vocab_size'] + 1}))
    os.makedirs(tmp_path / 'bad')
    torch.save({**ckpt, 'model': bad.state_dict(), 'model_args': asdict(bad.config)}, tmp_path / 'bad' / 'ckpt.pt')
    for extra in ([f'--draft_dir={tmp_path / "bad"}'], [], [f'--draft_dir={tmp_path / "missing"}']):
        r = run_cli(*args, '--speculative=draft', *extra)
        assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    r = run_cli(*args, '--speculative=lookup', f'--draft_dir={chat_ckpt}')
    assert r.returncode == 2 and 'draft_dir' in r.stderr


def test_auto_kv_dtype(monkeypatch):
    import model
    from sample import auto_kv_dtype
    for amx in (True, False):  # an AVX512-BF16 CPU without AMX keeps the fp32 cache too
        monkeypatch.setattr(model, 'cpu_has_amx', lambda: amx)
        assert auto_kv_dtype('cpu', 'float32') == 'float32' and auto_kv_dtype('cpu', 'float16') == 'float32'
        assert auto_kv_dtype('cpu', 'bfloat16') == ('bfloat16' if amx else 'float32')
        assert auto_kv_dtype('cuda', 'bfloat16') == 'bfloat16' and auto_kv_dtype('cuda:1', 'float32') == 'float32'


def test_compiled_int8_bf16_greedy_equals_eager():
    """sample.py --compile=True --quantize=int8 --dtype=bfloat16: torch.compile (dynamic shapes, inductor) of a
    RoPE model gives plain greedy's tokens, through a multi-token prompt and then one token per step; the int8
    kernel lowers (its scales are kept in the activations' dtype). The one inductor compile here takes ~30 s."""
    m = tiny(pos_emb='rope').to(torch.bfloat16).quantize_int8()
    assert all(mod.scale.dtype == torch.bfloat16 for mod in m.modules() if hasattr(mod, 'q'))
    prompt = [1, 2, 3, 4, 5]
    ref = sample.generate(m, prompt, 12, strategy='greedy', kv_dtype=torch.float32)
    out = sample.generate(torch.compile(m, dynamic=True), prompt, 12, strategy='greedy', kv_dtype=torch.float32)
    assert torch.equal(torch.as_tensor(out), torch.as_tensor(ref))
