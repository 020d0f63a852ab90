"""train.py end to end on a tiny synthetic dataset: schedules, groups, resume, determinism, DDP, errors."""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, make_dataset, train_script

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4', '--eval_iters=2',
        '--log_interval=1', '--device=cpu', '--dtype=float32', '--warmup_iters=2', '--learning_rate=3e-3',
        '--min_lr=3e-4']


def run_train(args, check=True):
    """train.py with the tiny settings, in this process (conftest sets one thread, as OMP_NUM_THREADS=1 would).
    Returns a CompletedProcess: exit code (die() -> 2), stdout, stderr."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            train_script([*TINY, *args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    r = subprocess.CompletedProcess(['train.py', *args], code, out.getvalue(), err.getvalue())
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


TORCHRUN = os.path.join(os.path.dirname(sys.executable), 'torchrun')
TORCHRUN = TORCHRUN if os.path.exists(TORCHRUN) else shutil.which('torchrun')
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason='torchrun not installed')


def run_torchrun(args, nproc=2, check=True):
    """train.py on nproc processes (gloo on CPU), with the same tiny settings as run_train."""
    r = subprocess.run([TORCHRUN, '--standalone', f'--nproc_per_node={nproc}', 'train.py', *TINY, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r['iter']: r['loss'] for r in read_log(out_dir) if 'loss' in r}


def load_script(tmp_path, *args):
    """Run train.py in-process with max_iters=0 (one eval, no steps) and return its globals."""
    data = make_dataset(str(tmp_path / 'd'))
    return train_script([*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "o"}', '--max_iters=0', *args])


def test_lr_schedule_and_dropout_schedule_values(tmp_path):
    g = load_script(tmp_path, '--warmup_iters=10', '--lr_decay_iters=110', '--learning_rate=1e-3',
                    '--min_lr=1e-4', '--dropout_schedule=(0.0,0.05,0.6)', '--max_iters=0')
    get_lr = g['get_lr']
    assert get_lr(0) > 0 and get_lr(0) == pytest.approx(1e-3 / 11)  # never 0 at step 0
    assert get_lr(9) < get_lr(10) == pytest.approx(1e-3)  # warmup reaches the peak
    assert get_lr(60) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # cosine half way
    assert get_lr(110) == pytest.approx(1e-4) and get_lr(500) == pytest.approx(1e-4)
    get_dropout = g['get_dropout']
    get_dropout.__globals__['max_iters'] = 100  # the schedule reads max_iters at call time
    assert [get_dropout(i) for i in (0, 59, 60, 99)] == [0.0, 0.0, 0.05, 0.05]


def test_param_groups_hold_exactly_the_intended_tensors(tmp_path):
    g = load_script(tmp_path, '--bias=True')
    decay, no_decay = g['optimizer'].param_groups
    names = {id(p): n for n, p in g['raw_model'].named_parameters()}
    decay_names = {names[id(p)] for p in decay['params']}
    no_decay_names = {names[id(p)] for p in no_decay['params']}
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert decay_names | no_decay_names == set(names.values()) and not decay_names & no_decay_names
    for n in decay_names:
        assert n.endswith('weight') and 'wte' not in n and 'wpe' not in n and 'ln' not in n, n
    assert any('attn' in n for n in decay_names) and any('mlp' in n for n in decay_names)
    assert {'transformer.wte.weight', 'transformer.wpe.weight'} <= no_decay_names
    assert any(n.endswith('bias') for n in no_decay_names)
    g2 = load_script(tmp_path, '--decay_embeddings=True')
    decay_names2 = {n for n, p in g2['raw_model'].named_parameters()
                    if any(p is q for q in g2['optimizer'].param_groups[0]['params'])}
    assert 'transformer.wte.weight' in decay_names2


def test_end_to_end_writes_logs_checkpoint_and_loss_falls(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    r = run_train([f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=60', '--eval_interval=30'])
    assert 'val bpb' in r.stdout and 'tok/s' in r.stdout and 'mfu' in r.stdout
    log = read_log(out)
    evals = [x for x in log if 'val_loss' in x]
    assert [e['iter'] for e in evals] == [0, 30, 60]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.5  # it learns the counter
    assert evals[-1]['val_bpb'] == pytest.approx(evals[-1]['val_loss'] / math.log(2))  # 1 byte/token here
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] == 60 and not any(k.startswith('_orig_mod') for k in ckpt['model'])
    assert ckpt['model_args']['n_embd'] == 32 and ckpt['config']['max_iters'] == 60
    assert os.path.isfile(os.path.join(out, 'best.pt'))
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f)['max_iters'] == 60


def test_same_seed_same_losses_and_exact_resume(tiny_data, tmp_path):
    common = [f'--data_dir={tiny_data}', '--eval_interval=5', '--lr_decay_iters=12', '--dropout=0.1']
    a, b, c = (str(tmp_path / n) for n in 'abc')
    run_train(common + [f'--out_dir={a}', '--max_iters=12'])
    run_train(common + [f'--out_dir={b}', '--max_iters=12'])
    assert train_losses(a) == train_losses(b)  # determinism (dropout included)
    run_train(common + [f'--out_dir={c}', '--max_iters=5'])
    run_train(common + [f'--out_dir={c}', '--max_iters=12', '--init_from=resume'])
    la, lc = train_losses(a), train_losses(c)
    assert sorted(lc) == list(range(1, 13))
    assert [lc[i] for i in range(6, 13)] == [la[i] for i in range(6, 13)]  # bit-identical after resume


def test_loss_mask_counts_are_reported(tmp_path):
    data = make_dataset(str(tmp_path / 'm'), with_mask=True)
    r = run_train([f'--data_dir={data}', f'--out_dir={tmp_path / "o"}', '--max_iters=2'])
    assert 'counted by the loss mask' in r.stdout


@needs_torchrun
@pytest.mark.parametrize('opt', ['adamw', 'muon'])
def test_ddp_two_processes_match_one_process(tiny_data, tmp_path, opt):
    common = [f'--data_dir={tiny_data}', '--eval_interval=100', '--max_iters=4', '--gradient_accumulation_steps=2',
              f'--optimizer={opt}']
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    run_train(common + [f'--out_dir={one}'])
    run_torchrun(common + [f'--out_dir={two}'])
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for k in l1:
        assert l2[k] == pytest.approx(l1[k], rel=1e-5, abs=1e-6)


@needs_torchrun
def test_ddp_resume_is_exact_with_dropout(tiny_data, tmp_path):
    """Each rank draws its own dropout masks; the checkpoint keeps every rank's RNG state, so a 2-process run
    stopped and resumed reproduces the uninterrupted 2-process run bit for bit."""
    common = [f'--data_dir={tiny_data}', '--eval_interval=4', '--lr_decay_iters=8', '--dropout=0.1',
              '--gradient_accumulation_steps=2']

    def ddp(*args):
        run_torchrun(common + list(args))
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    ddp(f'--out_dir={a}', '--max_iters=8')
    ddp(f'--out_dir={b}', '--max_iters=4')
    ranks = torch.load(os.path.join(b, 'ckpt.pt'), weights_only=True)['cpu_rng']
    assert ranks.shape[0] == 2 and not torch.equal(ranks[0], ranks[1])  # two different dropout streams
    ddp(f'--out_dir={b}', '--max_iters=8', '--init_from=resume')
    la, lb = train_losses(a), train_losses(b)
    assert [lb[i] for i in range(5, 9)] == [la[i] for i in range(5, 9)]


@needs_torchrun
def test_fsdp_matches_one_process_and_resumes_exactly(tiny_data, tmp_path):
    """FSDP2 on 2 processes (gloo): the same losses as 1 process, a checkpoint with full (unsharded) weights
    that sample.py can load, and stop + resume == the uninterrupted FSDP run."""
    common = [f'--data_dir={tiny_data}', '--eval_interval=3', '--lr_decay_iters=6', '--gradient_accumulation_steps=2']

    def fsdp(*args):
        run_torchrun(common + ['--fsdp=True', *args])
    one, a, b = (str(tmp_path / n) for n in ('one', 'a', 'b'))
    run_train(common + [f'--out_dir={one}', '--max_iters=6'])
    fsdp(f'--out_dir={a}', '--max_iters=6')
    l1, la = train_losses(one), train_losses(a)
    assert sorted(la) == list(range(1, 7))
    for k in l1:
        assert la[k] == pytest.approx(l1[k], rel=1e-5, abs=1e-6)
    ck1 = torch.load(os.path.join(one, 'ckpt.pt'), weights_only=True)
    cka = torch.load(os.path.join(a, 'ckpt.pt'), weights_only=True)
    assert cka['fsdp'] and all(cka['model'][n].shape == p.shape for n, p in ck1['model'].items())
    fsdp(f'--out_dir={b}', '--max_iters=3')
    fsdp(f'--out_dir={b}', '--max_iters=6', '--init_from=resume')
    lb = train_losses(b)
    assert [lb[i] for i in range(4, 7)] == [la[i] for i in range(4, 7)]
    r = run_train(common + [f'--out_dir={b}', '--max_iters=8', '--init_from=resume'], check=False)
    assert r.returncode == 2 and 'fsdp' in r.stderr  # an FSDP checkpoint resumes with --fsdp=True


@pytest.mark.parametrize('args, words', [
    (['--dataset=nope'], ['python prepare.py nope']),
    (['--init_from=resume'], ['no checkpoint to resume']),
    (['--n_embd=30', '--n_head=4'], ['n_embd']),
    (['--dtype=float8'], ['dtype']),
    (['--block_size=5000'], ['block_size']),
    (['--batch_size=0'], ['batch_size=0', '>= 1']),
    (['--eval_iters=0'], ['eval_iters=0']),
    (['--dropout=1.5'], ['dropout=1.5']),
    (['--device=tpu'], ["device='tpu'", 'cpu']),
    (['--device=cuda'] if not torch.cuda.is_available() else ['--device=mps'], ['not available']),
    (['BAD_META'], ['meta.json', 'prepare.py']),
])
def test_bad_input_exits_2_with_one_line(tiny_data, tmp_path, args, words):
    data = [] if args[0].startswith('--dataset') else [f'--data_dir={tiny_data}']
    if args == ['BAD_META']:
        with open(os.path.join(tiny_data, 'meta.json'), 'w') as f:
            f.write('{"vocab_size": 32,')  # cut short
        args = []
    r = run_train(data + [f'--out_dir={tmp_path / "o"}', '--max_iters=1', *args], check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:'), r.stderr
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / 'o').exists()  # nothing written


def test_corrupt_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    out = tmp_path / 'o'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'not a checkpoint')
    r = run_train([f'--data_dir={tiny_data}', f'--out_dir={out}', '--init_from=resume'], check=False)
    assert r.returncode == 2 and 'cannot read checkpoint' in r.stderr


def test_overfit_one_batch():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64, bias=False))
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def train_defaults():
    """train.py's config keys and defaults, read from its source (its globals are all literals)."""
    import ast
    from dataclasses import fields
    from model import GPTConfig
    defaults = {f.name: f.default for f in fields(GPTConfig)}
    for node in ast.parse(open(os.path.join(ROOT, 'train.py')).read()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return defaults


def build_from_recipes(*paths, **overrides):
    from dataclasses import fields
    from configurator import parse
    from model import GPT, GPTConfig
    cfg = parse([os.path.join(ROOT, p) for p in paths], train_defaults())
    cfg.update(overrides)
    with torch.device('meta'):  # count parameters without allocating them
        return GPT(GPTConfig(**{f.name: cfg[f.name] for f in fields(GPTConfig)})), cfg


def test_every_recipe_parses_with_train_keys():
    import glob
    for path in sorted(glob.glob(os.path.join(ROOT, 'config', '*.py'))):
        from configurator import parse
        parse([path], train_defaults())  # unknown keys or wrong types raise


def test_exp2_recipe_builds_the_documented_size():
    model, cfg = build_from_recipes('config/exp2_chatml.py', vocab_size=4096)
    assert (cfg['n_layer'], cfg['n_embd'], cfg['n_head']) == (24, 768, 12)
    assert cfg['pos_emb'] == 'rope' and cfg['qk_norm'] and cfg['emb_norm'] and cfg['norm'] == 'rmsnorm_noparam'
    assert cfg['mlp'] == 'relu2' and cfg['logit_softcap'] == 15.0 and cfg['tie_weights'] and cfg['zero_init']
    assert cfg['betas'] == (0.8, 0.95) and cfg['eps'] == 1e-10 and cfg['dropout_schedule'] == (0.0, 0.05, 0.6)
    # 24 blocks of 12*d^2 (attention 4d^2 + ReLU^2 MLP 8d^2; no biases, no norm weights) + tied embedding
    d = 768
    assert model.num_params(non_embedding=False) == 24 * 12 * d * d + 4096 * d == 173_015_040
    small, _ = build_from_recipes('config/exp2_chatml.py', 'config/exp2_chatml_cpu.py', vocab_size=4096)
    assert small.num_params(non_embedding=False) == 4 * 12 * 192 * 192 + 4096 * 192


def test_masked_chat_loss_ignores_user_turn_targets(tmp_path):
    """ChatML data from prepare.py: with the loss mask, changing user-turn targets leaves the loss unchanged."""
    import prepare
    from model import GPT, GPTConfig
    r = subprocess.run([sys.executable, 'prepare.py', 'synth', '--source=local', '--n_samples=200', '--vocab_size=512',
                        f'--out={tmp_path / "synth"}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tok = prepare.load_tokenizer(str(tmp_path / 'synth'))
    ids, mask = prepare.encode_chatml(tok, 'What is 2+3?', '<think>2 plus 3 is 5</think>\n5')
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    m = torch.tensor([mask[1:]], dtype=torch.float32)  # mask[i+1] says whether target i+1 counts
    assert 0 < m.sum() < m.numel()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    _, loss = model(x, y, loss_mask=m)
    y2 = torch.where(m.bool(), y, (y + 7) % tok.vocab_size)  # scramble every user-side target
    _, loss2 = model(x, y2, loss_mask=m)
    assert torch.equal(loss, loss2)
    y3 = torch.where(m.bool(), (y + 7) % tok.vocab_size, y)  # scrambling assistant targets does change it
    assert not torch.equal(loss, model(x, y3, loss_mask=m)[1])
    # and train.py runs the exp2 recipe on this data (tiny overrides), reporting masked token counts
    r = run_train([f'--data_dir={tmp_path / "synth"}', 'config/exp2_chatml.py', 'config/exp2_chatml_cpu.py',
                   f'--out_dir={tmp_path / "o"}', '--n_layer=1', '--n_embd=32', '--n_head=2', '--max_iters=3',
                   '--eval_iters=2', '--block_size=64', '--batch_size=2', '--dtype=float32'])
    assert 'counted by the loss mask' in r.stdout and 'dropout -> 0.05' in r.stdout


# ---- distributed runs end cleanly ------------------------------------------------------------------

@needs_torchrun
@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_two_process_runs_exit_0_every_time(tiny_data, tmp_path, mode):
    """A rank that finished first used to abort at interpreter exit (SIGABRT, 'terminate called without an active
    exception') while a gloo worker still freed the last collective; it happened in ~1 of 5 runs. Three in a row here,
    and every other multi-process test of the suite checks the exit code too."""
    args = [f'--data_dir={tiny_data}', '--max_iters=4', '--eval_interval=2', '--dropout=0.1',
            '--gradient_accumulation_steps=2'] + (['--fsdp=True'] if mode == 'fsdp' else [])
    for i in range(3):
        r = run_torchrun(args + [f'--out_dir={tmp_path / str(i)}'], check=False)
        assert r.returncode == 0 and 'terminate called' not in r.stderr, f"run {i}: " + r.stderr[-3000:]
        assert 'done: 4 iters' in r.stdout


@needs_torchrun
@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_three_processes_eval_iters_not_a_multiple(tiny_data, tmp_path, mode):
    """eval_iters=20 over 3 ranks: every rank must run the same number of (collective) FSDP forwards, else the
    all-gathers do not pair up and the run hangs; the val loss must still average exactly 20 batches."""
    common = [f'--data_dir={tiny_data}', '--max_iters=2', '--eval_interval=2', '--eval_iters=20',
              '--gradient_accumulation_steps=3']
    r = run_torchrun(common + [f'--fsdp={mode == "fsdp"}', f'--out_dir={tmp_path / "f"}'], nproc=3)
    assert 'terminate called' not in r.stderr
    run_train(common + [f'--out_dir={tmp_path / "one"}'])
    ev3 = [r for r in read_log(tmp_path / 'f') if 'val_loss' in r]
    ev1 = [r for r in read_log(tmp_path / 'one') if 'val_loss' in r]
    assert [r['iter'] for r in ev3] == [0, 2]
    for a, b in zip(ev3, ev1):
        assert a['val_loss'] == pytest.approx(b['val_loss'], rel=1e-5)


# ---- silent training defects -------------------------------------------------------------------------

def test_moe_aux_terms_stay_out_of_val_loss(tiny_data, tmp_path):
    """Val loss/ppl/bpb are the cross-entropy alone: the same weights give the same val loss whatever the aux
    coefficients; the aux terms are logged beside it."""
    moe = ['--n_experts=4', '--moe_top_k=2', '--eval_only=True', f'--data_dir={tiny_data}']
    logs = []
    for i, coef in enumerate((0.0, 50.0)):
        run_train(moe + [f'--out_dir={tmp_path / str(i)}', f'--moe_aux_coef={coef}', f'--moe_z_coef={coef}'])
        logs.append(read_log(tmp_path / str(i)))
    (a,), (b,) = logs
    assert a['val_loss'] == b['val_loss'] and a['train_loss'] == b['train_loss']
    assert a['val_bpb'] == pytest.approx(a['val_loss'] / math.log(2))
    assert b['val_moe_aux'] >= 2.0 - 1e-4 and b['val_moe_z'] > 0  # Switch aux >= top_k; logged, not added


def mfu_checks(records, flops_per_token, world_size):
    steps = [r for r in records if 'mfu' in r]
    assert steps[0]['iter'] == 1 and steps[0]['mfu'] is None  # step 1 includes warm-up: not a measurement
    for r in steps[1:]:  # per device: the global FLOPs of a step are shared by world_size devices
        assert r['mfu'] * r['peak_flops'] * world_size == pytest.approx(flops_per_token * r['tok_s'], rel=1e-6)


@needs_torchrun
def test_mfu_is_per_device(tiny_data, tmp_path):
    from model import GPT, GPTConfig
    common = [f'--data_dir={tiny_data}', '--max_iters=3', '--eval_interval=100', '--gradient_accumulation_steps=2']
    r = run_train(common + [f'--out_dir={tmp_path / "one"}'])
    assert 'mfu -' in r.stdout and 'mfu -100' not in r.stdout
    run_torchrun(common + [f'--out_dir={tmp_path / "two"}'])
    flops = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=32, bias=False)).flops_per_token()
    mfu_checks(read_log(tmp_path / 'one'), flops, 1)
    mfu_checks(read_log(tmp_path / 'two'), flops, 2)


def test_resume_takes_runtime_flags_from_the_command_line(tiny_data, tmp_path):
    out = str(tmp_path / 'o')
    common = [f'--data_dir={tiny_data}', f'--out_dir={out}', '--eval_interval=3']
    run_train(common + ['--max_iters=3', '--dropout=0.0'])
    r = run_train(common + ['--max_iters=6', '--init_from=resume', '--dropout=0.2', '--attn_impl=manual',
                            '--grad_checkpoint=True', '--moe_aux_coef=0.5'])
    for change in ('dropout 0.0 -> 0.2', "attn_impl 'sdpa' -> 'manual'", 'grad_checkpoint False -> True',
                   'moe_aux_coef 0.01 -> 0.5'):
        assert change in r.stdout, r.stdout[:500]
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['model_args']['dropout'] == 0.2 and ckpt['config']['dropout'] == 0.2
    assert (ckpt['model_args']['attn_impl'], ckpt['model_args']['grad_checkpoint'], ckpt['model_args']['moe_aux_coef']) \
        == ('manual', True, 0.5)
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f)['dropout'] == 0.2
    log = read_log(out)
    assert [x['dropout'] for x in log if x.get('iter') in (4, 5, 6) and 'loss' in x] == [0.2] * 3
    # the resumed iteration (3) is evaluated and logged once, by the run that saved it
    assert [x['iter'] for x in log if 'val_loss' in x] == [0, 3, 6]
    # asking for another architecture stops with one line, exit 2, and leaves the checkpoint alone
    before = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    r = run_train(common + ['--max_iters=9', '--init_from=resume', '--n_layer=3'], check=False)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'n_layer=3' in r.stderr and 'checkpoint' in r.stderr
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before


def test_early_stop_counts_each_eval_once(tiny_data, tmp_path):
    """lr 1e-30 leaves the fp32 weights unchanged: val loss never improves after step 0, so patience 2 stops at
    the second eval after it; a resumed run does not count the checkpoint's eval again."""
    out = str(tmp_path / 'o')
    common = [f'--data_dir={tiny_data}', f'--out_dir={out}', '--eval_interval=1', '--learning_rate=1e-30',
              '--min_lr=0', '--early_stop_patience=2']
    r = run_train(common + ['--max_iters=20'])
    assert 'early stop' in r.stdout
    assert [x['iter'] for x in read_log(out) if 'val_loss' in x] == [0, 1, 2]
    run_train(common + ['--max_iters=1', f'--out_dir={tmp_path / "p"}'])  # one eval without improvement
    r = run_train(common + ['--max_iters=20', f'--out_dir={tmp_path / "p"}', '--init_from=resume'])
    assert [x['iter'] for x in read_log(tmp_path / 'p') if 'val_loss' in x] == [0, 1, 2]


def test_eval_only_evaluates_once_and_writes_no_checkpoint(tiny_data, tmp_path):
    out = tmp_path / 'o'
    run_train([f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=50', '--eval_only=True'])
    log = read_log(out)
    assert len(log) == 1 and log[0]['iter'] == 0 and 'val_loss' in log[0]
    assert not (out / 'ckpt.pt').exists()
    run_train([f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "t"}', '--max_iters=4', '--eval_interval=4'])
    run_train([f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "t"}', '--init_from=resume', '--eval_only=True'])
    evals = [x for x in read_log(tmp_path / 't') if 'val_loss' in x]
    assert [x['iter'] for x in evals] == [0, 4, 4] and evals[-1]['val_loss'] == evals[-2]['val_loss']


def test_eval_first_false_skips_only_the_evaluation_before_the_first_step(tiny_data, tmp_path):
    out = tmp_path / 'o'
    run_train([f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=6', '--eval_interval=4',
               '--eval_first=False'])
    assert [x['iter'] for x in read_log(out) if 'val_loss' in x] == [4, 6]
    assert (out / 'ckpt.pt').exists()  # the first evaluation is an improvement: the checkpoint is written
    run_train([f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "e"}', '--eval_only=True', '--eval_first=False'])
    assert [x['iter'] for x in read_log(tmp_path / 'e') if 'val_loss' in x] == [0]  # eval_only still evaluates


def test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    """An absurd learning rate makes the weights overflow: training stops with one line naming the iteration,
    exit 3, and the checkpoint written before (finite weights) is untouched."""
    out = tmp_path / 'o'
    common = [f'--data_dir={tiny_data}', f'--out_dir={out}', '--eval_interval=1', '--max_iters=50',
              '--grad_clip=0', '--warmup_iters=0', '--decay_lr=False']
    run_train(common[:-4] + ['--max_iters=1'])
    good = (out / 'ckpt.pt').read_bytes()
    r = run_train(common + ['--init_from=resume', '--eval_interval=100', '--learning_rate=1e30'], check=False)
    assert r.returncode == 3, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'diverged at iter' in lines[0] and 'nan' in lines[0].lower()
    assert (out / 'ckpt.pt').read_bytes() == good
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert read_log(out)[-1]['diverged'] is True


def test_grad_norm_is_logged_before_clipping(tiny_data, tmp_path):
    out = tmp_path / 'o'
    r = run_train([f'--data_dir={tiny_data}', f'--out_dir={out}', '--max_iters=3', '--grad_clip=1e-6'])
    norms = [x['grad_norm'] for x in read_log(out) if 'grad_norm' in x]
    assert len(norms) == 3 and all(n > 1e-3 for n in norms)  # the norm before clipping to 1e-6
    assert 'grad norm' in r.stdout


def test_two_accumulated_micro_batches_equal_one_batch(tiny_data, tmp_path):
    """2 micro-batches of 4 == 1 batch of 8 (the same 8 windows): the same losses and weights, step after step.
    Guards the / gradient_accumulation_steps scaling of the loss."""
    common = [f'--data_dir={tiny_data}', '--max_iters=3', '--eval_interval=3', '--grad_clip=0']
    run_train(common + [f'--out_dir={tmp_path / "a"}', '--batch_size=8'])
    run_train(common + [f'--out_dir={tmp_path / "b"}', '--batch_size=4', '--gradient_accumulation_steps=2'])
    la, lb = train_losses(tmp_path / 'a'), train_losses(tmp_path / 'b')
    assert sorted(la) == [1, 2, 3]
    for k in la:
        assert lb[k] == pytest.approx(la[k], rel=1e-5)
    ga, gb = ({r['iter']: r['grad_norm'] for r in read_log(tmp_path / d) if 'grad_norm' in r} for d in 'ab')
    for k in ga:  # the gradients themselves, not only what AdamW (nearly scale-free) makes of them
        assert gb[k] == pytest.approx(ga[k], rel=1e-4)
    wa = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)['model']
    wb = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['model']
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=1e-4, atol=1e-6)


def test_profile_writes_a_trace_with_memory_and_stacks(tiny_data, tmp_path):
    out = tmp_path / 'o'
    r = run_train([f'--data_dir={tiny_data}', f'--out_dir={out}', '--profile=True'])
    with open(out / 'trace.json') as f:
        events = json.load(f)['traceEvents']
    assert any(e.get('name') == '[memory]' for e in events)  # profile_memory
    assert any(e.get('cat') == 'python_function' for e in events)  # with_stack
    assert 'Self CPU' in r.stdout  # the op table


def test_sgd_with_momentum_and_max_epochs(tiny_data, tmp_path):
    """optimizer=sgd builds torch's SGD with the same param groups; max_epochs derives max_iters from the train
    tokens (4000 tokens / (4 x 16) per step = 62 iterations an epoch) and evals_per_epoch the eval interval."""
    g = load_script(tmp_path, '--optimizer=sgd', '--momentum=0.8', '--max_epochs=0.5', '--evals_per_epoch=4')
    opt = g['optimizer']
    assert isinstance(opt, torch.optim.SGD) and opt.defaults['momentum'] == 0.8 and not opt.defaults['nesterov']
    assert [grp['weight_decay'] for grp in opt.param_groups] == [0.1, 0.0]
    assert g['max_iters'] == 31 and g['eval_interval'] == 15 and g['lr_decay_iters'] == 31
    assert g['config']['max_iters'] == 31 and g['config']['optimizer'] == 'sgd'
    out = tmp_path / 'sgd'
    run_train([f'--data_dir={tiny_data}', f'--out_dir={out}', '--optimizer=sgd', '--learning_rate=0.3',
               '--max_epochs=1', '--evals_per_epoch=2'])
    evals = [x for x in read_log(out) if 'val_loss' in x]
    assert [e['iter'] for e in evals] == [0, 31, 62] and evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.3


def test_max_tokens_and_warmup_frac_set_the_budget(tmp_path):
    """max_tokens: iterations = ceil(tokens / tokens per step) (4 x 16 here); warmup_frac: that share of them."""
    g = load_script(tmp_path, '--max_tokens=1000', '--warmup_frac=0.1', '--gradient_accumulation_steps=2')
    assert g['max_iters'] == 8 and g['config']['max_iters'] == 8 and g['lr_decay_iters'] == 8  # ceil(1000 / 128)
    assert g['warmup_iters'] == 1 and g['config']['warmup_iters'] == 1
    g = load_script(tmp_path, '--max_tokens=64000', '--warmup_frac=0.25')
    assert g['max_iters'] == 1000 and g['warmup_iters'] == 250 and g['get_lr'](249) < g['get_lr'](250)
    r = run_train([f'--data_dir={make_dataset(str(tmp_path / "d2"))}', '--max_tokens=10', '--max_epochs=1'],
                  check=False)
    assert r.returncode == 2 and 'max_tokens' in r.stderr


# ---- Muon ------------------------------------------------------------------------------------------------

def test_newton_schulz_orthogonalises(tmp_path):
    ns = load_script(tmp_path)['newton_schulz']
    g = torch.Generator().manual_seed(0)
    for shape in ((64, 256), (256, 64)):
        for dtype in (torch.float32, torch.bfloat16):
            m = torch.randn(*shape, generator=g) * 3
            s = torch.linalg.svdvals(ns(m, dtype=dtype).float())
            assert s.shape == (64,) and 0.5 < s.min() and s.max() < 1.5, (shape, dtype, s.min(), s.max())
    m = torch.randn(64, 256, generator=g)
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)  # the same singular vectors: only the spectrum changes
    o = ns(m, dtype=torch.float32)
    assert (u.mT @ o @ vh.mT - torch.diag(torch.diagonal(u.mT @ o @ vh.mT))).abs().max() < 1e-3
    # fp32 at >= 2x wide iterates on the rows x rows side: the same polynomial as the textbook loop (in float64)
    ref = m.double() / m.double().norm()
    for _ in range(5):
        a = ref @ ref.T
        ref = 3.4445 * ref + (-4.7750 * a + 2.0315 * a @ a) @ ref
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ns(m.T, dtype=torch.float32).double(), ref.T, rtol=1e-4, atol=1e-5)
    stack = torch.randn(3, 256, 64, generator=g)  # same-shape matrices orthogonalised as one batch: each as alone
    torch.testing.assert_close(ns(stack, dtype=torch.float32), torch.stack([ns(x, dtype=torch.float32) for x in stack]),
                               rtol=1e-4, atol=1e-5)


def test_muon_groups_and_its_adamw_half_equals_torch(tmp_path):
    g = load_script(tmp_path, '--optimizer=muon', '--bias=True', '--weight_decay=0.1', '--muon_lr=0.02')
    opt, names = g['optimizer'], {id(p): n for n, p in g['raw_model'].named_parameters()}
    muon, adam_decay, adam_rest = opt.param_groups
    ids = [id(p) for grp in opt.param_groups for p in grp['params']]
    assert sorted(ids) == sorted(names) and len(set(ids)) == len(ids)  # every parameter in exactly one group
    assert muon['muon'] and all(p.dim() == 2 and names[id(p)].startswith('transformer.h.') for p in muon['params'])
    assert {'transformer.h.0.attn.c_attn.weight', 'transformer.h.1.mlp.c_proj.weight'} <= {names[id(p)] for p in muon['params']}
    assert 'transformer.wte.weight' in {names[id(p)] for p in adam_rest['params']} and not adam_decay['muon']
    assert all(p.dim() < 2 for p in adam_rest['params'] if 'wte' not in names[id(p)] and 'wpe' not in names[id(p)])
    assert muon['lr_scale'] * g['learning_rate'] == pytest.approx(0.02)
    assert muon['weight_decay'] * 0.02 == pytest.approx(0.1 * g['learning_rate'])  # lr*wd per step, as AdamW's
    # the AdamW half is torch's AdamW; the Muon half is one hand-computed step
    torch.manual_seed(0)
    a, b, w = torch.randn(5, 3), torch.randn(7), torch.randn(8, 4)
    others = [torch.randn(8, 4), torch.randn(4, 6), torch.randn(4, 8)]  # w's shape, another, w's transpose (batched)
    mine = g['MuonAdamW']([dict(params=[a.clone().requires_grad_()], weight_decay=0.1),
                          dict(params=[b.clone().requires_grad_()], weight_decay=0.0),
                          dict(params=[w.clone().requires_grad_()] + [o.clone().requires_grad_() for o in others],
                               weight_decay=0.05, muon=True, momentum=0.9)],
                         lr=1e-2, betas=(0.9, 0.95), eps=1e-8, ns_dtype=torch.float32)
    ref = torch.optim.AdamW([dict(params=[a.clone().requires_grad_()], weight_decay=0.1),
                             dict(params=[b.clone().requires_grad_()], weight_decay=0.0)], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    grads = [[torch.randn(5, 3), torch.randn(7), torch.randn(8, 4)] for _ in range(4)]
    other_grads = [[torch.randn(8, 4), torch.randn(4, 6), torch.randn(4, 8)] for _ in range(4)]
    for step, extra in zip(grads, other_grads):
        for grp, gr in zip(mine.param_groups, step):
            grp['params'][0].grad = gr.clone()
        for p, gr in zip(mine.param_groups[2]['params'][1:], extra):
            p.grad = gr.clone()
        for grp, gr in zip(ref.param_groups, step):
            grp['params'][0].grad = gr.clone()
        mine.step()
        ref.step()
    for i in range(2):
        torch.testing.assert_close(mine.param_groups[i]['params'][0], ref.param_groups[i]['params'][0], rtol=1e-5, atol=1e-6)
    buf, p = torch.zeros(8, 4), w.clone()
    for step in grads:  # Nesterov momentum, orthogonalised, x sqrt(rows/cols), decoupled decay
        buf = buf.lerp(step[2], 0.1)
        p = p * (1 - 1e-2 * 0.05) - 1e-2 * 2 ** 0.5 * g['newton_schulz'](step[2].lerp(buf, 0.9), dtype=torch.float32)
    torch.testing.assert_close(mine.param_groups[2]['params'][0], p, rtol=1e-5, atol=1e-6)
    for k, o in enumerate(others):
        buf, p = torch.zeros_like(o), o.clone()
        for extra in other_grads:
            buf = buf.lerp(extra[k], 0.1)
            scale = max(1, o.size(0) / o.size(1)) ** 0.5
            p = p * (1 - 1e-2 * 0.05) - 1e-2 * scale * g['newton_schulz'](extra[k].lerp(buf, 0.9), dtype=torch.float32)
        torch.testing.assert_close(mine.param_groups[2]['params'][1 + k], p, rtol=1e-5, atol=1e-6)


def test_muon_trains_and_resumes_exactly(tiny_data, tmp_path):
    common = [f'--data_dir={tiny_data}', '--eval_interval=5', '--lr_decay_iters=12', '--optimizer=muon']
    a, c = str(tmp_path / 'a'), str(tmp_path / 'c')
    run_train(common + [f'--out_dir={a}', '--max_iters=12'])
    run_train(common + [f'--out_dir={c}', '--max_iters=5'])
    run_train(common + [f'--out_dir={c}', '--max_iters=12', '--init_from=resume'])
    la, lc = train_losses(a), train_losses(c)
    assert [lc[i] for i in range(6, 13)] == [la[i] for i in range(6, 13)]  # momentum buffers come back exactly
    evals = [x['val_loss'] for x in read_log(a) if 'val_loss' in x]
    assert evals[-1] < evals[0] - 0.3
    r = run_train(common + [f'--out_dir={c}', '--max_iters=14', '--init_from=resume', '--optimizer=adamw'], check=False)
    assert r.returncode == 2 and 'optimizer=muon' in r.stderr


def test_kill_9_while_checkpointing_every_step_leaves_a_loadable_checkpoint(tiny_data, tmp_path):
    """Checkpoints are written to a temp file and renamed: killed at any moment, ckpt.pt is the old one or the new
    one, never half of one, and the run resumes from it."""
    out = tmp_path / 'k'
    args = [sys.executable, 'train.py', *TINY, f'--data_dir={tiny_data}', f'--out_dir={out}', '--eval_interval=1',
            '--eval_iters=1', '--max_iters=100000', '--always_save_checkpoint=True']
    seen = []
    for k, delay in enumerate((0.05, 0.2, 0.45)):
        p = subprocess.Popen(args + (['--init_from=resume'] if k else []), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        try:
            t0 = time.time()
            while time.time() - t0 < 60:  # until this process has written a checkpoint of its own
                if os.path.isfile(out / 'ckpt.pt') and torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] > max(seen, default=0):
                    break
                time.sleep(0.02)
            time.sleep(delay)
        finally:
            p.kill()  # SIGKILL: no cleanup runs
            p.wait()
        ckpt = torch.load(out / 'ckpt.pt', weights_only=True)  # loads, whole
        assert ckpt['iter_num'] > max(seen, default=0) and all(torch.isfinite(v).all() for v in ckpt['model'].values())
        seen.append(ckpt['iter_num'])
