"""tasks/: the twin's verifier, pass@k, calculator calls in the data and in generation, preference pairs."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

import prepare
import sample
from model import GPT, GPTConfig
from tasks import synth, verify
from tasks.calculator import OUTPUT_END, OUTPUT_START, TOOL_END, TOOL_START, TOOL_TOKENS, evaluate, tool_output


@pytest.fixture(scope='module')
def calc_data(tmp_path_factory):
    """The offline twin with calculator calls, char tokenizer (ChatML, think and tool tokens)."""
    out = str(tmp_path_factory.mktemp('calc') / 'synth')
    prepare.main(['synth', '--source=local', '--n_samples=200', '--tokenizer=char', '--calculator=True', f'--out={out}'])
    return out


def test_the_verifier_recomputes_every_twin_answer_from_the_prompt_alone():
    rows = synth.local_synth_rows(500, 3)
    for r in rows:
        user, _ = synth.row_to_chat(r)
        assert synth.solve(r['exercise'], user) is not None, user
        assert verify.verify(r['exercise'], user, r['synthetic_answer'])
        a = r['synthetic_answer']
        wrong = str(int(a) + 1) if r['exercise'] in ('arithmetic', 'count') else a + 'x'
        assert not verify.verify(r['exercise'], user, wrong)
    assert {r['exercise'] for r in rows} == set(synth.EXERCISES)
    # another kind's prompt, or a prompt it cannot parse, is never accepted
    assert not verify.verify('sort', 'What is 2 + 3?', '5') and not verify.verify('arithmetic', 'What is two?', '2')
    assert not verify.verify('genre', 'a passage', 'comedy')


@pytest.mark.parametrize('n,c,k', [(n, c, k) for n in (1, 2, 5, 10) for c in range(n + 1) for k in (1, 2, 5) if k <= n])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    # Chen et al. 2021: the chance that k of the n samples drawn without replacement hold a correct one
    draws = list(itertools.combinations([1] * c + [0] * (n - c), k))
    assert verify.pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    assert verify.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in ((5, 6, 1), (5, 2, 6), (5, 2, 0)):
        with pytest.raises(ValueError):
            verify.pass_at_k(n, c, k)


def test_calculator_rows_are_the_same_exercises_with_a_call_in_place_of_column_arithmetic():
    plain, calc = synth.local_synth_rows(100, 5), synth.local_synth_rows(100, 5, calculator=True)
    assert [r['query'] for r in plain] == [r['query'] for r in calc]  # the same numbers
    for p, r in zip(plain, calc):
        if r['exercise'] != 'arithmetic':
            assert r == p
            continue
        reasoning = r['synthetic_reasoning']
        expr = reasoning.split(TOOL_START)[1].split(TOOL_END)[0]
        assert f"{TOOL_END}{OUTPUT_START}{evaluate(expr)}{OUTPUT_END}" in reasoning
        assert evaluate(expr) == r['synthetic_answer'] == p['synthetic_answer']
        assert synth.valid_chat(prepare.render_chatml(*synth.row_to_chat(r)))


def test_the_tool_output_is_not_supervised(calc_data):
    tok = prepare.load_tokenizer(calc_data)
    assert set(TOOL_TOKENS) <= set(tok.special_tokens)
    row = next(r for r in synth.local_synth_rows(10, 5, calculator=True) if r['exercise'] == 'arithmetic')
    ids, mask = prepare.encode_chatml(tok, *synth.row_to_chat(row))
    sp = tok.special_tokens
    s, e = ids.index(sp[OUTPUT_START]), ids.index(sp[OUTPUT_END])
    assert ids.index(sp[TOOL_START]) < ids.index(sp[TOOL_END]) == s - 1  # one id each: special, not text
    assert not any(mask[s:e + 1]) and mask[s - 1] == 1 and mask[e + 1] == 1  # the call is learned, not the result
    assert tok.decode(ids[s + 1:e]) == row['synthetic_answer']
    # typed by a user, tool-token text stays ordinary text
    user_ids, _ = prepare.encode_chatml(tok, f"{TOOL_START}1+1{TOOL_END}")
    assert not set(user_ids) & {sp[t] for t in TOOL_TOKENS}
    meta = json.load(open(os.path.join(calc_data, 'meta.json')))
    assert meta['calculator'] is True and os.path.isfile(os.path.join(calc_data, 'train_exercises.jsonl'))


def test_calculator_needs_the_offline_twin(tmp_path, capsys):
    assert prepare.main(['synth', '--source=hf', '--calculator=True', f'--out={tmp_path / "x"}']) == 2
    assert '--source=local' in capsys.readouterr().err and not (tmp_path / 'x').exists()


@pytest.mark.parametrize('expr,want', [('12 * 3', '36'), ("__import__('os').system('touch /tmp/x')", 'error:'),
                                       ('9**9**9', 'error:'), ('1' * 10000, 'error:'), ('', 'error:')])
def test_tool_output_answers_any_call(expr, want):
    out = tool_output(f"<think>Use the calculator: {TOOL_START}{expr}{TOOL_END}")
    assert out.startswith(OUTPUT_START) and out.endswith(OUTPUT_END)
    assert out[len(OUTPUT_START):-len(OUTPUT_END)].startswith(want)
    assert tool_output(f"{TOOL_START}1+1") is None  # no call ended yet
    assert 'error:' in tool_output(f"1+1{TOOL_END}")  # ended without a start


def test_generate_runs_calls_and_the_cache_still_equals_no_cache(calc_data):
    """A random model made to call the tool: the result follows the call at once, and with a tool the cached
    path and the re-run-everything path give the same tokens."""
    tok = prepare.load_tokenizer(calc_data)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, pos_emb='rope')).eval()
    sp = tok.special_tokens
    call = tok.encode(f"{TOOL_START}6*7{TOOL_END}", allowed_special='all')
    calc = sample.calculator_tool(tok)
    prompt = tok.encode('hello')
    with torch.no_grad():  # make the model open a call: its first tokens are forced by a tool hook
        outs = {}
        for kv in ('contiguous', 'none'):
            hook = lambda seq: (call if len(seq) == 1 else None) if seq[-1] != sp[TOOL_END] else calc(seq)
            outs[kv] = sample.generate(model, prompt, 30, strategy='greedy', kv_cache=kv, tool=hook)[0]
    assert outs['contiguous'] == outs['none']
    text = tok.decode(outs['contiguous'])
    assert f"{TOOL_START}6*7{TOOL_END}{OUTPUT_START}42{OUTPUT_END}" in text
    assert len(outs['contiguous']) == 30  # forced tokens count toward max_new_tokens


def test_preference_pairs_are_rows_of_prompt_and_response_with_masks(calc_data, tmp_path, monkeypatch):
    """write_preference_pairs with generation faked: right/wrong samples pair up, prompts with only right or
    only wrong samples give no pair, rows are equal-length and masked on the response (tool output off)."""
    tok = prepare.load_tokenizer(calc_data)
    exercises = sample.read_exercises(calc_data, 'train')[:30]

    def fake_generate(model, ids, max_new_tokens, num_samples=1, **kw):
        user = tok.decode(ids).split('user\n')[1].split('<|im_end|>')[0]
        ex = next(e for e in exercises if e['prompt'] == user)
        k = exercises.index(ex)
        right = f"<think>{TOOL_START}1+1{TOOL_END}{OUTPUT_START}2{OUTPUT_END}</think>\n{ex['answer']}"
        answers = [right] * num_samples if k % 3 == 0 else ['<think></think>\nwrong'] * num_samples if k % 3 == 1 \
            else [right, '<think></think>\nwrong'] * (num_samples // 2)
        return [tok.encode(a, allowed_special='all') for a in answers]
    monkeypatch.setattr(sample, 'generate', fake_generate)
    monkeypatch.setattr(sample, 'pairs_prompts', 30)
    monkeypatch.setattr(sample, 'pairs_k', 4)
    out = str(tmp_path / 'pairs')
    sample.write_preference_pairs(None, tok, calc_data, out, dict(max_new_tokens=64))
    meta = json.load(open(os.path.join(out, 'meta.json')))
    p = meta['pairs']
    assert p['train'] + p['val'] == 10 and p['prompts'] == {'all right': 10, 'all wrong': 10, 'paired': 10}
    assert sample.read_exercises(out, 'val') == sample.read_exercises(calc_data, 'val')  # eval works on a DPO run
    assert set(p['types']) == {e['type'] for k, e in enumerate(exercises) if k % 3 == 2}  # prompts of every type
    end, sp = tok.special_tokens['<|im_end|>'], tok.special_tokens
    for split in ('train', 'val'):
        rows = np.fromfile(os.path.join(out, f'{split}.bin'), dtype=meta['dtype']).reshape(-1, p['row_len'])
        masks = np.fromfile(os.path.join(out, f'{split}_mask.bin'), dtype=np.uint8).reshape(rows.shape)
        assert len(rows) == 2 * p[split]
        for k in range(0, len(rows), 2):
            chosen, rejected = tok.decode(rows[k][masks[k] == 1]), tok.decode(rows[k + 1][masks[k + 1] == 1])
            start = list(rows[k]).index(sp['<|im_start|>'], 1)
            assert (rows[k][:start + 3] == rows[k + 1][:start + 3]).all()  # the same prompt
            assert chosen.endswith('<|im_end|>') and rejected == '<think></think>\nwrong<|im_end|>'
            assert '2' not in chosen.split('</think>')[0]  # the tool's output is not the policy's choice
            for row, mask in ((rows[k], masks[k]), (rows[k + 1], masks[k + 1])):
                last = np.flatnonzero(mask)[-1]  # the response's <|im_end|>, then padding to row_len
                assert row[last] == end and (row[last + 1:] == p['pad_id']).all()


def test_calculator_answers_even_when_the_char_vocabulary_lacks_its_characters():
    """A char tokenizer that has only digits: an error message cannot be spelled, and the call still gets an
    output (what the vocabulary can spell of it) instead of an exception in the middle of generation."""
    specials = {s: 10 + i for i, s in enumerate(prepare.SPECIAL_TOKENS + TOOL_TOKENS)}
    tok = prepare.Tokenizer('char', specials, chars='0123456789')
    call = sample.calculator_tool(tok)
    ok = call(tok.encode(f"{TOOL_START}12{TOOL_END}", allowed_special='all'))
    assert tok.decode(ok) == f"{OUTPUT_START}12{OUTPUT_END}"
    err = call([specials[TOOL_START], specials[TOOL_END]])  # an empty call: 'error: ...' has no digit to spell
    assert err == [specials[OUTPUT_START], specials[OUTPUT_END]]
    assert call(tok.encode('12')) is None  # not the end of a call
