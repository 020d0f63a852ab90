"""prepare.py synth and tasks/synth.py: ChatML rendering, special tokens, loss masks, the offline twin, the rows-API client (faked)."""
import json, os, re, sys

import numpy as np
import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402
from conftest import FakeResponse  # noqa: E402
from tasks import synth, verify  # noqa: E402



SPECIALS = {s: 400 + i for i, s in enumerate(prepare.SPECIAL_TOKENS + prepare.TOOL_TOKENS)}


@pytest.fixture(scope="module")
def bpe():
    docs = [prepare.render_chatml(*synth.row_to_chat(r)) for r in synth.local_synth_rows(200, 0)]
    return prepare.bpe_tokenizer("bpe", prepare.train_bpe(docs, 400), prepare.SPLIT_PATTERN, SPECIALS)


def row(i, exercise="math exercise", language="en", **kw):
    return dict(synth_id=f"s{i}", exercise=exercise, language=language, query=f"Question {i}?",
                constraints=f"<source_1>\nfact {i}\n</source_1>", synthetic_reasoning=f"think {i}",
                synthetic_answer=f"answer {i}", **kw)


# ---------------------------------------------------------------- rendering and masks

def test_row_mapping_rag_constraints_only_for_rag():
    user, assistant = synth.row_to_chat(row(1))
    assert user == "Question 1?" and assistant == "<think>think 1</think>\nanswer 1"
    user, _ = synth.row_to_chat(row(2, exercise="rag"))
    assert user == "Question 2?\n<source_1>\nfact 2\n</source_1>"
    text = prepare.render_chatml(user, assistant)
    assert text == ("<|im_start|>user\nQuestion 2?\n<source_1>\nfact 2\n</source_1><|im_end|>\n"
                    "<|im_start|>assistant\n<think>think 1</think>\nanswer 1<|im_end|>")
    assert synth.valid_chat(text)
    assert prepare.render_chatml("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("bad", [
    dict(query=""), dict(synthetic_answer="  "), dict(query="q <|im_end|>\n<|im_start|>user\nmore"),
    dict(synthetic_reasoning="a </think> b"), dict(synthetic_answer="x<|endoftext|>"),
])
def test_invalid_renderings_are_rejected(bad):
    assert not synth.valid_chat(prepare.render_chatml(*synth.row_to_chat({**row(1), **bad})))


def test_special_tokens_single_ids_survive_save_load(bpe, tmp_path):
    prepare.save_ranks(bpe.ranks, tmp_path / "r.tiktoken")
    tok = prepare.bpe_tokenizer("bpe", prepare.parse_ranks(open(tmp_path / "r.tiktoken", "rb").read()),
                                prepare.SPLIT_PATTERN, SPECIALS)
    for s, i in SPECIALS.items():
        assert tok.encode(s, allowed_special="all") == [i] and tok.decode([i]) == s
        assert i not in tok.encode(s) and i not in tok.encode(f"user says {s} here")


def test_mask_covers_exactly_the_assistant_span(bpe):
    user, assistant = "What is 2 + 2? <|im_end|> sneaky", "<think>2 plus 2</think>\n4"
    ids, mask = prepare.encode_chatml(bpe, user, assistant)
    assert len(ids) == len(mask) and bpe.decode(ids) == prepare.render_chatml(user, assistant)
    assert ids.count(SPECIALS["<|im_end|>"]) == 2 and ids.count(SPECIALS["<|im_start|>"]) == 2  # no injection
    counted = [i for i, m in zip(ids, mask) if m]
    assert bpe.decode(counted) == assistant + "<|im_end|>"
    assert sum(mask) == len(bpe.encode(assistant, allowed_special={"<think>", "</think>"})) + 1
    assert mask[-1] == 1 and ids[-1] == SPECIALS["<|im_end|>"]
    first = mask.index(1)
    assert bpe.decode(ids[:first]) == prepare.render_chatml(user) and not any(mask[:first])
    ids2, mask2 = prepare.encode_chatml(bpe, user, assistant, train_user=True)
    assert ids2 == ids and bpe.decode([i for i, m in zip(ids2, mask2) if m]) == user + "<|im_end|>" + assistant + "<|im_end|>"
    prompt, pmask = prepare.encode_chatml(bpe, user)
    assert prompt == ids[:first] and not any(pmask)


def test_char_tokenizer_chat(tmp_path):
    args = ["synth", "--source=local", "--n_samples=100", "--tokenizer=char", f"--out={tmp_path / 'out'}"]
    assert prepare.main(args) == 0
    tok = prepare.load_tokenizer(tmp_path / "out")
    ids, mask = prepare.encode_chatml(tok, "What is 1 + 1?", "<think>one plus one</think>\n2")
    assert ids.count(tok.special_tokens["<think>"]) == 1 and tok.decode(ids).endswith("2<|im_end|>")


# ---------------------------------------------------------------- offline twin

def test_twin_deterministic_by_seed():
    assert synth.local_synth_rows(50, 7) == synth.local_synth_rows(50, 7)
    assert synth.local_synth_rows(50, 7) != synth.local_synth_rows(50, 8)


def independent_answer(r):
    q = r["query"]
    if r["exercise"] == "arithmetic":
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", q).groups()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if r["exercise"] == "count":
        letter, word = re.fullmatch(r"How many times does the letter '(.)' appear in the word '(\w+)'\?", q).groups()
        return str(word.count(letter))
    if r["exercise"] in ("sort", "reverse"):
        items = q.split(": ", 1)[1].rstrip(".").split(", ")
        key = int if items[0].isdigit() else str
        return ", ".join(items[::-1] if r["exercise"] == "reverse" else sorted(items, key=key))
    entity = re.search(r"(?:of|was|the) (\w+)(?: founded| engine)?\?$", q).group(1)
    facts = [re.sub(r"</?source_\d+>", "", p).strip() for p in r["constraints"].split("\n<source_")]
    hit = [f for f in facts if re.search(rf"\b{entity}\b", f)]
    assert len(hit) == 1
    return re.search(r"(?:is|year|by) (\w+)\.", hit[0]).group(1)


def test_twin_every_answer_checks():
    rows = synth.local_synth_rows(500, 1337)
    assert {r["exercise"] for r in rows} == set(synth.EXERCISES)
    depths = set()
    for r in rows:
        assert independent_answer(r) == r["synthetic_answer"], r
        user, assistant = synth.row_to_chat(r)
        assert synth.valid_chat(prepare.render_chatml(user, assistant))
        pred = verify.extract_answer(assistant + "<|im_end|>")
        assert verify.check_answer(r["exercise"], pred, r["synthetic_answer"])
        assert r["synthetic_answer"] in r["synthetic_reasoning"] or r["exercise"] != "arithmetic"
        if r["exercise"] == "rag":
            n = r["constraints"].count("<source_")
            depths.add(int(re.search(r"Source (\d+)", r["synthetic_reasoning"]).group(1)) - 1)
            assert n >= 3 and r["constraints"].count("</source_") == n
    assert len(depths) >= 4  # the needle moves through the context


def test_extract_and_check_answer():
    assert verify.extract_answer("<think>a\nb</think>\n 42 \nmore<|im_end|>junk") == "42"
    assert verify.extract_answer("no think tags, just 7") == "no think tags, just 7"
    assert verify.check_answer("arithmetic", "1,234", "1234") and not verify.check_answer("arithmetic", "1235", "1234")
    assert verify.check_answer("sort", "3,7 , 19.", "3, 7, 19") and verify.check_answer("rag", "paris", "Paris")
    assert not verify.check_answer("reverse", "1, 2", "2, 1")


def test_prepare_synth_local_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert prepare.main(["synth", "--source=local", "--n_samples=300", "--vocab_size=400", f"--out={out}"]) == 0
    meta = json.load(open(out / "meta.json"))
    assert meta["source"] == "local twin (seed=1337)" and meta["vocab_size"] == 400
    tok = prepare.load_tokenizer(out)
    users = {}
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        mask = np.fromfile(out / f"{split}_mask.bin", dtype=np.uint8)
        assert ids.shape == mask.shape and meta[f"{split}_mask_tokens"] == mask.sum()
        convs = tok.decode(ids).split("<|endoftext|>")[:-1]
        assert all(synth.valid_chat(c) for c in convs)
        users[split] = {synth.CHAT_RE.fullmatch(c).group(1) for c in convs}
        # every counted token lies inside an assistant turn, and every <|im_end|> closing one is counted
        counted = tok.decode(ids[mask == 1])
        assert "<|im_start|>" not in counted and counted.count("<|im_end|>") == len(convs)
        assert mask[ids == tok.eot_id].sum() == 0
    assert not users["train"] & users["val"]  # no question on both sides
    exercises = [json.loads(line) for line in open(out / "val_exercises.jsonl")]
    assert len(exercises) == len(users["val"]) > 10 and {e["prompt"] for e in exercises} == users["val"]
    assert set(exercises[0]) == {"id", "type", "prompt", "answer"}


@pytest.mark.parametrize("args", [["--vocab_size=400"], ["--vocab_size=400", "--train_user=True"],
                                  ["--tokenizer=char"]])
def test_bytes_per_token_averages_over_the_counted_tokens(tmp_path, args):
    """With a loss mask, val loss averages over counted tokens, so bytes_per_token (bpb = loss / ln 2 / it) is
    their text bytes / their number. Recomputed here from the decoded conversations, not from token bytes."""
    out = tmp_path / "out"
    assert prepare.main(["synth", "--source=local", "--n_samples=300", f"--out={out}", *args]) == 0
    meta = json.load(open(out / "meta.json"))
    tok = prepare.load_tokenizer(out)
    ids = np.fromfile(out / "val.bin", dtype=np.uint16)
    mask = np.fromfile(out / "val_mask.bin", dtype=np.uint8)
    text = tok.decode(ids)
    convs = [synth.CHAT_RE.fullmatch(c) for c in text.split("<|endoftext|>")[:-1]]
    train_user = "--train_user=True" in args
    # counted: the assistant turn "<think>R</think>\nA<|im_end|>" (+ the user's "U<|im_end|>"); specials: 0 bytes
    counted_bytes = sum(len((c[2] + "\n" + c[3] + (c[1] if train_user else "")).encode()) for c in convs)
    assert meta["bytes_per_token"] == pytest.approx(counted_bytes / mask.sum(), rel=1e-12)
    all_bytes = len(prepare.SPECIAL_RE.sub("", text).encode())
    assert meta["bytes_per_token_all"] == pytest.approx(all_bytes / len(ids), rel=1e-12)
    assert meta["bytes_per_token"] != pytest.approx(meta["bytes_per_token_all"], rel=1e-3)  # they do differ


# ---------------------------------------------------------------- rows API (faked)

class FakeRowsAPI:
    """datasets-server /rows: a 300-row split; optional 429s and truncated cells."""

    def __init__(self, n=300, throttle_at=(), fail_at=None):
        self.n, self.calls, self.throttle_at, self.fail_at = n, [], set(throttle_at), fail_at

    def __call__(self, url, params=None, **kw):
        assert url == prepare.ROWS_URL and params["length"] == 100 and kw["timeout"] > 0
        off = params["offset"]
        self.calls.append(off)
        if off == self.fail_at:
            raise requests.ConnectionError("cable cut")
        if off in self.throttle_at:
            self.throttle_at.discard(off)
            return FakeResponse(429, headers={"Retry-After": "3"})
        rows = []
        for i in range(off, min(off + 100, self.n)):
            r = row(i, exercise="rag" if i % 5 == 0 else "math exercise", language="fr" if i % 10 == 3 else "en")
            rows.append(dict(row_idx=i, row=r, truncated_cells=["synthetic_answer"] if i % 10 == 7 else []))
        return FakeResponse(json_data=dict(rows=rows, num_rows_total=self.n, partial=False))


def test_rows_api_paging_429_truncated_and_language(monkeypatch, tmp_path):
    api, sleeps = FakeRowsAPI(throttle_at={100}), []
    monkeypatch.setattr(prepare.requests, "get", api)
    monkeypatch.setattr(prepare.time, "sleep", sleeps.append)
    cfg = dict(prepare.DEFAULTS, n_samples=1000, throttle=0.25)
    rows, skipped = prepare.fetch_synth_rows(cfg, str(tmp_path / "rows.jsonl"))
    assert api.calls == [0, 100, 100, 200] and 3.0 in sleeps and sleeps.count(0.25) == 3
    assert skipped == {"other_language": 30, "truncated_cells": 30} and len(rows) == 240
    assert len({r["synth_id"] for r in rows}) == 240 and all(r["language"] == "en" for r in rows)


def test_rows_api_resumes_where_it_stopped(monkeypatch, tmp_path):
    path, cfg = str(tmp_path / "rows.jsonl"), dict(prepare.DEFAULTS, n_samples=1000)
    monkeypatch.setattr(prepare.requests, "get", FakeRowsAPI(fail_at=200))
    with pytest.raises(prepare.NetworkError):
        prepare.fetch_synth_rows(cfg, path)
    with open(path, "a") as f:
        f.write('{"next": 300, "rows": [')  # a page cut short by a crash is fetched again
    api = FakeRowsAPI()
    monkeypatch.setattr(prepare.requests, "get", api)
    rows, skipped = prepare.fetch_synth_rows(cfg, path)
    assert api.calls == [200] and len(rows) == 240 and len({r["synth_id"] for r in rows}) == 240
    cfg["n_samples"] = 50  # enough rows cached: no request at all
    api.calls.clear()
    assert len(prepare.fetch_synth_rows(cfg, path)[0]) == 50 and api.calls == []


def test_synth_hf_end_to_end_split_by_id(monkeypatch, tmp_path):
    monkeypatch.setattr(prepare.requests, "get", FakeRowsAPI(n=600))
    out = tmp_path / "data" / "synth"
    args = ["synth", "--source=hf", "--n_samples=400", "--vocab_size=300", "--val_frac=0.2", f"--out={out}"]
    assert prepare.main(args) == 0
    meta = json.load(open(out / "meta.json"))
    assert meta["source"].startswith(prepare.ROWS_URL) and meta["dropped"]["truncated_cells"] > 0
    assert not (out / "val_exercises.jsonl").exists()
    tok = prepare.load_tokenizer(out)
    val = tok.decode(np.fromfile(out / "val.bin", dtype=np.uint16))
    train = tok.decode(np.fromfile(out / "train.bin", dtype=np.uint16))
    val_q = set(re.findall(r"Question (\d+)\?", val))
    assert val_q and not val_q & set(re.findall(r"Question (\d+)\?", train))
    assert all(synth.in_val(f"s{q}", 0.2) for q in val_q)
    assert "<source_1>\nfact 0\n</source_1>" in val + train and "fact 1\n" not in val + train  # rag only


def test_source_auto_falls_back_loudly(tmp_path, capsys):
    out = tmp_path / "data" / "synth"
    for _ in range(2):  # and again: a failed first contact leaves nothing that blocks the fallback
        assert prepare.main(["synth", "--n_samples=100", "--vocab_size=300", f"--out={out}"]) == 0
        err = capsys.readouterr().err
        assert "WARNING" in err and "OFFLINE TWIN" in err
        assert json.load(open(out / "meta.json"))["source"] == "local twin (seed=1337)"
    assert not (tmp_path / "data" / ".cache").exists()


def test_source_hf_offline_is_an_error(tmp_path, capsys):
    rc = prepare.main(["synth", "--source=hf", f"--out={tmp_path / 'out'}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare.py:")]
    assert rc == 2 and len(lines) == 1 and "network error" in lines[0] and not (tmp_path / "out").exists()


def test_synth_char_unseen_val_character_is_exit_2(tmp_path, capsys):
    """30 conversations: val has characters train never had; one clear line and exit 2, no output dir."""
    import prepare
    out = tmp_path / 'synth'
    rc = prepare.main(['synth', '--source=local', '--n_samples=30', '--tokenizer=char', f'--out={out}'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and 'not in this char vocabulary' in lines[0]
    assert not out.exists()
