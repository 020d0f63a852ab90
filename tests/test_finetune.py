"""Finetuning starts: another run's checkpoint (init_from=DIR) and OpenAI's GPT-2 in Hugging Face's layout."""
import os

import pytest
import torch

from conftest import make_dataset, train_script
from test_train import TINY, read_log, run_train

import model as model_module
import prepare


def run_in_process(*args):
    """train.py in this process (max_iters=0: build, load, one eval); returns its globals."""
    return train_script([*TINY, '--max_iters=0', *args])


def hf_gpt2_tensors(n_layer, n_embd, vocab=50257, block=1024, prefix='', seed=0):
    """Random tensors under HF GPT-2's key names and shapes: Conv1D weights (in, out), causal-mask buffers."""
    g, d = torch.Generator().manual_seed(seed), n_embd
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.02
    sd = {'wte.weight': r(vocab, d), 'wpe.weight': r(block, d), 'ln_f.weight': 1 + r(d), 'ln_f.bias': r(d)}
    for i in range(n_layer):
        h = f'h.{i}.'
        sd.update({h + 'ln_1.weight': 1 + r(d), h + 'ln_1.bias': r(d), h + 'ln_2.weight': 1 + r(d), h + 'ln_2.bias': r(d),
                   h + 'attn.c_attn.weight': r(d, 3 * d), h + 'attn.c_attn.bias': r(3 * d),
                   h + 'attn.c_proj.weight': r(d, d), h + 'attn.c_proj.bias': r(d),
                   h + 'mlp.c_fc.weight': r(d, 4 * d), h + 'mlp.c_fc.bias': r(4 * d),
                   h + 'mlp.c_proj.weight': r(4 * d, d), h + 'mlp.c_proj.bias': r(d),
                   h + 'attn.bias': torch.tril(torch.ones(1, 1, block, block)), h + 'attn.masked_bias': torch.tensor(-1e4)})
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize('prefix', ['', 'transformer.'])
def test_gpt2_mapping_computes_hf_conv1d(prefix):
    """Conv1D computes x @ W + b with W stored (in, out): after the mapping our Linears compute the same."""
    hf = hf_gpt2_tensors(2, 32, vocab=100, block=64, prefix=prefix)
    cfg = {**model_module.gpt2_config('gpt2'), 'n_layer': 2, 'n_head': 2, 'n_embd': 32, 'vocab_size': 100, 'block_size': 64}
    m = model_module.GPT(model_module.GPTConfig(**cfg))
    m.load_state_dict(model_module.gpt2_state_dict(hf, 2))
    for ours, key in ((m.transformer.h[1].attn.c_attn, 'h.1.attn.c_attn'), (m.transformer.h[0].mlp.c_fc, 'h.0.mlp.c_fc'),
                      (m.transformer.h[0].mlp.c_proj, 'h.0.mlp.c_proj')):
        w, b = hf[prefix + key + '.weight'], hf[prefix + key + '.bias']
        x_in = torch.randn(3, w.size(0))
        torch.testing.assert_close(ours(x_in), x_in @ w + b)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()  # tied, as GPT-2
    assert torch.equal(m.lm_head.weight, hf[prefix + 'wte.weight'])
    assert m.config.mlp == 'gelu_tanh' and m.config.bias and m.config.pos_emb == 'learned'


def test_gpt2_mapping_rejects_missing_and_extra_keys():
    hf = hf_gpt2_tensors(2, 32, vocab=100, block=64)
    with pytest.raises(ValueError, match='3-layer'):
        model_module.gpt2_state_dict(hf, 3)  # h.2.* missing
    with pytest.raises(ValueError, match='unexpected'):
        model_module.gpt2_state_dict({**hf, 'h.0.attn.extra.weight': torch.zeros(1)}, 2)


def test_init_from_gpt2_file_grows_vocab_and_crops_positions(tmp_path, monkeypatch):
    """train.py --init_from=gpt2 --init_file=F: GPT-2's tensors (here a 2-layer model of the same layout) become the
    model's weights; ChatML tokens beyond GPT-2's 50257 get rows at the mean embedding; --block_size=16 crops wpe."""
    from safetensors.torch import save_file
    monkeypatch.setitem(model_module.GPT2_SIZES, 'gpt2', (2, 2, 32))
    hf = hf_gpt2_tensors(2, 32, prefix='transformer.')
    path = str(tmp_path / 'model.safetensors')
    save_file(hf, path)
    data = make_dataset(str(tmp_path / 'd'), vocab_size=50257 + 5)
    g = run_in_process(f'--data_dir={data}', f'--out_dir={tmp_path / "o"}', '--init_from=gpt2', f'--init_file={path}',
                       '--dtype=float32')
    m = g['raw_model']
    assert m.config.vocab_size == 50262 and m.config.n_layer == 2 and m.config.block_size == 16
    wte = m.transformer.wte.weight
    assert torch.equal(wte[:50257], hf['transformer.wte.weight'])
    assert torch.allclose(wte[50257:], hf['transformer.wte.weight'].mean(0).expand(5, -1))
    assert torch.equal(m.transformer.wpe.weight, hf['transformer.wpe.weight'][:16])
    assert torch.equal(m.transformer.h[0].attn.c_attn.weight, hf['transformer.h.0.attn.c_attn.weight'].t())
    assert g['iter_num'] == 0


def test_init_from_gpt2_bad_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(model_module.GPT2_SIZES, 'gpt2', (2, 2, 32))
    bad = tmp_path / 'model.safetensors'
    bad.write_bytes(b'not safetensors')
    data = make_dataset(str(tmp_path / 'd'), vocab_size=50257)
    with pytest.raises(SystemExit) as e:
        run_in_process(f'--data_dir={data}', f'--out_dir={tmp_path / "o"}', '--init_from=gpt2', f'--init_file={bad}')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'cannot load the weights of' in err and str(bad) in err
    assert not (tmp_path / 'o').exists()
    with pytest.raises(SystemExit) as e:  # an architecture the weights do not have
        run_in_process(f'--data_dir={data}', f'--out_dir={tmp_path / "o"}', '--init_from=gpt2', f'--init_file={bad}',
                       '--n_embd=64')
    assert e.value.code == 2 and 'n_embd=64 differs from n_embd=32' in capsys.readouterr().err


def test_gpt2_download_checks_the_hub_sha256(tmp_path, monkeypatch):
    from test_prepare import FakeResponse, fake_get
    body = b'weights' * 1000

    def answer(sha):  # the hub redirects to its CDN; the redirect carries the LFS sha256 as X-Linked-Etag
        r = FakeResponse(body=body, headers={'Content-Length': str(len(body))})
        r.history = [FakeResponse(302, headers={'X-Linked-Etag': f'"{sha}"'})]
        return r
    calls = []
    monkeypatch.setattr(prepare.requests, 'get', fake_get([answer('0' * 64), answer(prepare.sha256_of(body))], calls))
    with pytest.raises(prepare.PrepareError, match='sha256 mismatch'):
        prepare.gpt2_weights_file('gpt2', cache=str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing half-written
    path = prepare.gpt2_weights_file('gpt2', cache=str(tmp_path))
    assert open(path, 'rb').read() == body and calls[0][0] == 'https://huggingface.co/gpt2/resolve/main/model.safetensors'
    assert prepare.gpt2_weights_file('gpt2', cache=str(tmp_path)) == path and len(calls) == 2  # cached


def test_init_from_a_run_finetunes_its_weights(tiny_data, tmp_path):
    """A new run from another run's weights: step 0 evaluates exactly the base's final weights, then trains with a
    fresh optimizer, schedule and log in its own out_dir; runtime flags may change, the architecture may not."""
    base, ft = str(tmp_path / 'base'), str(tmp_path / 'ft')
    run_train([f'--data_dir={tiny_data}', f'--out_dir={base}', '--max_iters=20', '--eval_interval=20'])
    r = run_train([f'--data_dir={tiny_data}', f'--out_dir={ft}', f'--init_from={base}', '--max_iters=4',
                   '--eval_interval=4', '--dropout=0.1'])
    assert 'dropout 0.0 -> 0.1' in r.stdout
    b, f = read_log(base), read_log(ft)
    assert f[0]['iter'] == 0 and f[0]['val_loss'] == [x for x in b if 'val_loss' in x][-1]['val_loss']
    assert [x['iter'] for x in f if 'loss' in x] == [1, 2, 3, 4]
    ck = torch.load(os.path.join(ft, 'ckpt.pt'), weights_only=True)
    assert ck['iter_num'] == 4 and ck['config']['init_from'] == base and ck['model_args']['dropout'] == 0.1
    r = run_train([f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "x"}', f'--init_from={base}/ckpt.pt',
                   '--n_embd=64'], check=False)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'n_embd' in r.stderr
    r = run_train([f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "x"}', f'--init_from={tmp_path / "nope"}'],
                  check=False)
    assert r.returncode == 2 and 'no checkpoint at' in r.stderr and not (tmp_path / 'x').exists()


def test_lora_finetune_saves_adapters_resumes_exactly_and_merges(tiny_data, tmp_path):
    """LoRA on a trained base: step 0 is the base exactly (B = 0); only adapters train and are saved, with a reference
    to the base; stop + resume == uninterrupted; loading the checkpoint merges W + (alpha/r) B A into the base."""
    from model import GPT
    from test_train import train_losses
    base, a, b = (str(tmp_path / n) for n in ('base', 'a', 'b'))
    run_train([f'--data_dir={tiny_data}', f'--out_dir={base}', '--max_iters=20', '--eval_interval=20'])
    lora = [f'--data_dir={tiny_data}', f'--init_from={base}', '--lora_rank=4', '--lora_alpha=8',
            '--lora_targets=attn_in,attn_out,mlp_in,mlp_out', '--eval_interval=3', '--lr_decay_iters=6',
            '--learning_rate=1e-2']
    r = run_train(lora + [f'--out_dir={a}', '--max_iters=6'])
    assert 'trainable parameters' in r.stdout
    la = read_log(a)
    assert la[0]['val_loss'] == [x for x in read_log(base) if 'val_loss' in x][-1]['val_loss']
    ck = torch.load(os.path.join(a, 'ckpt.pt'), weights_only=True)
    assert ck['model'] and all('lora_' in k for k in ck['model']) and ck['adapter_base']['path'].endswith('ckpt.pt')
    assert os.path.getsize(os.path.join(a, 'ckpt.pt')) < 0.5 * os.path.getsize(os.path.join(base, 'ckpt.pt'))
    run_train(lora + [f'--out_dir={b}', '--max_iters=3'])
    run_train(lora + [f'--out_dir={b}', '--max_iters=6', '--init_from=resume'])
    assert [train_losses(b)[i] for i in (4, 5, 6)] == [train_losses(a)[i] for i in (4, 5, 6)]
    merged, _ = GPT.from_checkpoint(os.path.join(a, 'ckpt.pt'))
    base_w = torch.load(os.path.join(base, 'ckpt.pt'), weights_only=True)['model']
    key = 'transformer.h.1.mlp.c_fc'
    want = base_w[key + '.weight'] + 2.0 * ck['model'][key + '.lora_B'] @ ck['model'][key + '.lora_A']
    torch.testing.assert_close(merged.state_dict()[key + '.weight'], want)
    assert merged.config.lora_rank == 0 and not merged.lora_parameters()
    assert torch.equal(merged.state_dict()['transformer.wte.weight'], base_w['transformer.wte.weight'])  # frozen


@pytest.mark.skipif(__import__('test_train').TORCHRUN is None, reason='torchrun not installed')
def test_lora_under_ddp_matches_one_process(tiny_data, tmp_path):
    from test_train import run_torchrun, train_losses
    base = str(tmp_path / 'base')
    run_train([f'--data_dir={tiny_data}', f'--out_dir={base}', '--max_iters=4', '--eval_interval=4'])
    lora = [f'--data_dir={tiny_data}', f'--init_from={base}', '--lora_rank=2', '--max_iters=3', '--eval_interval=3',
            '--gradient_accumulation_steps=2']
    run_train(lora + [f'--out_dir={tmp_path / "one"}'])
    run_torchrun(lora + [f'--out_dir={tmp_path / "two"}'])
    l1, l2 = train_losses(tmp_path / 'one'), train_losses(tmp_path / 'two')
    assert sorted(l2) == [1, 2, 3] and all(l2[k] == pytest.approx(l1[k], rel=1e-5) for k in l1)


def test_soft_prompt_finetune_trains_only_the_prompt(tiny_data, tmp_path):
    """Prompt tuning on a base: k x n_embd trainable numbers initialised from vocabulary rows of the BASE's embedding,
    windows of block_size - k tokens, a checkpoint with only the prompt (+ the base's path) that loads onto the base."""
    from model import GPT
    base, a = str(tmp_path / 'base'), str(tmp_path / 'a')
    run_train([f'--data_dir={tiny_data}', f'--out_dir={base}', '--max_iters=20', '--eval_interval=20',
               '--pos_emb=learned'])
    r = run_train([f'--data_dir={tiny_data}', f'--init_from={base}', f'--out_dir={a}', '--n_soft_prompt=4',
                   '--max_iters=4', '--eval_interval=4', '--learning_rate=1e-2'])
    assert '128 trainable parameters (soft prompt of 4 tokens)' in r.stdout and '4x12 tokens' in r.stdout
    ck = torch.load(os.path.join(a, 'ckpt.pt'), weights_only=True)
    assert set(ck['model']) == {'transformer.soft_prompt'} and ck['adapter_base']['path'].endswith('ckpt.pt')
    base_sd = torch.load(os.path.join(base, 'ckpt.pt'), weights_only=True)['model']
    model, _ = GPT.from_checkpoint(os.path.join(a, 'ckpt.pt'))
    for k, v in base_sd.items():  # the base is untouched
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.transformer.soft_prompt, ck['model']['transformer.soft_prompt'])
    g = run_in_process(f'--data_dir={tiny_data}', f'--init_from={base}', f'--out_dir={tmp_path / "b"}',
                       '--n_soft_prompt=4')
    rows = g['raw_model'].transformer.soft_prompt  # at step 0: rows of the base's embedding, not the random init's
    assert all(any(torch.equal(row, w) for w in base_sd['transformer.wte.weight']) for row in rows)


def test_gpt2_tokenizer_is_tiktokens_gpt2_encoding():
    """--tokenizer=gpt2 is tiktoken's own definition: the same split pattern, and the r50k_base ranks file (tiktoken's
    gpt2 and r50k_base share the ranks) at the same address with the same sha256. Read from tiktoken's source: no
    network, no cached file needed."""
    import inspect
    import tiktoken_ext.openai_public as openai_public
    assert prepare.GPT2_PATTERN == openai_public.r50k_pat_str
    r50k = inspect.getsource(openai_public.r50k_base)
    assert prepare.GPT2_URL in r50k and prepare.GPT2_SHA256 in r50k and '50257' in r50k
    assert model_module.gpt2_config('gpt2')['vocab_size'] == 50257


@pytest.mark.parametrize('damage', ['wrong_shape', 'missing', 'extra'])
def test_init_from_gpt2_file_with_bad_tensors_is_one_line(tmp_path, monkeypatch, capsys, damage):
    from safetensors.torch import save_file
    monkeypatch.setitem(model_module.GPT2_SIZES, 'gpt2', (2, 2, 32))
    hf = hf_gpt2_tensors(2, 32, vocab=50257, block=64)
    if damage == 'wrong_shape':
        hf['h.1.mlp.c_fc.weight'] = torch.zeros(32, 64)
    elif damage == 'missing':
        del hf['h.1.attn.c_proj.bias']
    else:
        hf['h.0.attn.rotary.weight'] = torch.zeros(2, 2)
    path = str(tmp_path / 'model.safetensors')
    save_file(hf, path)
    data = make_dataset(str(tmp_path / 'd'), vocab_size=50257)
    with pytest.raises(SystemExit) as e:
        run_in_process(f'--data_dir={data}', f'--out_dir={tmp_path / "o"}', '--init_from=gpt2', f'--init_file={path}')
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'cannot load the weights of' in err, err
    assert not (tmp_path / 'o').exists()


def test_adapters_on_scratch_weights_warn(tiny_data, tmp_path):
    for flag in ('--lora_rank=4', '--n_soft_prompt=2'):
        r = run_train([f'--data_dir={tiny_data}', f'--out_dir={tmp_path / flag[2:6]}', flag, '--max_iters=1'])
        assert 'warning:' in r.stdout and 'frozen random weights' in r.stdout
