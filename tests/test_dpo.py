"""objective=dpo (Rafailov et al. 2023; REFERENCE §16.4) and mask_loss in train.py, on a tiny base and toy pairs."""
import gc
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import make_dataset, train_script
from model import GPT
from test_train import TINY, needs_torchrun, read_log, run_torchrun, run_train, train_losses

ROW_LEN, VOCAB, PAD = 12, 32, 0


def make_pairs(path, n_train=48, n_val=16, seed=0):
    """A pairs data dir as sample.py --write_pairs writes it: rows 2i (chosen) and 2i+1 (rejected) of ROW_LEN tokens,
    prompt + response + PAD; the mask marks response tokens. Chosen continues the base's counter, rejected is noise."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        rows, masks = np.full((2 * n, ROW_LEN), PAD, np.uint16), np.zeros((2 * n, ROW_LEN), np.uint8)
        for i in range(n):
            p = int(rng.integers(3, 6))
            prompt = np.cumsum(rng.integers(1, 3, p)) % VOCAB
            chosen = (prompt[-1] + np.cumsum(rng.integers(1, 3, int(rng.integers(3, ROW_LEN - p + 1))))) % VOCAB
            rejected = rng.integers(0, VOCAB, int(rng.integers(3, ROW_LEN - p + 1)))
            for r, resp in ((2 * i, chosen), (2 * i + 1, rejected)):
                rows[r, :p], rows[r, p:p + len(resp)], masks[r, p:p + len(resp)] = prompt, resp, 1
        rows.tofile(os.path.join(path, f'{split}.bin'))
        masks.tofile(os.path.join(path, f'{split}_mask.bin'))
    meta = {'dataset': 'pairs', 'source': 'synthetic', 'tokenizer': 'none', 'vocab_size': VOCAB, 'dtype': 'uint16',
            'train_tokens': 2 * n_train * ROW_LEN, 'val_tokens': 2 * n_val * ROW_LEN, 'bytes_per_token': 1.0,
            'special_tokens': {}, 'eot_id': None, 'pairs': {'row_len': ROW_LEN, 'pad_id': PAD}}
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return path


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """(tiny LM data, a base trained on it for a few steps, a pairs dir): the SFT model DPO starts from."""
    root = tmp_path_factory.mktemp('dpo')
    lm = make_dataset(str(root / 'lm'), vocab_size=VOCAB)
    base = str(root / 'base')
    run_train([f'--data_dir={lm}', f'--out_dir={base}', '--max_iters=15', '--eval_interval=15'])
    return lm, base, make_pairs(str(root / 'pairs'))


def dpo_args(setup, out, *args):
    return [f'--data_dir={setup[2]}', f'--init_from={setup[1]}', f'--out_dir={out}', '--objective=dpo', *args]


def pair_logprobs(model, split_dir, split='val'):
    """(log pi(chosen), log pi(rejected)) per pair, summed over the masked targets: written here from the data
    format alone (x = r[:-1], y = r[1:], m = mask[1:]), not with train.py's code."""
    rows = torch.from_numpy(np.fromfile(os.path.join(split_dir, f'{split}.bin'), np.uint16).astype(np.int64))
    mask = torch.from_numpy(np.fromfile(os.path.join(split_dir, f'{split}_mask.bin'), np.uint8).astype(np.float32))
    rows, mask = rows.view(-1, ROW_LEN), mask.view(-1, ROW_LEN)
    with torch.no_grad():
        logits, _ = model.eval()(rows[:, :-1])
    lp = torch.distributions.Categorical(logits=logits).log_prob(rows[:, 1:])
    lp = (lp * mask[:, 1:]).sum(1)
    return lp[0::2], lp[1::2]


def evals(out):
    return [r for r in read_log(out) if 'val_loss' in r]


@pytest.mark.parametrize('lora', [False, True])
def test_loss_at_step_0_is_log_2(setup, tmp_path, lora):
    """pi = ref at the start, whatever the data: every pair's margin is 0, the loss log 2, in eval and in step 1."""
    extra = ['--lora_rank=4'] if lora else []
    r = run_train(dpo_args(setup, tmp_path / 'o', '--max_iters=1', '--eval_interval=5', *extra))
    ref = 'adapters off' if lora else 'frozen copy'
    assert f"dpo: beta 0.1, reference = {os.path.join(setup[1], 'ckpt.pt')} ({ref})" in r.stdout
    log = read_log(tmp_path / 'o')
    e0, step1 = log[0], log[1]
    assert e0['iter'] == 0 and step1['iter'] == 1
    for v in (e0['val_loss'], e0['train_loss'], step1['loss']):
        assert abs(v - math.log(2)) < 1e-4, v
    assert e0['val_dpo_margin'] == 0 and e0['val_dpo_acc'] == 0 and step1['dpo_margin'] == 0  # r_w = r_l = 0
    assert e0['val_bpb'] is None and e0['val_ppl'] is None  # no such thing for a DPO loss
    assert 'val bpb' not in r.stdout and 'val dpo acc 0.000' in r.stdout


def test_dpo_raises_the_chosen_over_rejected_gap(setup, tmp_path):
    """A few DPO steps raise log pi(chosen) - log pi(rejected) (computed from the checkpoint and the base directly),
    the logged val loss is the DPO formula on the eval batches, and accuracy/margin/rewards are logged."""
    out = tmp_path / 'o'
    r = run_train(dpo_args(setup, out, '--max_iters=10', '--eval_interval=10', '--learning_rate=3e-3'))
    base, _ = GPT.from_checkpoint(os.path.join(setup[1], 'ckpt.pt'))
    policy, ck = GPT.from_checkpoint(str(out / 'ckpt.pt'))
    (bw, bl), (pw, pl) = pair_logprobs(base, setup[2]), pair_logprobs(policy, setup[2])
    assert (pw - pl).mean() > (bw - bl).mean() + 1.0, ((pw - pl).mean(), (bw - bl).mean())
    assert ck['config']['objective'] == 'dpo' and ck['dpo_base']['path'] == os.path.join(setup[1], 'ckpt.pt')
    # the logged val loss at iter 10 = -log sigmoid(beta * margin) on train.py's fixed eval batches (seed + 1)
    gen, ix = torch.Generator().manual_seed(1337 + 1), []
    for _ in range(2):  # eval_iters=2 batches of batch_size=4 pairs (TINY)
        ix += torch.randint(len(bw), (4,), generator=gen).tolist()
    margin = 0.1 * ((pw - bw) - (pl - bl))[ix]
    last = evals(out)[-1]
    assert last['iter'] == 10
    assert last['val_loss'] == pytest.approx(-torch.nn.functional.logsigmoid(margin).mean().item(), rel=1e-4)
    assert last['val_dpo_margin'] == pytest.approx(margin.mean().item(), rel=1e-4, abs=1e-5)
    assert last['val_dpo_acc'] == pytest.approx((margin > 0).float().mean().item()) and last['val_dpo_acc'] > 0.5
    steps = [x for x in read_log(out) if 'loss' in x]
    assert all({'dpo_acc', 'dpo_margin', 'dpo_chosen', 'dpo_rejected'} <= set(x) for x in steps)
    assert steps[-1]['dpo_margin'] > 0 and steps[-1]['dpo_chosen'] - steps[-1]['dpo_rejected'] == \
        pytest.approx(steps[-1]['dpo_margin'], abs=1e-5)
    assert 'dpo_acc' in r.stdout and 'val dpo acc' in r.stdout


def count_gpts():
    gc.collect()
    return sum(type(o) is GPT for o in gc.get_objects())


def test_lora_reference_is_the_base_with_adapters_off_and_no_copy(setup, tmp_path):
    """With LoRA the reference is the policy itself inside lora_disabled(): after training, adapters off gives the
    base's logits exactly (adapters on does not), and the run holds no second model."""
    before = count_gpts()
    g = train_script([*TINY, *dpo_args(setup, tmp_path / 'o', '--lora_rank=4', '--max_iters=4', '--eval_interval=4',
                                       '--learning_rate=1e-2')])
    m = g['raw_model'].eval()
    base, _ = GPT.from_checkpoint(os.path.join(setup[1], 'ckpt.pt'))
    x = torch.randint(VOCAB, (3, ROW_LEN - 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, on = base.eval()(x)[0], m(x)[0]
        with m.lora_disabled():
            off = m(x)[0]
    torch.testing.assert_close(off, want, rtol=0, atol=1e-6)
    assert (on - want).abs().max() > 1e-3  # the adapters trained: the policy is not the reference
    assert g['ref_model'] is None and all(v is m for v in g.values() if isinstance(v, torch.nn.Module))
    assert count_gpts() == before + 2  # the run's model and `base` above: no reference copy


def test_full_reference_is_a_frozen_copy_of_the_start(setup, tmp_path):
    """Without LoRA the reference is a copy of the starting weights: frozen, in eval mode, sharing no storage with
    the policy, and still the base's weights after the policy has moved."""
    g = train_script([*TINY, *dpo_args(setup, tmp_path / 'o', '--max_iters=4', '--eval_interval=4')])
    ref, m = g['ref_model'], g['raw_model']
    assert isinstance(ref, GPT) and not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert not {p.data_ptr() for p in ref.parameters()} & {p.data_ptr() for p in m.parameters()}
    base = torch.load(os.path.join(setup[1], 'ckpt.pt'), weights_only=True)['model']
    assert all(torch.equal(v, base[k]) for k, v in ref.state_dict().items() if k in base)
    assert not torch.equal(m.state_dict()['transformer.h.0.mlp.c_fc.weight'], base['transformer.h.0.mlp.c_fc.weight'])


@pytest.mark.parametrize('lora', [False, True])
def test_reference_runs_in_eval_mode_without_grad(setup, tmp_path, lora):
    """The reference log-probs come from a no-grad, eval-mode forward (no dropout), the policy's from the training-mode
    model with grad, and the model is left in training mode."""
    g = train_script([*TINY, *dpo_args(setup, tmp_path / 'o', '--max_iters=0', '--dropout=0.2',
                                       *(['--lora_rank=4'] if lora else []))])
    script, seen = g['dpo_loss'].__globals__, []  # the script's own globals, where dpo_loss looks names up
    real = script['sequence_logprobs']

    def spy(net, *args):
        seen.append((net is script['raw_model'], net.training, torch.is_grad_enabled()))
        return real(net, *args)
    script['sequence_logprobs'] = spy
    g['raw_model'].train()
    loss, _ = g['dpo_loss'](g['model'], 'train', [0, 1])
    assert seen == [(lora, False, False), (True, True, True)] and g['raw_model'].training
    assert loss.requires_grad


@pytest.mark.parametrize('case, words', [
    ('lm_data', ["objective=dpo needs a pairs data dir (meta.json 'pairs')", '--write_pairs=data/NAME']),
    ('no_mask', ['val_mask.bin', 'row_len=12']),
    ('scratch', ["init_from='scratch'", 'objective=dpo']),
    ('block_size', ['block_size=8', 'row_len=12', '>= 11']),
    ('fsdp', ['fsdp=True', 'objective=dpo']),
    ('mask_loss', ['mask_loss=False', 'objective=dpo']),
    ('soft_prompt', ['n_soft_prompt=2', 'lora_rank']),
    ('resume_lm', ['objective=lm', 'resume with it']),
])
def test_bad_input_exits_2_with_one_line(setup, tmp_path, case, words):
    lm, base, pairs = setup
    out = tmp_path / 'o'
    args = dpo_args(setup, out, '--max_iters=1')
    if case == 'lm_data':
        args.append(f'--data_dir={lm}')
    elif case == 'no_mask':
        shutil.copytree(pairs, tmp_path / 'p')
        os.remove(tmp_path / 'p' / 'val_mask.bin')
        args.append(f'--data_dir={tmp_path / "p"}')
    elif case == 'resume_lm':  # an LM run's checkpoint continued as DPO: its reference is unknown
        shutil.copytree(base, out)
        args.append('--init_from=resume')
    else:
        args.append({'scratch': '--init_from=scratch', 'block_size': '--block_size=8', 'fsdp': '--fsdp=True',
                     'mask_loss': '--mask_loss=False', 'soft_prompt': '--n_soft_prompt=2'}[case])
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)} if out.exists() else None
    r = run_train(args, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error:'), r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    after = {f: os.path.getmtime(out / f) for f in os.listdir(out)} if out.exists() else None
    assert after == before  # nothing written: no out_dir, or the resumed one untouched


@pytest.mark.parametrize('lora', [False, True])
def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path, lora):
    """Stop at 3 + resume to 6 == 6 in one go, bit for bit (dropout on): the reference comes back as the starting
    weights (re-loaded from the base the checkpoint names), not as the resumed policy."""
    common = ['--eval_interval=3', '--lr_decay_iters=6', '--dropout=0.1'] + (['--lora_rank=4'] if lora else [])
    a, b = tmp_path / 'a', tmp_path / 'b'
    run_train(dpo_args(setup, a, '--max_iters=6', *common))
    run_train(dpo_args(setup, b, '--max_iters=3', *common))
    r = run_train(dpo_args(setup, b, '--max_iters=6', '--init_from=resume', *common))
    assert 'resumed from' in r.stdout and 'dpo: beta 0.1, reference = ' + os.path.join(setup[1], 'ckpt.pt') in r.stdout
    la, lb = train_losses(a), train_losses(b)
    assert sorted(lb) == list(range(1, 7)) and [lb[i] for i in (4, 5, 6)] == [la[i] for i in (4, 5, 6)]
    assert abs(evals(b)[1]['val_dpo_margin']) > 1e-3  # the policy at 3 is not the base: a wrong reference would show
    steps = {d: {x['iter']: x['dpo_margin'] for x in read_log(d) if 'dpo_margin' in x} for d in (a, b)}
    assert [steps[b][i] for i in (4, 5, 6)] == [steps[a][i] for i in (4, 5, 6)]
    assert evals(b)[-1] == {**evals(a)[-1], 'time': evals(b)[-1]['time']}


def test_mask_loss_false_counts_every_token(tmp_path):
    """mask_loss=False ignores the mask files: the val loss differs from the masked one and equals the loss of the
    same data with the mask files deleted."""
    masked = make_dataset(str(tmp_path / 'm'), with_mask=True)
    plain = str(tmp_path / 'p')
    shutil.copytree(masked, plain)
    for split in ('train', 'val'):
        os.remove(os.path.join(plain, f'{split}_mask.bin'))
    val = {}
    for name, data, flag in (('mask', masked, True), ('off', masked, False), ('plain', plain, True)):
        r = run_train([f'--data_dir={data}', f'--out_dir={tmp_path / name}', '--eval_only=True', f'--mask_loss={flag}'])
        val[name] = read_log(tmp_path / name)[0]['val_loss']
        assert ('counted by the loss mask' in r.stdout) == (name == 'mask')
        assert ('val_mask.bin ignored (mask_loss=False)' in r.stdout) == (name == 'off')
    assert val['off'] == val['plain'] and abs(val['off'] - val['mask']) > 1e-3


def test_two_accumulated_micro_batches_equal_one_batch(setup, tmp_path):
    """2 micro-batches of 2 pairs == 1 batch of 4 pairs (the same pairs from the data generator): the same DPO losses,
    statistics and gradient norms step after step."""
    common = ['--max_iters=3', '--eval_interval=3', '--grad_clip=0']
    run_train(dpo_args(setup, tmp_path / 'a', '--batch_size=4', *common))
    run_train(dpo_args(setup, tmp_path / 'b', '--batch_size=2', '--gradient_accumulation_steps=2', *common))
    la, lb = ([x for x in read_log(tmp_path / d) if 'loss' in x] for d in 'ab')
    assert [x['iter'] for x in la] == [x['iter'] for x in lb] == [1, 2, 3]
    for x, y in zip(la, lb):
        for k in ('loss', 'grad_norm', 'dpo_acc', 'dpo_margin', 'dpo_chosen'):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k


def test_moe_aux_terms_join_the_dpo_training_loss_only(setup, tmp_path):
    """With an MoE base the training loss is DPO + the MoE terms (as for LM), the val loss DPO alone (log 2 at 0)."""
    lm = setup[0]
    moe = tmp_path / 'moe'
    run_train([f'--data_dir={lm}', f'--out_dir={moe}', '--max_iters=3', '--eval_interval=3', '--n_experts=2'])
    run_train([f'--data_dir={setup[2]}', f'--init_from={moe}', f'--out_dir={tmp_path / "o"}', '--objective=dpo',
               '--max_iters=1', '--eval_interval=5', '--moe_aux_coef=0.5', '--moe_z_coef=0.1'])
    e0, step1 = read_log(tmp_path / 'o')[:2]
    assert abs(e0['val_loss'] - math.log(2)) < 1e-4 and e0['val_moe_aux'] > 0
    assert step1['loss'] == pytest.approx(math.log(2) + 0.5 * step1['moe_aux'] + 0.1 * step1['moe_z'], rel=1e-5)


@needs_torchrun
def test_ddp_two_processes_match_one_process(setup, tmp_path):
    """2 gloo processes each take their slice of the global batch of pairs: the same losses as 1 process (LoRA: the
    reference forward is the unwrapped model's, beside DDP's)."""
    common = ['--max_iters=3', '--eval_interval=3', '--gradient_accumulation_steps=2', '--batch_size=2', '--lora_rank=4',
              '--learning_rate=2e-2']
    run_train(dpo_args(setup, tmp_path / 'one', *common))
    run_torchrun(dpo_args(setup, tmp_path / 'two', *common))
    l1, l2 = ([x for x in read_log(tmp_path / d)] for d in ('one', 'two'))
    assert [x['iter'] for x in l1] == [x['iter'] for x in l2] == [0, 1, 2, 3, 3]
    assert abs(l1[3]['loss'] - math.log(2)) > 1e-3 and abs(l1[3]['dpo_margin']) > 1e-3  # the adapters have moved
    for x, y in zip(l1, l2):
        for k in ('loss', 'dpo_margin', 'val_loss', 'val_dpo_margin'):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), k


def test_dpo_nll_adds_the_chosen_nll_per_token(setup, tmp_path):
    """dpo_nll=c: the step-0 loss is log 2 + c x the chosen responses' mean NLL per token (the reference's, since
    pi = ref), and training with it keeps the chosen log-probs higher than DPO alone does."""
    out = tmp_path / 'nll'
    run_train(dpo_args(setup, out, '--max_iters=0', '--eval_interval=5', '--dpo_nll=0.5'))
    base, _ = GPT.from_checkpoint(os.path.join(setup[1], 'ckpt.pt'))
    mask = np.fromfile(os.path.join(setup[2], 'val_mask.bin'), np.uint8).reshape(-1, ROW_LEN)[0::2, 1:].sum(1)
    bw, _ = pair_logprobs(base, setup[2])
    gen, ix = torch.Generator().manual_seed(1337 + 1), []
    for _ in range(2):  # train.py's fixed eval batches (eval_iters=2 x batch_size=4, TINY)
        ix += torch.randint(len(bw), (4,), generator=gen).tolist()
    nll = (-bw / torch.from_numpy(mask).float())[ix].mean().item()
    assert evals(out)[0]['val_loss'] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)
    chosen = {}
    for c in ('0', '1'):
        run_train(dpo_args(setup, tmp_path / c, '--max_iters=10', '--eval_interval=10', '--learning_rate=3e-3',
                           f'--dpo_nll={c}'))
        chosen[c] = pair_logprobs(GPT.from_checkpoint(str(tmp_path / c / 'ckpt.pt'))[0], setup[2])[0].mean()
    assert chosen['1'] > chosen['0']
