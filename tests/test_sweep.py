"""sweep.py: grids, scaling points, the power-law fit, and real sweeps of tiny train.py runs (seconds)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sweep
from conftest import ROOT, assert_real_png, make_dataset

TINY = ['--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_size=4', '--eval_iters=2',
        '--log_interval=1', '--device=cpu', '--dtype=float32', '--warmup_iters=1', '--eval_interval=3']


def run_sweep(tmp_path, *args):
    data = make_dataset(str(tmp_path / 'data' / 'tiny'))
    out = tmp_path / 'sw'
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'sweep.py'), *TINY, f'--data_dir={data}',
                        f'--out={out}', *args], capture_output=True, text=True, timeout=300)
    return r, out


def test_grid_is_every_combination_and_values_may_hold_commas():
    cells = sweep.grid_cells('learning_rate=1e-3,2e-3 betas=(0.9,0.95),(0.8,0.9)')
    assert cells == [{'learning_rate': '1e-3', 'betas': '(0.9,0.95)'}, {'learning_rate': '1e-3', 'betas': '(0.8,0.9)'},
                     {'learning_rate': '2e-3', 'betas': '(0.9,0.95)'}, {'learning_rate': '2e-3', 'betas': '(0.8,0.9)'}]
    assert sweep.scaling_cells('n_layer,n_embd=2,128 4,256') == [{'n_layer': '2', 'n_embd': '128'},
                                                                  {'n_layer': '4', 'n_embd': '256'}]


@pytest.mark.parametrize('args,msg', [(['--grid', 'learning_rate'], 'is not key=v1,v2'),
                                      (['--scaling', 'n_layer,n_embd=2,128 4'], 'has 1 values for the 2 keys'),
                                      (['--seeds=0'], 'must be >= 1'), (['--out_dir=x'], 'set per run'),
                                      (['--grid', 'a=1', '--scaling', 'b=2'], 'exclude each other'),
                                      (['nope.py'], 'is not a config file')])
def test_bad_sweep_input_is_one_line_exit_2(args, msg, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'sweep.py'), *args, f'--out={tmp_path}'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.listdir(tmp_path)


def test_power_law_fit_recovers_known_parameters():
    n = np.array([1e5, 4e5, 1.6e6, 6.4e6, 2.56e7])
    a, b, c = sweep.fit_power_law(n, 40.0 * n ** -0.3 + 1.5)
    assert b == pytest.approx(0.3, rel=0.02) and c == pytest.approx(1.5, abs=0.02) and a == pytest.approx(40, rel=0.1)


def test_nproc_hands_each_run_to_torchrun(tmp_path):
    runs = sweep.plan(['config/speedrun.py'], dict(sweep.OWN_FLAGS, nproc=2, seeds=2), ['--max_iters=5'], str(tmp_path))
    assert [r['seed'] for r in runs] == [1337, 1338]
    assert runs[0]['cmd'][1:5] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    assert '--max_iters=5' in runs[0]['cmd'] and runs[1]['cmd'][-2:] == ['--seed=1338', f"--out_dir={runs[1]['out_dir']}"]


def test_seeds_grid_table_failures_and_rerun(tmp_path):
    # 2 models x 2 seeds, plus a cell whose model is invalid (16 % 3 != 0): it fails, the others go on
    grid = ['--max_iters=6', '--seeds=2', '--grid', 'n_head=1,2,3 learning_rate=3e-3', '--name=g']
    r, out = run_sweep(tmp_path, *grid)
    assert r.returncode == 1, r.stdout + r.stderr  # some runs failed
    res = json.load(open(out / 'g' / 'results.json'))
    rows = {row['label']: row for row in res['rows']}
    assert set(rows) == {f'n_head={h},learning_rate=3e-3' for h in (1, 2, 3)}
    bad = rows['n_head=3,learning_rate=3e-3']
    assert bad['ok'] == 0 and len(bad['failed']) == 2 and 'divisible' in bad['failed'][0]
    for h in (1, 2):
        good = rows[f'n_head={h},learning_rate=3e-3']
        assert good['ok'] == 2 and good['seeds'] == [1337, 1338] and good['iters'] == 6
        finals = []
        for seed in (1337, 1338):  # the table is what the runs logged: mean and sample std of the last evals
            log = [json.loads(x) for x in open(out / 'g' / 'runs' / f'n_head_{h}__learning_rate_3e-3-seed{seed}' / 'log.jsonl')]
            finals.append([x for x in log if 'val_loss' in x][-1]['val_loss'])
        assert finals[0] != finals[1]  # seeds differ
        assert good['final_val'] == pytest.approx(np.mean(finals)) and good['final_val_std'] == pytest.approx(np.std(finals, ddof=1))
    ok = [row for row in res['rows'] if row['ok']]
    assert ok[0]['final_val'] <= ok[1]['final_val'] and not res['rows'][-1]['ok']  # sorted by val loss, failures last
    md = open(out / 'g' / 'results.md').read()
    assert '| n_head=2,learning_rate=3e-3 |' in md and 'Failed runs' in md and '![pareto](pareto.png)' in md
    for png in ('loss_curves.png', 'schedules.png', 'pareto.png'):
        assert_real_png(out / 'g' / png)
    # a second call reruns only what failed
    r2, _ = run_sweep(tmp_path, *grid)
    assert r2.stdout.count('finished before, skipped') == 4 and r2.stdout.count('running') == 2
    r3, _ = run_sweep(tmp_path, *grid, '--dropout=0.1')  # the same name with other arguments is refused
    assert r3.returncode == 2 and 'was run with other arguments' in r3.stderr and r3.stderr.count('\n') == 1


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    data = make_dataset(str(tmp_path / 'data' / 'tiny'))
    run_dir = tmp_path / 'sw' / 's' / 'runs' / 'base-seed1337'
    # as if the sweep was killed after the checkpoint at iter 3 of 6: the run's train.py stopped there
    subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *TINY, f'--data_dir={data}', '--max_iters=3',
                    '--lr_decay_iters=6', f'--out_dir={run_dir}'], check=True, capture_output=True, timeout=120)
    r, out = run_sweep(tmp_path, '--max_iters=6', '--lr_decay_iters=6', '--name=s')
    assert r.returncode == 0, r.stdout + r.stderr
    commands = [ln for ln in open(run_dir / 'train.log') if ln.startswith('$ ')]
    assert len(commands) == 1 and '--init_from=resume' in commands[0]
    evals = [json.loads(x)['iter'] for x in open(run_dir / 'log.jsonl') if 'val_loss' in json.loads(x)]
    assert evals == [0, 3, 6]  # continued, not restarted, and iter 3 not evaluated twice


def test_scaling_fits_a_power_law_and_plots(tmp_path):
    r, out = run_sweep(tmp_path, '--name=sc', '--tokens=384', '--scaling',
                       'n_layer,n_embd=1,8 1,16 2,16 2,32')
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(out / 'sc' / 'results.json'))
    params = [row['params'] for row in res['rows']]  # Kaplan's N: 12 d^2 + 2 d (norm gains) a layer + ln_f
    assert params == [L * (12 * d * d + 2 * d) + d for L, d in ((1, 8), (1, 16), (2, 16), (2, 32))]
    assert all(row['final_val_std'] is None and row['std_pct'] is None for row in res['rows'])  # one seed: no std
    assert all(row['iters'] == 6 for row in res['rows'])  # 384 tokens / (4 x 16) per step
    assert set(res['power_law']) == {'a', 'b', 'c'}
    md = open(out / 'sc' / 'results.md').read()
    assert 'L(N) =' in md and '| n_layer=1,n_embd=8 | 792 | 1/1 | ' in md and '+-' not in md.split('|---|')[-1]
    assert_real_png(out / 'sc' / 'scaling.png')
