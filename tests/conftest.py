import json
import os
import runpy
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_dataset(path, vocab_size=32, n_train=4000, n_val=1000, with_mask=False, seed=0):
    """A tiny learnable token dataset in the data/NAME/ format (no tokenizer needed)."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    # a noisy counter: the next token is usually (t + 1) % vocab, so a model can learn it
    def stream(n):
        t = np.cumsum(rng.integers(1, 3, size=n)) % vocab_size
        return t.astype(np.uint16)
    for split, n in (('train', n_train), ('val', n_val)):
        toks = stream(n)
        toks.tofile(os.path.join(path, f'{split}.bin'))
        if with_mask:
            (np.arange(n) % 3 != 0).astype(np.uint8).tofile(os.path.join(path, f'{split}_mask.bin'))
    meta = {'dataset': 'tiny', 'source': 'synthetic', 'tokenizer': 'none', 'vocab_size': vocab_size,
            'dtype': 'uint16', 'train_tokens': n_train, 'val_tokens': n_val, 'bytes_per_token': 1.0,
            'special_tokens': {}, 'eot_id': None}
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return path


def train_script(argv):
    """Run train.py in this process as a script with these arguments (torch, and the compiler stack torch.optim
    imports, load once per test session: ~3 s less per run than a subprocess); returns its globals."""
    old, cwd = sys.argv, os.getcwd()
    sys.argv = ['train.py', *argv]
    try:
        os.chdir(ROOT)
        return runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        sys.argv = old
        os.chdir(cwd)


class FakeResponse:
    """A requests.Response stand-in: a status, a body streamed by iter_content, headers, a JSON answer."""
    def __init__(self, status=200, body=b"", headers=None, json_data=None):
        self.status_code, self.body, self.headers, self.json_data = status, body, headers or {}, json_data

    def iter_content(self, n):
        for i in range(0, len(self.body), n):
            yield self.body[i:i + n]

    def json(self):
        return self.json_data

    def close(self):
        pass


def assert_real_png(path):
    """A plot was drawn: the file decodes as an image, and it is not one flat colour."""
    import matplotlib.image  # a requirement: every plot the project promises is drawn in the tests
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, path
    assert img[..., :3].std() > 0.01 and len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 10, path


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test touches the network: prepare.py's HTTP calls fail like an offline machine, backoff sleeps are
    instant, and tiktoken's cache points nowhere (tests that need a response fake one themselves)."""
    import prepare
    import requests

    def offline(url, **kw):
        raise requests.ConnectionError("network disabled in tests")
    monkeypatch.setattr(prepare.requests, "get", offline)
    monkeypatch.setattr(prepare.time, "sleep", lambda s: None)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent-tiktoken-cache")


@pytest.fixture
def tiny_data(tmp_path):
    return make_dataset(str(tmp_path / 'data' / 'tiny'))

# Tiny models run faster on one thread, and a second thread only fights other processes for the cores.
import torch  # noqa: E402
torch.set_num_threads(1)
