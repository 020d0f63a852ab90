import os
import subprocess
import sys

import pytest

from configurator import ConfigError, configure, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {'lr': 6e-4, 'max_iters': 100, 'compile': False, 'dataset': 'plays', 'strategy': 'greedy',
            'betas': (0.9, 0.95), 'n_kv_head': None, 'start': '\n'}


def test_both_override_forms_and_widening():
    cfg = parse(['--lr=1', '--max_iters', '7', '--strategy', 'beam', '--compile=true'], DEFAULTS)
    assert cfg['lr'] == 1.0 and isinstance(cfg['lr'], float)
    assert cfg['max_iters'] == 7 and cfg['strategy'] == 'beam' and cfg['compile'] is True
    assert parse(['--compile'], DEFAULTS)['compile'] is True  # bare flag for a bool
    assert parse(['--compile', 'False'], DEFAULTS)['compile'] is False
    assert DEFAULTS['lr'] == 6e-4  # defaults untouched


def test_split_on_first_equals_and_raw_strings():
    assert parse(['--start=a=b'], DEFAULTS)['start'] == 'a=b'
    assert parse(['--dataset=123'], DEFAULTS)['dataset'] == '123'  # str keys keep the raw text
    assert parse(['--betas=(0.8,0.95)'], DEFAULTS)['betas'] == (0.8, 0.95)
    assert parse(['--betas=[0.8,0.9]'], DEFAULTS)['betas'] == (0.8, 0.9)
    assert parse(['--n_kv_head=2'], DEFAULTS)['n_kv_head'] == 2  # None default takes any literal


@pytest.mark.parametrize('argv, words', [
    (['--lrr=1'], ["unknown config key 'lrr'", "did you mean 'lr'"]),
    (['--max_iters=1.5'], ["'max_iters'", '1.5', 'expected int']),
    (['--compile=yes'], ["'compile'", "'yes'", 'bool']),
    (['--lr=fast'], ["'lr'", "'fast'", 'float']),
    (['--max_iters'], ["missing value for '--max_iters'"]),
    (['no/such/file.py'], ['config file not found: no/such/file.py']),
])
def test_errors_name_the_problem(argv, words):
    with pytest.raises(ConfigError) as e:
        parse(argv, DEFAULTS)
    for w in words:
        assert w in str(e.value)


def test_config_files_in_argv_order_and_typos_rejected(tmp_path):
    good = tmp_path / 'good.py'
    good.write_text("import math\n# a comment\nmax_iters = 50\nlr = 1\nstrategy = 'sample'\n"
                    "dataset = strategy + '_x'\n")
    cfg = parse([str(good), '--max_iters=9'], DEFAULTS)
    assert cfg == {**DEFAULTS, 'max_iters': 9, 'lr': 1.0, 'strategy': 'sample', 'dataset': 'sample_x'}
    assert parse(['--max_iters=9', str(good)], DEFAULTS)['max_iters'] == 50  # later wins
    typo = tmp_path / 'typo.py'
    typo.write_text("max_iter = 50\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'max_iter'; did you mean 'max_iters'"):
        parse([str(typo)], DEFAULTS)
    badtype = tmp_path / 'badtype.py'
    badtype.write_text("compile = 'no'\n")
    with pytest.raises(ConfigError, match="'compile'"):
        parse([str(badtype)], DEFAULTS)


def test_configure_exits_2_with_one_line(capsys):
    g = dict(DEFAULTS)
    with pytest.raises(SystemExit) as e:
        configure(g, ['--lrr=3'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error:') and err.count('\n') == 1
    assert configure(g, ['--lr=3'])['lr'] == 3.0 and g['lr'] == 3.0  # globals updated


def test_help_lists_every_key_of_train_py():
    r = subprocess.run([sys.executable, 'train.py', '--help'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for key in ('learning_rate', 'dropout_schedule', 'pos_emb', 'n_kv_head', 'logit_softcap'):
        assert f'--{key}' in r.stdout


def test_train_py_unknown_key_exit_2():
    r = subprocess.run([sys.executable, 'train.py', '--learning_rat=1'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key 'learning_rat'; did you mean 'learning_rate'?"
