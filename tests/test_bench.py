"""bench.py: every scenario in --quick mode writes well-formed JSON with positive numbers, the KV-cache
formula matches the allocated tensors exactly, and the needle test finds a needle when the model can."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_real_png, make_dataset
import bench
from model import GPT, GPTConfig


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    for k, v in dict(device='cpu', dtype='float32', quick=True, out=str(tmp_path), ckpt='', data_dir='').items():
        monkeypatch.setattr(bench, k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    """One `python bench.py --quick` run (all scenarios) shared by the tests below."""
    out = tmp_path_factory.mktemp('bench_out')
    r = subprocess.run([sys.executable, 'bench.py', '--quick', '--threads=1', f'--out={out}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / 'results.json') as f:
        return json.load(f), (out / 'results.md').read_text(), r.stdout, out


def positive(rows, *keys):
    for row in rows:
        for k in keys:
            assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row)


def test_results_json_meta_and_markdown(quick):
    res, md, stdout, out = quick
    assert set(res['scenarios']) == set(bench.SCENARIOS) - bench.OPT_IN  # 'all' = everything but the long ones
    assert {'device', 'dtype', 'torch', 'quick', 'threads'} <= set(res['meta']) and res['meta']['quick'] is True
    for name, s in res['scenarios'].items():
        assert s['config'] and s['rows'] and s['wall_s'] >= 0, name
    assert '| Config | PPL | Tokens/s | Peak mem | ms/batch |' in md
    for png in ['decoding.png', 'kvcache_memory.png', 'expert_load.png', 'latency_vs_ppl.png', 'attention.png']:
        assert_real_png(out / png)
        assert f'({png})' in md  # the report links every plot it drew


def test_attention_mhsa_ffn_train(quick):
    S = quick[0]['scenarios']
    positive(S['attention']['rows'], 'T', 'manual_ms', 'sdpa_ms', 'speedup', 'manual_peak_mb', 'sdpa_peak_mb')
    positive(S['mhsa']['rows'], 'ms', 'peak_mb', 'params', 'kv_bytes_per_token')
    assert {r['variant'] for r in S['mhsa']['rows']} == set(bench.MHSA_VARIANTS)
    rows = S['ffn']['rows']
    positive(rows, 'ms', 'params', 'active_params', 'flops_per_token')
    moe = [r for r in rows if r['variant'].startswith('moe')]
    assert len(moe) == 2 and all(r['active_params'] < r['params'] for r in moe)
    for r in moe:
        assert sum(r['expert_load_pct']) == pytest.approx(100) and sum(r['router_top1_hist']) == pytest.approx(1)
    assert moe[0]['active_params'] < moe[1]['active_params']  # top-1 runs one routed expert, top-2 two
    positive(S['train']['rows'], 'ms_per_batch', 'tok_s', 'flops_per_token', 'mfu_pct', 'matmul_tflops_fp32',
             'matmul_tflops_bf16', 'peak_mb', 'fp32_eager_ms', 'speedup_vs_fp32_eager')
    row = S['train']['rows'][0]  # against plain fp32 eager, the nanoGPT-equivalent, measured in the same run
    assert row['speedup_vs_fp32_eager'] == pytest.approx(row['fp32_eager_ms'] / row['ms_per_batch'])
    assert row['dtype'] == S['train']['config']['dtype'] in ('float32', 'bfloat16', 'float16')


def test_decode_target_scenario(cpu):
    """The decoding-speed scenario at --quick sizes: every cache x strategy for fp32 and bf16 weights (float32-cols,
    int8, int8+bf16 and bf16-only: greedy), the estimated no-cache baseline (fp32 only), the weight-read ceiling,
    and a targets row per weight dtype."""
    res = bench.decode_target()
    rows = res['rows']
    runs = {(r['weights'], r['kv_cache'], r['strategy']) for r in rows}
    for w in ('float32', 'bfloat16'):
        assert {(w, c, 'greedy') for c in ('contiguous', 'paged', 'paged+offload')} <= runs
        assert {(w, 'contiguous', 'sample'), (w, 'contiguous', 'beam4'), (w, 'paged', 'beam4')} <= runs
        assert res['config'][f'{w}_tok_s_ceiling'] > 0
    assert ('float32', 'none (estimated)', 'greedy') in runs and ('bfloat16', 'none (estimated)', 'greedy') not in runs
    positive(rows, 'tok_s', 'ms_per_token')
    t = {r['weights']: r for r in res['tables'][bench.TARGETS_TITLE]}
    assert {('int8', 'contiguous', 'greedy'), ('int8', 'paged', 'greedy')} <= runs and res['config']['int8_tok_s_ceiling'] > 0
    assert set(t) == {'float32', 'float32-cols', 'bfloat16', 'int8', 'int8+bf16', 'bf16-only'} and 'vs_none' in t['float32'] and \
        'vs_none' not in t['bfloat16'] and ('int8+bf16', 'contiguous', 'greedy') in runs
    assert ('bf16-only', 'paged', 'greedy') in runs and ('bf16-only', 'contiguous', 'beam4') not in runs
    cont = next(r for r in rows if (r['weights'], r['kv_cache'], r['strategy']) == ('float32', 'contiguous', 'greedy'))
    assert t['float32']['cached_tok_s'] == cont['tok_s'] and t['float32']['vs_fp32'] == 1.0
    assert ('float32-cols', 'contiguous', 'greedy') in runs and t['float32-cols']['kv_dtype'] == 'float32'
    for w in ('float32-cols', 'bfloat16', 'int8+bf16', 'bf16-only'):  # the ratio to fp32 comes from this same run
        assert t[w]['vs_fp32'] == pytest.approx(t[w]['cached_tok_s'] / cont['tok_s'])
    assert t['float32']['kv_dtype'] == t['int8']['kv_dtype'] == t['bf16-only']['kv_dtype'] == 'float32'
    assert t['int8+bf16']['kv_dtype'] == bench.auto_kv_dtype('cpu', 'bfloat16')


def test_decoding_and_kvcache(quick):
    S = quick[0]['scenarios']
    rows = S['decoding']['rows']
    assert {(r['kv_cache'], r['strategy']) for r in rows} == \
        {(c, s) for c in ('none', 'contiguous', 'paged') for s in ('greedy', 'sample', 'beam4')}
    positive(rows, 'tok_s', 'ms_per_token')
    rows = S['kvcache']['rows']
    assert {r['kind'] for r in rows} == {'contiguous', 'paged', 'paged+offload'}
    assert len({r['context'] for r in rows}) > 1
    positive(rows, 'peak_mb', 'cache_mb', 'prefill_ms', 'formula_bytes_per_token')
    assert all(r['formula_ok'] and r['nbytes'] == r['formula_bytes'] for r in rows)
    assert any(r['host_cache_mb'] > 0 for r in rows if r['kind'] == 'paged+offload')


def test_long_context_and_course_table(quick):
    lc = quick[0]['scenarios']['long_context']
    ppl = [v for r in lc['rows'] for k, v in r.items() if k.startswith('ppl')]
    assert len(ppl) >= 2 * len(lc['rows']) and all(math.isfinite(p) and p > 0 for p in ppl)
    assert {'sinusoidal', 'rope', 'alibi', 'rope yarn x4'} <= {r['variant'] for r in lc['rows']}
    recall = lc['tables']['needle recall by distance']
    assert recall and all(0 <= r['recall'] <= 1 and r['n'] > 0 for r in recall)
    course = lc['course_table']
    assert [r['Config'] for r in course] == \
        ['sinusoidal, no cache', 'RoPE + contiguous cache', 'ALiBi + paged cache (256)']
    positive(course, 'PPL', 'Tokens/s', 'Peak mem', 'ms/batch')


@pytest.mark.parametrize('arch', [{}, dict(n_kv_head=1), dict(attn_type='mla')])
@pytest.mark.parametrize('kind', ['contiguous', 'paged', 'paged+offload'])
def test_kv_formula_matches_allocated_tensors(cpu, arch, kind):
    """REFERENCE §11.1 bytes/token x allocated token slots == cache.nbytes(), exactly (MHA, MQA, MLA)."""
    L, page = 40, 8
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=L, pos_emb='rope', **arch)).eval()
    cache = model.make_kv_cache(2, L, kind=kind.split('+')[0], page_size=page, offload='offload' in kind,
                                dtype=torch.float32)
    with torch.no_grad():
        for i in range(0, L, 16):
            model(torch.randint(64, (2, min(16, L - i))), kv_cache=cache)
    acc = bench.cache_accounting(model, cache, L)
    assert acc['formula_ok'] and acc['nbytes'] == cache.nbytes()
    c = model.config
    per_token = 4 * (c.n_layer * (c.mla_kv_rank + c.mla_rope_dim) if c.attn_type == 'mla'
                     else 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head))
    assert acc['formula_bytes_per_token'] == per_token
    if kind == 'contiguous':
        assert cache.nbytes() == per_token * 2 * L  # batch 2, preallocated max_len
    elif kind == 'paged':
        assert cache.nbytes() == per_token * 2 * math.ceil(L / page) * page  # 2 rows, whole pages
    else:
        assert acc['host_cache_mb'] > 0 and acc['device_cache_mb'] < acc['cache_mb']


class HandSetRetrieval(torch.nn.Module):
    """One attention head set by hand: the query of the marker token matches the keys of the value tokens and
    the values are one-hot tokens, so after the marker the model predicts the value it saw earlier."""

    def __init__(self, V):
        super().__init__()
        self.vocab = V + 1 + bench._N_VALUES
        self.q, self.k = torch.zeros(self.vocab), torch.zeros(self.vocab)
        self.q[V], self.k[V + 1:] = 1.0, 1.0

    def forward(self, idx, **_):
        T = idx.size(1)
        scores = 30 * self.q[idx][:, :, None] * self.k[idx][:, None, :]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float('-inf'))
        return torch.log(scores.softmax(-1) @ F.one_hot(idx, self.vocab).float() + 1e-6), None


def test_needle_found_by_a_model_that_can(cpu):
    text, V = bench.text_tokens('val')
    needles = [([V, V + 1 + j], [V], [V + 1 + j]) for j in range(4)]
    trials = bench.needle_recall(HandSetRetrieval(V), text, needles, [16, 64, 256], [0.0, 0.5, 1.0])
    assert len(trials) == 3 * 3 * 4 and all(t['hit'] for t in trials)
    # depth 100%: the 2-token needle right before the query; 0%: at the start
    assert {t['distance'] for t in trials} >= {2, 255}
    rows = bench.recall_by_distance(trials, [0, 8, 64, 1000])
    assert all(r['recall'] == 1.0 and r['ci95'][1] == 1.0 and r['ci95'][0] > 0.5 for r in rows)
    # a model that ignores the context never finds it
    blind = lambda idx, **_: (torch.zeros(idx.size(0), idx.size(1), V + 1 + bench._N_VALUES), None)
    assert not any(t['hit'] for t in bench.needle_recall(blind, text, needles, [16, 64], [0.5]))


def test_long_context_with_ckpt(cpu, tmp_path):
    """--ckpt: a user's model (learned positions: evaluated only up to block_size) and its dataset."""
    data = make_dataset(str(tmp_path / 'data' / 'tiny'), n_val=3000)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=32, bias=False))
    torch.save({'model_args': model.config.__dict__, 'model': model.state_dict(), 'config': {'data_dir': data}},
               tmp_path / 'ckpt.pt')
    bench.ckpt = str(tmp_path / 'ckpt.pt')
    res = bench.long_context()
    assert [r['variant'] for r in res['rows']] == ['learned'] and res['config']['eval_len'] == 32
    positive(res['course_table'], 'PPL', 'Tokens/s', 'ms/batch')
    assert 30 < res['rows'][0]['ppl_train_ctx'] < 34  # an untrained model over 32 tokens: PPL ~ vocab size


def test_plot_runs_groups_seeds(tmp_path, capsys):
    for seed, loss in (('seed1', 2.0), ('seed2', 3.0)):
        os.makedirs(tmp_path / f'run-{seed}')
        with open(tmp_path / f'run-{seed}' / 'log.jsonl', 'w') as f:
            for it in (0, 10):
                f.write(json.dumps({'iter': it, 'train_loss': loss + 1 - it / 10, 'val_loss': loss - it / 10}) + '\n')
    groups = bench.load_runs([str(tmp_path / 'run-seed1'), str(tmp_path / 'run-seed2')])
    assert list(groups) == ['run'] and len(groups['run']) == 2
    it, mean, std = bench.curve(groups['run'], 'val_loss')
    assert it == [0, 10] and mean.tolist() == [2.5, 1.5] and std.tolist() == [0.5, 0.5]
    bench.plot_runs([str(tmp_path / 'run-seed1'), str(tmp_path / 'run-seed2')], str(tmp_path / 'plots'))
    text = capsys.readouterr().out
    assert 'run: 2 run(s), final val loss 1.5000 +- 0.5000' in text
    assert_real_png(tmp_path / 'plots' / 'loss_curves.png')


def test_profile_writes_a_chrome_trace_with_memory_and_stacks(tmp_path):
    """--profile: OUT/trace_NAME.json is Chrome trace JSON with the ops, the allocations (profile_memory) and
    the Python frames that launched them (with_stack), plus the op table."""
    r = subprocess.run([sys.executable, 'bench.py', '--quick', '--profile', '--scenario=attention', '--threads=1',
                        f'--out={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / 'trace_attention.json') as f:
        events = json.load(f)['traceEvents']
    ops = {e['name'] for e in events if e.get('cat') == 'cpu_op'}
    assert 'aten::matmul' in ops and 'aten::softmax' in ops  # manual_attention's forward
    assert any(e['name'] == '[memory]' and e['args']['Bytes'] != 0 for e in events)
    assert any(e.get('cat') == 'python_function' and e['name'].startswith('bench.py(') for e in events)
    table = (tmp_path / 'profile_attention.txt').read_text()
    assert 'aten::matmul' in table and 'bench.py(' not in table  # the table ranks ops, the frames are in the trace


def test_long_context_ckpt_takes_inference_overrides(cpu, tmp_path, monkeypatch):
    """--ckpt with --sliding_window/--attn_sinks: the checkpoint's model is evaluated with them (recorded in the
    config), and its perplexities differ from the same checkpoint without them. --eval_len=64 on block_size 32:
    the scalings target 2x, and the perplexity buckets end at 64."""
    data = make_dataset(str(tmp_path / 'data' / 'tiny'), n_val=3000)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=32, bias=False, pos_emb='rope',
                          init_std=0.5))
    torch.save({'model_args': model.config.__dict__, 'model': model.state_dict(), 'config': {'data_dir': data}},
               tmp_path / 'ckpt.pt')
    monkeypatch.setattr(bench, 'ckpt', str(tmp_path / 'ckpt.pt'))
    monkeypatch.setattr(bench, 'eval_len', 64)
    plain = bench.long_context()
    assert plain['config']['eval_len'] == 64 and plain['config']['rope_factor'] == 2
    assert {'rope', 'rope linear x2', 'rope ntk x2', 'rope yarn x2', 'rope dynamic x2'} == \
        {r['variant'] for r in plain['rows']}
    assert all(set(k for k in r if k.startswith('ppl[')) == {'ppl[0,32)', 'ppl[32,64)'} for r in plain['rows'])
    monkeypatch.setattr(bench, 'sliding_window', 8)
    monkeypatch.setattr(bench, 'attn_sinks', 2)
    streamed = bench.long_context()
    assert plain['config']['overrides'] == {} and streamed['config']['overrides'] == dict(sliding_window=8,
                                                                                          attn_sinks=2)
    rows = {r['variant']: r for r in plain['rows']}, {r['variant']: r for r in streamed['rows']}
    assert set(rows[0]) == set(rows[1]) and 'rope' in rows[0]
    assert rows[0]['rope']['ppl_train_ctx'] != rows[1]['rope']['ppl_train_ctx']  # positions >= 8 see fewer keys


@pytest.mark.parametrize('args,says', [
    (['--scenario=nope'], 'unknown scenario'), (['--n_layer=2'], 'inference flags'),
    (['--sliding_window=8'], '--ckpt'), (['--scenario=long_context', '--ckpt=nope.pt'], 'no checkpoint at nope.pt'),
    (['--eval_len=-1'], 'eval_len=-1'),
])
def test_cli_errors(args, says):
    r = subprocess.run([sys.executable, 'bench.py', *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith('error:') and r.stderr.count('\n') == 1 and says in r.stderr
