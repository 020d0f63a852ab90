"""chatrun.sh: the chain's stages, in order, with the flags that make each stage what it claims to be."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(*args, **env):
    r = subprocess.run(['bash', 'chatrun.sh', '--dry_run', *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line[2:].split() for line in r.stdout.splitlines() if line.startswith('+ ')]


def test_the_cpu_chain_is_data_pretrain_sft_pairs_dpo():
    cmds = commands(OUT='o', DATA='d', SEEDS='1')
    scripts = [c[1] for c in cmds]
    assert scripts == ['-m', 'prepare.py', 'train.py', 'train.py', 'sample.py', 'train.py']
    _, data, pre, sft, pairs, dpo = cmds
    assert '--calculator=True' in data and '--source=local' in data and '--out=d' in data
    assert 'config/exp2_chatml_cpu.py' in pre and '--mask_loss=False' in pre and '--out_dir=o/base' in pre
    assert '--init_from=o/base' in sft and '--mask_loss=False' not in sft and '--out_dir=o/sft' in sft
    assert '--out_dir=o/sft' in pairs and '--write_pairs=o/pairs' in pairs
    assert '--objective=dpo' in dpo and '--init_from=o/sft' in dpo and '--data_dir=o/pairs' in dpo


def test_seeds_give_one_dpo_run_each_and_extra_flags_reach_every_training_stage():
    cmds = commands('--dtype=float32', SEEDS='3')
    dpo = [c for c in cmds if '--objective=dpo' in c]
    assert [next(a for a in c if a.startswith('--seed=')) for c in dpo] == ['--seed=1337', '--seed=1338', '--seed=1339']
    assert len({next(a for a in c if a.startswith('--out_dir=')) for c in dpo}) == 3
    assert all(c[-1] == '--dtype=float32' for c in cmds if c[1] == 'train.py')


def test_gpu_flag_runs_the_24_layer_recipe_on_cuda():
    cmds = commands('--gpu')
    for c in cmds:
        if c[1] == 'train.py':
            assert '--n_layer=24' in c and '--device=cuda' in c and 'config/exp2_chatml_cpu.py' not in c
    assert '--device=cuda' in next(c for c in cmds if c[1] == 'sample.py')
