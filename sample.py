"""
Sample from a trained model:
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --out_dir=out-x --strategy=beam --beam_size=4 --length_penalty=0.6
    python sample.py --out_dir=out-exp2 --chat            # interactive ChatML chat (--prompt="..." for one turn)
    python sample.py --out_dir=out-x --sliding_window=256 --attn_sinks=4 --max_new_tokens=4096   # stream
Decoding strategies are plain functions on logits (B, V); `generate` and `beam_search` run them on a
KV cache (model.py); the CLI at the bottom only wires config keys to them. Formulas: REFERENCE.md §12.
"""
import glob
import os
import sys
import time
from collections import Counter

import torch

from configurator import ConfigError, check_ranges, coerce, configure, die
from tasks.calculator import OUTPUT_END, OUTPUT_START, TOOL_END, tool_output
from tasks.verify import check_answer, extract_answer, pass_at_k, verifiable, verify

# -----------------------------------------------------------------------------
# decoding strategies: functions on logits (B, V) -> logits (B, V), masked entries set to -inf

def apply_repetition_penalty(logits, history, penalty):
    """CTRL (Keskar et al. 2019) with the HF sign fix: every token id present in `history` (B, T), prompt
    included, gets its logit divided by `penalty` when positive and multiplied when negative, once."""
    if penalty == 1.0 or history.size(1) == 0:
        return logits
    score = logits.gather(1, history)
    return logits.scatter(1, history, torch.where(score > 0, score / penalty, score * penalty))


def apply_frequency_presence(logits, counts, frequency, presence):
    """OpenAI convention: logit_j -= c_j * frequency + [c_j > 0] * presence, where c_j (B, V) counts the
    tokens *generated* so far (the prompt does not count)."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def ban_repeated_ngrams(logits, seqs, n):
    """No n-gram twice (HF NoRepeatNGram): ban every token that would complete an n-gram already in the
    row's sequence (prompt + generated), keyed on its last n-1 tokens. `seqs` is a list of token lists."""
    if n <= 0:
        return logits
    logits = logits.clone()
    for b, seq in enumerate(seqs):  # (shorter than n - 1 tokens: nothing banned)
        key = tuple(seq[len(seq) - n + 1:])
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == key]
        logits[b, banned] = float('-inf')
    return logits


def top_k_filter(logits, k):
    """Keep the logits >= the k-th largest; ties at the boundary are all kept (nanoGPT/HF)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float('-inf'))


def top_p_filter(logits, p):
    """Nucleus sampling (Holtzman et al. 2020): keep the fewest most probable tokens whose probabilities sum to
    >= p, plus any tied with the last kept one (order-independent); the top token survives even p = 0."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    sorted_probs = probs.sort(-1, descending=True).values
    mass_before = sorted_probs.cumsum(-1) - sorted_probs     # mass of the tokens ranked above each one
    n_keep = (mass_before < p).sum(-1, keepdim=True).clamp(min=1)
    return logits.masked_fill(probs < sorted_probs.gather(-1, n_keep - 1), float('-inf'))


def min_p_filter(logits, min_p):
    """Min-p (Nguyen et al. 2024): drop tokens with p < min_p * p_max; the top token always survives."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float('-inf'))


def process_logits(logits, seqs=None, counts=None, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                   repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, no_repeat_ngram=0):
    """The HF order: penalties and bans on raw logits, then temperature, then the top-k/top-p/min-p filters
    (temperature first matters for top-p and min-p; top-k is invariant to it). temperature 0 = greedy."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, torch.tensor(seqs, device=logits.device), repetition_penalty)
    if counts is not None:
        logits = apply_frequency_presence(logits, counts, frequency_penalty, presence_penalty)
    logits = ban_repeated_ngrams(logits, seqs, no_repeat_ngram)
    if temperature > 0:
        logits = logits / temperature
    return min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)


def choose(logits, strategy='sample', temperature=1.0, generator=None):
    """Greedy = argmax (also for temperature 0, no division by zero); sample = draw from softmax(logits)."""
    if strategy == 'greedy' or temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# running the model: one prefill, then one token per row per step, on a KV cache or by re-running everything

def start_decoding(model, prompt, max_len, kv_cache='contiguous', page_size=256, offload=False, kv_dtype=None):
    """Run the prompt (list of ids) once. Returns (logits (1, V) of the next token, step): step(rows, tokens)
    appends tokens (B,) to rows `rows` (B,) of the batch, which pick beam parents, expand the prompt to n samples
    (zeros(n)) or drop finished rows (a paged cache shares blocks, copy-on-write). kv_cache='none' re-runs the
    whole context, the reference; kv_dtype: the cache's dtype (default: the activations')."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    c = model.config
    window = c.block_size - c.n_soft_prompt  # tokens that fit beside a soft prompt
    if kv_cache != 'none' and c.pos_emb == 'learned' and not c.sliding_window and max_len > window:
        print(f"note: learned positions end at block_size={c.block_size} < {max_len} tokens: re-running the "
              f"last {window} tokens for each new one (kv_cache='none', as nanoGPT)", file=sys.stderr)
        kv_cache = 'none'
    cache = None if kv_cache == 'none' else model.make_kv_cache(
        1, max_len, kind=kv_cache, page_size=page_size, offload=offload, device=device, dtype=kv_dtype)
    hist = idx  # without a cache (nanoGPT): the whole context, re-run cropped to the last block_size tokens

    def step(rows, tokens):
        nonlocal hist
        tokens = tokens.view(-1, 1).to(device)
        if cache is None:
            hist = torch.cat([hist[rows.to(device)], tokens], dim=1)
            return model(hist[:, -window:])[0][:, -1]
        if len(rows) != cache.batch_size or not torch.equal(rows.cpu(), torch.arange(len(rows))):
            cache.reorder(rows.to(device))
        return model(tokens, kv_cache=cache)[0][:, -1]
    step.cache = cache
    return model(idx if cache is not None else idx[:, -window:], kv_cache=cache)[0][:, -1], step


@torch.no_grad()
def generate(model, prompt, max_new_tokens, num_samples=1, strategy='sample', temperature=1.0, seed=None,
             stop_ids=(), on_token=None, kv_cache='contiguous', page_size=256, offload=False, kv_dtype=None,
             tool=None, **knobs):
    """num_samples continuations of `prompt` (list of ids) as one batch: token lists, stop tokens excluded.
    on_token(row, token) streams each token; True stops that row (stop strings). tool(row's tokens) -> ids to
    append (a tool's output, fed one per step in place of sampling, so the cache and batching stay as they are)
    or None. knobs: see process_logits."""
    logits, step = start_decoding(model, prompt, len(prompt) + max_new_tokens, kv_cache, page_size, offload,
                                  kv_dtype)
    generator = torch.Generator(device=logits.device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    penalize = knobs.get('frequency_penalty', 0.0) != 0.0 or knobs.get('presence_penalty', 0.0) != 0.0
    counts = torch.zeros(num_samples, logits.size(-1), device=logits.device) if penalize else None
    need_seqs = knobs.get('repetition_penalty', 1.0) != 1.0 or knobs.get('no_repeat_ngram', 0) > 0
    out, forced = [[] for _ in range(num_samples)], [[] for _ in range(num_samples)]
    alive = list(range(num_samples))              # original row of each row of the batch
    rows = torch.zeros(num_samples, dtype=torch.long)  # cache row each row extends: first the one prompt row
    logits = logits.expand(num_samples, -1)
    for _ in range(max_new_tokens):
        seqs = [prompt + out[r] for r in alive] if need_seqs else None  # O(length) a step: only when used
        logits = process_logits(logits, seqs, counts, temperature, **knobs)
        tokens = choose(logits, strategy, temperature, generator)
        if any(forced[r] for r in alive):
            tokens = torch.tensor([forced[r].pop(0) if forced[r] else t for r, t in zip(alive, tokens.tolist())],
                                  device=tokens.device)
        keep = []
        for i, (r, t) in enumerate(zip(alive, tokens.tolist())):
            if t in stop_ids:
                continue
            out[r].append(t)
            forced[r] += (tool(out[r]) or []) if tool else []
            if not (on_token and on_token(r, t)):
                keep.append(i)
        if counts is not None:
            counts.scatter_add_(1, tokens.view(-1, 1), torch.ones_like(counts[:, :1]))
            counts = counts[keep]
        alive = [alive[i] for i in keep]
        if not alive or len(out[alive[0]]) == max_new_tokens:
            break
        logits = step(rows[keep], tokens[keep])  # finished rows leave the batch (their blocks are freed)
        rows = torch.arange(len(keep))
    return out


def lookup_draft(seq, ngram, k):
    """Prompt lookup: up to k tokens that followed the latest earlier occurrence of the last n-gram of seq
    (n = ngram, ngram - 1, ..., 1) that has k of them, else its longest continuation; [] when none occurs."""
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        tail, best = seq[-n:], []
        for i in range(len(seq) - n - 1, -1, -1):
            if seq[i:i + n] == tail and len(seq) - i - n > len(best):
                best = seq[i + n:i + n + k]
                if len(best) == k:
                    break
        if best:
            return best
    return []


class DraftModel:
    """Greedy drafts from a small model with its own KV cache (the draft model of Leviathan et al. 2023), for
    speculative_greedy: propose(seq, k) feeds it the tokens of seq it has not seen, then k - 1 of its own; the
    drafts the target rejects leave its cache on the next call."""

    def __init__(self, model, max_len, kv_dtype=None):
        self.model, self.seen, self.device = model, [], next(model.parameters()).device
        self.cache = model.make_kv_cache(1, max_len, device=self.device, dtype=kv_dtype)

    def propose(self, seq, k):
        if not k:
            return []
        n = 0  # tokens of seq already in the cache: the common prefix of what it saw and seq
        while n < min(len(self.seen), len(seq) - 1) and self.seen[n] == seq[n]:
            n += 1
        self.cache.truncate(len(self.seen) - n)
        self.seen, draft = seq[:], []
        x = seq[n:]
        while len(draft) < k:
            logits = self.model(torch.tensor([x], device=self.device), kv_cache=self.cache)[0]
            draft.append(int(logits[0, -1].argmax()))
            if len(draft) < k:  # the last draft token is checked by the target only, never fed here
                self.seen.append(draft[-1])
                x = draft[-1:]
        return draft


@torch.no_grad()
def speculative_greedy(model, prompt, max_new_tokens, stop_ids=(), on_token=None, draft_len=8, ngram=3,
                       kv_dtype=None, draft=None):
    """Greedy decoding, speculatively (Leviathan et al. 2023): after each token a draft proposes up to draft_len
    more, one forward of the token + its draft scores them all, the draft tokens greedy would have chosen are kept
    (and the model's next token comes free), the rest leave the cache. The draft is a DraftModel, or with
    draft=None the context itself (prompt lookup decoding, Saxena 2023: lookup_draft proposes what followed the
    same n-gram earlier). The output is greedy's; returns (tokens, forwards of the model)."""
    device = next(model.parameters()).device
    propose = draft.propose if draft else lambda seq, k: lookup_draft(seq, ngram, k)
    cache = model.make_kv_cache(1, len(prompt) + max_new_tokens + draft_len, device=device, dtype=kv_dtype)
    logits = model(torch.tensor([prompt], device=device), kv_cache=cache)[0][0, -1:]
    seq, out, forwards = list(prompt), [], 1
    while True:
        for t in logits.argmax(-1).tolist():  # the model's tokens: the accepted drafts, then its own next one
            if t in stop_ids:
                return out, forwards
            out.append(t)
            seq.append(t)
            if (on_token and on_token(0, t)) or len(out) == max_new_tokens:
                return out, forwards
        proposed = propose(seq, min(draft_len, max_new_tokens - len(out) - 1))
        x = torch.tensor([[seq[-1]] + proposed], device=device)
        scored = model(x, kv_cache=cache)[0][0]  # scored[j]: the next token after x[j]
        forwards += 1
        greedy = scored.argmax(-1).tolist()
        n_ok = next((j for j, d in enumerate(proposed) if greedy[j] != d), len(proposed))
        cache.truncate(len(proposed) - n_ok)
        logits = scored[:n_ok + 1]


def sequence_score(sum_logprob, length, length_penalty):
    """Beam hypothesis score (HF): sum of log-probs / generated_length ** length_penalty (alpha).
    alpha = 0 ranks by raw sum; alpha > 0 favours longer outputs (log-probs are < 0), alpha < 0 shorter."""
    return sum_logprob / length ** length_penalty


@torch.no_grad()
def beam_search(model, prompt, max_new_tokens, beam_size=4, length_penalty=1.0, early_stopping=False,
                eos_ids=(), n_best=None, kv_cache='contiguous', page_size=256, offload=False, kv_dtype=None):
    """Beam search, all beams one batch on the cache: up to n_best (default beam_size) (tokens, score) pairs,
    best first; length = generated tokens incl. EOS. An EOS extension among the beam_size best extensions joins
    the finished pool (best beam_size kept). early_stopping (HF): True stops at beam_size finished; False when the
    best running beam scored at the current length cannot beat the worst finished (a heuristic); 'never' uses
    the exact bound (with alpha > 0 a running beam may still gain up to max_new_tokens)."""
    K, eos = beam_size, list(eos_ids)
    logits, step = start_decoding(model, prompt, len(prompt) + max_new_tokens, kv_cache, page_size, offload,
                                  kv_dtype)
    beams, sums = [[]], torch.zeros(1, device=logits.device)
    finished = []  # (score, tokens)
    for t in range(1, max_new_tokens + 1):
        cand = sums[:, None] + logits.float().log_softmax(-1)   # (beams, V) total log-prob of each extension
        kth = cand.flatten().topk(min(K, cand.numel())).values[-1]
        for e in eos:  # an EOS extension among the K best extensions finishes a hypothesis (HF)
            finished += [(sequence_score(s, t, length_penalty), b + [e])
                         for b, s in zip(beams, cand[:, e].tolist()) if s >= kth]
        finished = sorted(finished, key=lambda f: -f[0])[:K]
        cand[:, eos] = float('-inf')
        sums, flat = cand.flatten().topk(min(K, cand.numel() - len(eos) * len(beams)))
        parents, tokens = flat // cand.size(1), flat % cand.size(1)
        if len(parents) == len(beams):  # put each beam in its parent's row where possible: less cache to move
            first, extra = {}, []
            for j, p in enumerate(parents.tolist()):
                extra.append(j) if p in first else first.setdefault(p, j)
            order = torch.tensor([first[r] if r in first else extra.pop() for r in range(len(beams))])
            sums, parents, tokens = (x[order.to(x.device)] for x in (sums, parents, tokens))
        beams = [beams[p] + [tok] for p, tok in zip(parents.tolist(), tokens.tolist())]
        if len(finished) == K and t < max_new_tokens:
            alpha, best = length_penalty, sums.max().item()
            horizon = max_new_tokens if early_stopping == 'never' and alpha > 0 else t
            if early_stopping is True or finished[-1][0] >= sequence_score(best, horizon, alpha):
                break  # done: the running beams cannot (or, by the heuristic, will not) do better
        if t == max_new_tokens:  # out of length: the running beams are finished hypotheses too
            finished += [(sequence_score(s, t, length_penalty), b) for b, s in zip(beams, sums.tolist())]
        else:
            logits = step(parents, tokens)
    finished.sort(key=lambda f: -f[0])
    return [(toks, score) for score, toks in finished[:n_best or K]]


# -----------------------------------------------------------------------------
# self-consistency (Wang et al. 2022): N sampled reasoning paths, majority vote on the final answers

def majority_vote(answers):
    """(most frequent answer, Counter); a tie goes to the answer that came first, so the vote is deterministic."""
    votes = Counter(answers)
    return next(a for a in answers if votes[a] == max(votes.values())), votes


def self_consistent_answer(model, tok, prompt, n=5, extract=extract_answer, **gen):
    """Sample n completions of `prompt` (ids) in one batch and vote: returns (answer, votes, texts)."""
    texts = [tok.decode(o) for o in generate(model, prompt, num_samples=n, **gen)]
    answer, votes = majority_vote([extract(t) for t in texts])
    return answer, votes, texts


# -----------------------------------------------------------------------------
# ChatML (REFERENCE §15) and streaming text output

def chat_prompt_ids(tok, history, user):
    """history (ids of earlier turns, each ending with <|im_end|>) + a user turn + the assistant header, encoded
    as the training data (prepare.encode_chatml: typing "<|im_end|>" cannot inject the special token)."""
    from prepare import encode_chatml
    return history + (tok.encode("\n") if history else []) + encode_chatml(tok, user)[0]


class TextStream:
    """Decodes one row's tokens incrementally and prints the new text (holding back a split UTF-8 character);
    hides the <think>...</think> part unless show_think; reports a stop string (the text is cut before it)."""

    def __init__(self, tok, show=True, show_think=True, stop='', out=sys.stdout):
        self.tok, self.show, self.show_think, self.stop, self.out = tok, show, show_think, stop, out
        sp = tok.special_tokens
        self.think_ids = (sp.get('<think>'), sp.get('</think>'))
        self.visible, self.printed, self.thinking = [], 0, False

    def __call__(self, token):
        """Add a token; True when a stop string appeared."""
        if token in self.think_ids:
            self.thinking = token == self.think_ids[0]
            if not self.show_think:
                return False
        if self.show_think or not self.thinking:
            self.visible.append(token)
        if not (self.show or self.stop):  # nothing to print or watch for: decode once, in text()
            return False
        text = self.tok.decode(self.visible)
        stopped = bool(self.stop) and self.stop in text
        text = text.split(self.stop)[0] if stopped else text
        # hold back a split UTF-8 character, and a tail that may be the start of the stop string
        hold = 0 if stopped else next((n for n in range(len(self.stop), 0, -1) if text.endswith(self.stop[:n])), 0)
        upto = len(text) - hold
        if self.show and upto > self.printed and not text[:upto].endswith('\ufffd'):
            self.out.write(text[self.printed:upto])
            self.out.flush()
            self.printed = upto
        return stopped

    def finish(self):  # print what was held back for a possible stop string
        if self.show:
            self.out.write(self.text()[self.printed:])
            self.out.flush()

    def text(self):
        text = self.tok.decode(self.visible)
        return text.split(self.stop)[0] if self.stop else text


# -----------------------------------------------------------------------------
# CLI: every global below is a config key (`python sample.py --help`); configurator.py applies overrides
out_dir = 'out'           # directory with ckpt.pt; not given and out/ has none: the newest out*/ckpt.pt here
start = '\n'              # prompt text, or FILE:path to read it from a file
num_samples = 1           # samples drawn as one batch (streamed to the terminal when 1)
max_new_tokens = 500
strategy = 'sample'       # greedy | sample | beam
temperature = 0.8         # 0 = greedy
top_k = 200               # 0 = off; ties at the k-th logit are kept
top_p = 1.0               # nucleus, in [0, 1]: 1.0 = off, 0 = only the most probable token(s)
min_p = 0.0               # 0 = off; 0.05-0.1 is a common value
repetition_penalty = 1.0  # CTRL/HF; 1.2 is the paper's suggestion
frequency_penalty = 0.0   # OpenAI convention, counts generated tokens only
presence_penalty = 0.0
no_repeat_ngram = 0       # 0 = off; n = never repeat an n-gram
stop = ''                 # also stop a sample when its text contains this string; end-of-text always stops
seed = 1337
beam_size = 4
length_penalty = 1.0      # alpha in score = sum logprob / len**alpha; 0 = raw sum, > 0 favours longer
early_stopping = 'false'  # true | false | never (see beam_search)
n_best = 1                # beam hypotheses to print, with their scores
kv_cache = 'contiguous'   # none (re-run the context, the reference) | contiguous | paged
page_size = 256           # tokens per block of the paged cache
offload = False           # paged cache: keep only the newest blocks on the device, older ones in CPU memory
chat = False              # interactive ChatML chat (history kept); /reset clears it, Ctrl-D quits
prompt = ''               # one chat turn with this user message, then exit
show_think = False        # chat: print the <think>...</think> part too
self_consistency = 0      # chat --prompt: sample N answers and print the majority vote
device = 'auto'           # auto = cuda > mps > cpu
dtype = 'auto'            # weights: auto = bfloat16 on CUDA when supported, else float32. bfloat16 on a CPU
                          #   without bf16 units: faster decoding (half the bytes), much slower long prompts
kv_dtype = 'auto'         # KV cache: auto = dtype, but float32 on CPU unless bf16 weights on AMX (auto_kv_dtype)
quantize = 'none'         # none | int8: weight-only int8 Linears (per-row scales), a quarter of the fp32 bytes |
                          #   bf16: weight-only bf16 Linears (activations and cache stay fp32), half the bytes
cpu_fp32_layout = True    # fp32 weights on CPU: wide matrices stored transposed (GPT.transpose_wide_weights): faster
                          #   batch-1 decoding, the same values
speculative = 'none'      # none | lookup | draft: greedy, the same tokens in fewer forwards, with drafts from the
                          #   context (prompt lookup) or from a small model's checkpoint (--draft_dir)
draft_len = 8             # draft tokens checked per forward
draft_dir = ''            # speculative=draft: out_dir of the draft model (same tokenizer, e.g. a smaller run)
compile = False           # torch.compile the model (dynamic shapes: one compile for every cache length)
eval_exercises = False    # exact match per exercise type on the dataset's val_exercises.jsonl (synth twin): greedy,
                          #   and with --self_consistency=N samples: sc@N, verifier@N, pass@1, pass@N
eval_per_type = 20        # --eval_exercises: this many exercises per type
eval_data_dir = ''        # --eval_exercises on this data dir's exercises (same tokenizer), e.g. a base model zero-shot
eval_json = ''            # --eval_exercises: also write the scores to this JSON file
calculator = True         # run the model's calculator calls (when its tokenizer has the tool tokens); False: the
                          #   model must write the tool's output itself
write_pairs = ''          # a data dir: DPO preference pairs sampled on the train exercises, verified (see below)
pairs_k = 8               # write_pairs: samples per prompt
pairs_prompts = 0         # write_pairs: use this many train exercises (0 = all)
# model.INFERENCE_FLAGS, applied to the checkpoint's model_args; None keeps the checkpoint's value. Shape flags
# (n_layer, vocab_size, ...) are fixed by the trained weights.
rope_scaling = None       # none | linear | ntk | dynamic | yarn: RoPE context extension (REFERENCE §2.4)
rope_factor = None        # the extension factor s >= 1: e.g. target length / block_size
sliding_window = None     # W > 0: attend to the last W tokens, stream past block_size on a bounded cache; 0 = off
attn_sinks = None         # with sliding_window: the first S tokens stay attendable (StreamingLLM)
attn_impl = None          # sdpa | manual

def reject_shape_flags(argv, script):
    """Only INFERENCE_FLAGS may change on trained weights: any other model flag gets that answer, not 'unknown key'."""
    from model import GPTConfig, INFERENCE_FLAGS
    for arg in argv:
        key = arg[2:].partition('=')[0]
        if arg.startswith('--') and key in GPTConfig.__dataclass_fields__ and key not in INFERENCE_FLAGS:
            die(f"--{key} is fixed by the checkpoint: {script} may override only the inference flags "
                f"{', '.join(INFERENCE_FLAGS)}")


def model_overrides(g):
    """{flag: value} of the INFERENCE_FLAGS set in the config globals g, typed as GPTConfig's fields (a None
    default takes any literal); the choices are GPTConfig's own check, run in load_checkpoint."""
    from model import GPTConfig, INFERENCE_FLAGS
    out = {}
    for k in INFERENCE_FLAGS:
        if g[k] is not None:
            default = GPTConfig.__dataclass_fields__[k].default
            try:
                out[k] = coerce(k, g[k], default)
            except ConfigError:
                die(f"bad value for '{k}': {g[k]!r}, expected {type(default).__name__}")
    check_ranges(out, [(k, out.get(k, lo) >= lo, f'>= {lo}') for k, lo in
                       (('rope_factor', 1), ('sliding_window', 0), ('attn_sinks', 0))])
    return out


def load_checkpoint(path, overrides=None):
    """(model on the CPU, checkpoint dict) of a train.py ckpt.pt with `overrides` (INFERENCE_FLAGS) applied
    (GPT.from_checkpoint), said on stderr; one error line for a missing or bad checkpoint or an override that cannot
    apply or would silently change nothing."""
    from model import GPT, GPTConfig
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}: train one first (python train.py ... --out_dir={os.path.dirname(path)})")
    overrides = overrides or {}
    try:
        model, ckpt = GPT.from_checkpoint(path, **overrides)
    except Exception as e:  # unreadable file, or GPTConfig's check of an override (e.g. rope_scaling='foo')
        die(f"cannot load checkpoint {path}{' with the overrides' if overrides else ''}: {type(e).__name__}: {e}")
    c = model.config
    if {'rope_scaling', 'rope_factor'} & set(overrides):
        if c.pos_emb != 'rope':
            die(f"rope_scaling/rope_factor apply to RoPE models only: {path} has pos_emb={c.pos_emb!r}")
        if 'rope_factor' in overrides and c.rope_scaling == 'none' or \
                c.rope_scaling in ('linear', 'ntk', 'yarn') and c.rope_factor == 1:
            die(f"rope_scaling={c.rope_scaling!r} with rope_factor={c.rope_factor} changes nothing: set both, e.g. "
                f"--rope_scaling=yarn --rope_factor=4 for 4x block_size={c.block_size}")
    if 'attn_sinks' in overrides and c.attn_sinks and not c.sliding_window:
        die(f"attn_sinks={c.attn_sinks} works with a sliding window: add --sliding_window=W (W > 0)")
    if overrides:
        trained = lambda k: ckpt['model_args'].get(k, GPTConfig.__dataclass_fields__[k].default)
        print(f"note: inference overrides on {path}: " +
              ', '.join(f"{k}={v!r} (trained: {trained(k)!r})" for k, v in overrides.items()), file=sys.stderr)
    return model, ckpt


def find_checkpoint(out_dir, given):
    """out_dir/ckpt.pt; when out_dir was not given and out/ has none, the newest out*/ckpt.pt here (said first)."""
    path = os.path.join(out_dir, 'ckpt.pt')
    found = [] if given or os.path.isfile(path) else sorted(glob.glob('out*/ckpt.pt'), key=os.path.getmtime)
    if found:
        print(f"note: --out_dir not given and {out_dir}/ has no checkpoint: using {found[-1]} (newest of "
              f"{len(found)})", file=sys.stderr)
    return found[-1] if found else path


def load(path, device, overrides):
    """The model and tokenizer of checkpoint `path` (with overrides), or one error line."""
    import prepare
    model, ckpt = load_checkpoint(path, overrides)
    cfg = ckpt.get('config', {})
    data_dir = cfg.get('data_dir') or os.path.join('data', cfg.get('dataset', ''))
    try:
        tok = prepare.load_tokenizer(data_dir)
    except Exception as e:
        die(f"cannot load the tokenizer of {data_dir}: {e} (run python prepare.py {cfg.get('dataset', 'NAME')})")
    return model.eval().to(device), tok, data_dir


def run_chat(model, tok, gen, stop_ids):
    if '<|im_start|>' not in tok.special_tokens or '<|im_end|>' not in tok.special_tokens:
        die("this tokenizer has no ChatML tokens <|im_start|>/<|im_end|>: train on a chat dataset (prepare.py synth)")
    stop_ids = stop_ids + [tok.special_tokens['<|im_end|>']]
    history = []
    while True:
        if prompt:
            user = prompt
        else:
            try:
                user = input('\n>>> ')
            except EOFError:
                return
            if user.strip() == '/reset':
                history = []
                continue
        try:
            ids = chat_prompt_ids(tok, history, user)
        except ValueError as e:  # e.g. a character the char vocabulary does not have
            print(f"error: {e}", file=sys.stderr)
            if prompt:
                sys.exit(2)
            continue
        if self_consistency > 0:
            answer, votes, _ = self_consistent_answer(model, tok, ids, self_consistency, stop_ids=stop_ids, **gen)
            print(f"{answer}\n(votes: {dict(votes.most_common())})")
        else:
            stream = TextStream(tok, show_think=show_think, stop=stop)
            out = generate(model, ids, num_samples=1, stop_ids=stop_ids, on_token=lambda r, t: stream(t), **gen)[0]
            stream.finish()
            print()
            history = ids + out + [tok.special_tokens['<|im_end|>']]
        if prompt:
            return


def calculator_tool(tok):
    """generate's tool hook: after <|tool_end|>, the ids of <|output_start|> result <|output_end|>
    (tasks.calculator evaluates the expression; a bad one gets an error string, never runs code). None if the
    tokenizer has no tool tokens."""
    end = tok.special_tokens.get(TOOL_END)
    if end is None:
        return None

    def call(seq):
        if seq[-1] != end:
            return None
        text = tool_output(tok.decode(seq))
        try:
            return tok.encode(text, allowed_special={OUTPUT_START, OUTPUT_END})
        except ValueError:  # a char vocabulary without some character of the answer: leave those out
            inner = ''.join(ch for ch in text[len(OUTPUT_START):-len(OUTPUT_END)] if ch in tok.stoi)
            return tok.encode(OUTPUT_START + inner + OUTPUT_END, allowed_special={OUTPUT_START, OUTPUT_END})
    return call


def score_exercises(model, tok, exercises, n=0, **gen):
    """Exact match per type on exercises {"type", "prompt", "answer"}: greedy, and with n > 0 from n samples in
    one batch: sc@n (majority vote, Wang et al. 2022), verifier@n (the first sample tasks.verify accepts, else the
    last; the verifier recomputes the answer from the prompt, it never reads the reference), pass@1 and pass@n
    (unbiased, Chen et al. 2021). -> {type: {'n', 'greedy', ...}}, fractions in [0, 1]; verifier@n is None for a
    type the verifier cannot check."""
    stop_ids = [tok.special_tokens['<|im_end|>']] + ([tok.eot_id] if tok.eot_id is not None else [])
    scores = {}
    for ex in exercises:
        kind, ids = ex['type'], chat_prompt_ids(tok, [], ex['prompt'])
        s = scores.setdefault(kind, dict(n=0, greedy=0.0, **({f'sc@{n}': 0.0, f'verifier@{n}': 0.0, 'pass@1': 0.0,
                                                                 f'pass@{n}': 0.0} if n else {})))
        s['n'] += 1
        out = generate(model, ids, stop_ids=stop_ids, **{**gen, 'strategy': 'greedy', 'num_samples': 1})[0]
        s['greedy'] += check_answer(kind, extract_answer(tok.decode(out)), ex['answer'])
        if n:
            answers = [extract_answer(tok.decode(o)) for o in
                       generate(model, ids, num_samples=n, stop_ids=stop_ids, **gen)]
            correct = [check_answer(kind, a, ex['answer']) for a in answers]
            accepted = next((i for i, a in enumerate(answers) if verify(kind, ex['prompt'], a)), n - 1)
            s[f'sc@{n}'] += check_answer(kind, majority_vote(answers)[0], ex['answer'])
            s[f'verifier@{n}'] += correct[accepted]
            s['pass@1'] += pass_at_k(n, sum(correct), 1)
            s[f'pass@{n}'] += pass_at_k(n, sum(correct), n)
    for kind, s in scores.items():
        s.update({k: v / s['n'] for k, v in s.items() if k != 'n'})
        if n and not verifiable(kind):
            s[f'verifier@{n}'] = None
    return scores


def read_exercises(data_dir, split, per_type=0):
    """The exercises of data_dir/{split}_exercises.jsonl in file order (the twin's types take turns), at most
    per_type of each type (0 = all)."""
    import json
    path = os.path.join(data_dir, f'{split}_exercises.jsonl')
    if not os.path.isfile(path):
        die(f"{path} missing: exercises with checkable answers come from python prepare.py synth --source=local "
            f"or plays_genre")
    out, seen = [], Counter()
    for line in open(path, encoding='utf-8'):
        ex = json.loads(line)
        seen[ex['type']] += 1
        if not per_type or seen[ex['type']] <= per_type:
            out.append(ex)
    return out


def run_eval(model, tok, data_dir, gen):
    scores = score_exercises(model, tok, read_exercises(data_dir, 'val', eval_per_type), self_consistency, **gen)
    cols = [c for c in next(iter(scores.values())) if c != 'n']
    print(f"calculator {'on' if gen.get('tool') else 'off'}\n| type | n | " + ' | '.join(cols) + ' |')
    for t, s in scores.items():
        print(f"| {t} | {s['n']} | " + ' | '.join('-' if s[c] is None else f'{s[c]:.3f}' for c in cols) + ' |')
    if eval_json:
        from configurator import save_json
        save_json(dict(scores=scores, calculator=bool(gen.get('tool')), n=self_consistency, out_dir=out_dir,
                       per_type=eval_per_type), eval_json)


def write_preference_pairs(model, tok, data_dir, out, gen):
    """DPO data (Rafailov et al. 2023): pairs_k samples per train exercise, each checked by tasks.verify; a prompt
    with a right and a wrong sample gives one pair (chosen = right, rejected = wrong). Rows of equal length
    (prompt + response + <|im_end|>, padded with <|endoftext|>) and masks on the response, as train.py's
    objective='dpo' reads them; 10% of the prompts go to val."""
    import json
    import random
    import numpy as np
    import prepare
    exercises = read_exercises(data_dir, 'train')[:pairs_prompts or None]
    end, rng = tok.special_tokens['<|im_end|>'], random.Random(seed)
    max_len = (model.config.block_size if model is not None else 10 ** 9) + 1
    pairs, counts, t0 = [], Counter(), time.time()
    for k, ex in enumerate(exercises):
        ids = chat_prompt_ids(tok, [], ex['prompt'])
        outs = generate(model, ids, num_samples=pairs_k, stop_ids=[end, tok.eot_id], **gen)
        ok = [verify(ex['type'], ex['prompt'], extract_answer(tok.decode(o))) for o in outs]
        finish = lambda o: o + [end] if len(o) < gen['max_new_tokens'] else o  # a cut-off sample has no end
        fits = lambda o: len(ids) + len(o) <= max_len  # DPO trains on whole rows: block_size + 1 tokens at most
        right = [finish(o) for o, g in zip(outs, ok) if g and fits(finish(o))]
        wrong = [finish(o) for o, g in zip(outs, ok) if not g and fits(finish(o))]
        counts['paired' if right and wrong else 'too long' if any(ok) and not all(ok) else
               'all right' if all(ok) else 'all wrong'] += 1
        if right and wrong:
            pairs.append((ids, rng.choice(right), rng.choice(wrong), ex['type']))
        if (k + 1) % 50 == 0 or k + 1 == len(exercises):
            print(f"\rpairs: {k + 1}/{len(exercises)} prompts, {len(pairs)} pairs, {time.time() - t0:.0f}s",
                  end='', file=sys.stderr)
    print(file=sys.stderr)
    if len(pairs) < 2:
        die(f"only {len(pairs)} preference pairs from {len(exercises)} prompts ({dict(counts)}): the model must get "
            f"some samples right and some wrong; raise --pairs_k or --temperature, or train the SFT model longer")
    row_len = max(len(p) + len(r) for p, c, w, _ in pairs for r in (c, w))
    rng.shuffle(pairs)
    n_val = max(1, len(pairs) // 10)
    splits, masks = {}, {}
    for split, part in (('val', pairs[:n_val]), ('train', pairs[n_val:])):
        rows = [(p + r, [0] * len(p) + prepare.response_mask(tok, r)) for p, c, w, _ in part for r in (c, w)]
        splits[split] = np.array([x + [tok.eot_id] * (row_len - len(x)) for x, _ in rows], dtype=np.int64).ravel()
        masks[split] = np.array([m + [0] * (row_len - len(m)) for _, m in rows], dtype=np.uint8).ravel()
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
    meta.update(dataset=os.path.basename(os.path.abspath(out)), source=f"preference pairs sampled from {out_dir}",
                pairs=dict(row_len=row_len, pad_id=tok.eot_id, train=len(pairs) - n_val, val=n_val, k=pairs_k,
                           prompts=dict(counts), types=dict(Counter(t for *_, t in pairs))),
                train_tokens=int(splits['train'].size), val_tokens=int(splits['val'].size),
                **{f"{s}_mask_tokens": int(m.sum()) for s, m in masks.items()})
    meta.pop('bytes_per_token_all', None)
    val_ex = os.path.join(data_dir, 'val_exercises.jsonl')  # so --eval_exercises works on the DPO run too
    prepare.write_dataset(out, tok, splits, masks, meta,
                          {'val_exercises.jsonl': open(val_ex, encoding='utf-8').read()} if os.path.isfile(val_ex) else {})
    print(f"{len(pairs)} pairs ({n_val} val) of rows of {row_len} tokens from {len(exercises)} prompts "
          f"({dict(counts)}) -> {out}")


def auto_kv_dtype(device, dtype):
    """The KV cache's dtype for kv_dtype=auto: the weights' dtype, except on CPU, where fp32 unless the weights are
    bf16 and the CPU has AMX. On a 2-core AMX Xeon a bf16 cache decoded faster (greedy 2047 tokens of a 6L/384
    model: 380 against 288 tok/s with int8 weights); on an AVX512-BF16 AMD EPYC without AMX it was slower (225
    against 330 tok/s; batch-1 SDPA over 2048 bf16 positions 682 us against fp32's 98), as on AVX2-only CPUs."""
    from model import cpu_has_amx
    if device != 'cpu' or (dtype == 'bfloat16' and cpu_has_amx()):
        return dtype
    return 'float32'


def inference_weights(model):
    """Inference keeps no fp32 master weights: the model cast to --dtype (bf16: half the bytes read per token; no
    autocast), then --quantize, or on CPU in fp32 the wide matrices stored transposed."""
    model = model.to(getattr(torch, dtype))
    if quantize != 'none':
        return getattr(model, f'quantize_{quantize}')()
    if cpu_fp32_layout and device == 'cpu' and dtype == 'float32':
        return model.transpose_wide_weights()
    return model


def load_draft(path, target, n_tokens):
    """speculative=draft: the draft model of checkpoint `path`, prepared as the target is, or one error line."""
    draft, _ = load_checkpoint(path)
    if draft.config.vocab_size != target.config.vocab_size:
        die(f"the draft {path} has vocab_size {draft.config.vocab_size}, the model {target.config.vocab_size}: "
            "train the draft on the same tokenizer (the same data dir, or prepare.py --tokenizer_from)")
    check_keeps_every_token(draft, n_tokens, 'the draft')
    return inference_weights(draft.eval().to(device))


def check_keeps_every_token(model, n_tokens, what='the model'):
    c = model.config
    if c.sliding_window or c.pos_emb == 'learned' and n_tokens > c.block_size:
        die(f"speculative={speculative} needs a cache that keeps every token: {what} has sliding_window, or learned "
            f"positions for at most block_size={c.block_size} of the {n_tokens} tokens")


def main(argv=None):
    global device, dtype, kv_dtype
    argv = sys.argv[1:] if argv is None else argv
    reject_shape_flags(argv, 'sample.py')
    configure(globals(), argv)
    for key, allowed in (('strategy', 'greedy|sample|beam'), ('kv_cache', 'none|contiguous|paged'), ('quantize', 'none|int8|bf16'),
                         ('speculative', 'none|lookup|draft'),
                         ('dtype', 'auto|float32|bfloat16|float16'), ('kv_dtype', 'auto|float32|bfloat16|float16')):
        if globals()[key] not in allowed.split('|'):
            die(f"{key} must be {allowed}, got '{globals()[key]}'")
    check_ranges(globals(), [  # before anything loads
        ('temperature', temperature >= 0, '>= 0 (0 = greedy)'), ('top_k', top_k >= 0, '>= 0 (0 = off)'),
        ('top_p', 0 <= top_p <= 1, 'in [0, 1] (1 = off)'), ('min_p', 0 <= min_p <= 1, 'in [0, 1]'),
        ('repetition_penalty', repetition_penalty > 0, '> 0 (1 = off)'), ('no_repeat_ngram', no_repeat_ngram >= 0, '>= 0'),
        ('max_new_tokens', max_new_tokens >= 1, '>= 1'), ('num_samples', num_samples >= 1, '>= 1'),
        ('beam_size', beam_size >= 1, '>= 1'), ('n_best', 1 <= n_best <= beam_size, f'in [1, beam_size={beam_size}]'),
        ('page_size', page_size >= 1, '>= 1'), ('self_consistency', self_consistency >= 0, '>= 0 (0 = off)'),
        ('eval_per_type', eval_per_type >= 1, '>= 1'), ('draft_len', draft_len >= 1, '>= 1'),
        ('pairs_k', pairs_k >= 2, '>= 2'), ('pairs_prompts', pairs_prompts >= 0, '>= 0 (0 = all)')])
    if speculative != 'none' and (strategy != 'greedy' or kv_cache != 'contiguous' or num_samples != 1 or chat or
                                  prompt or eval_exercises or repetition_penalty != 1 or no_repeat_ngram or
                                  frequency_penalty or presence_penalty):
        die(f"speculative={speculative} is plain greedy made faster: use it with --strategy=greedy "
            "--kv_cache=contiguous, one sample, no penalties, not in chat or --eval_exercises")
    if (speculative == 'draft') != bool(draft_dir):
        die("--speculative=draft needs --draft_dir=OUT_DIR (a smaller model's checkpoint), and --draft_dir needs it")
    overrides = model_overrides(globals())
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if dtype == 'auto':
        dtype = 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
    torch.manual_seed(seed)
    given = out_dir != 'out' or any(a.partition('=')[0] == '--out_dir' for a in argv)
    model, tok, data_dir = load(find_checkpoint(out_dir, given), device, overrides)
    model = inference_weights(model)
    if kv_dtype == 'auto':
        kv_dtype = auto_kv_dtype(device, dtype)
    kv = getattr(torch, kv_dtype)
    if compile:  # pays off on long or repeated decoding: the first call compiles (~45 s on a 2-core CPU)
        model = torch.compile(model, dynamic=True)
    stop_ids = [tok.eot_id] if tok.eot_id is not None else []
    gen = dict(max_new_tokens=max_new_tokens, strategy=strategy, temperature=temperature, seed=seed,
               top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
               frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
               no_repeat_ngram=no_repeat_ngram, kv_cache=kv_cache, page_size=page_size, offload=offload, kv_dtype=kv,
               tool=calculator_tool(tok) if calculator else None)
    if write_pairs:
        return write_preference_pairs(model, tok, data_dir, write_pairs, gen)
    if eval_exercises:
        return run_eval(model, tok, eval_data_dir or data_dir, gen)
    if chat or prompt:
        return run_chat(model, tok, gen, stop_ids)
    text = start
    if text.startswith('FILE:'):
        try:
            text = open(text[5:], encoding='utf-8').read()
        except (OSError, UnicodeDecodeError) as e:
            die(f"cannot read the start file {text[5:]}: {e}")
    try:
        ids = tok.encode(text, allowed_special='all')
    except ValueError as e:  # e.g. a character the char vocabulary does not have
        die(f"cannot encode the start text: {e}")
    if not ids:
        die("the start text is empty: pass --start='some text' or --start=FILE:prompt.txt")
    if strategy == 'beam':
        stopping = {'true': True, 'false': False, 'never': 'never'}.get(str(early_stopping).lower())
        if stopping is None:
            die(f"early_stopping must be true|false|never, got '{early_stopping}'")
        hyps = beam_search(model, ids, max_new_tokens, beam_size, length_penalty, stopping, stop_ids,
                           n_best, kv_cache, page_size, offload, kv)
        for toks, score in hyps:
            text_out = tok.decode([t for t in toks if t not in stop_ids])
            print(f"--- score {score:.4f} ({len(toks)} tokens)\n{text}{text_out}")
        return
    streams = [TextStream(tok, show=num_samples == 1, stop=stop) for _ in range(num_samples)]
    if num_samples == 1:
        print(text, end='')
    if speculative != 'none':
        n_tokens = len(ids) + max_new_tokens
        check_keeps_every_token(model, n_tokens)
        draft = DraftModel(load_draft(find_checkpoint(draft_dir, True), model, n_tokens), n_tokens + draft_len, kv) \
            if speculative == 'draft' else None
        t0 = time.time()
        out, forwards = speculative_greedy(model, ids, max_new_tokens, stop_ids, lambda r, t: streams[r](t), draft_len,
                                           kv_dtype=kv, draft=draft)
        print(f"{speculative}: {len(out)} tokens in {forwards} forwards ({len(out) / forwards:.2f} tokens each), "
              f"{len(out) / (time.time() - t0):.1f} tok/s", file=sys.stderr)
    else:
        generate(model, ids, num_samples=num_samples, stop_ids=stop_ids,
                 on_token=lambda r, t: streams[r](t), **gen)
    for s in streams:
        s.finish()
        print(('\n' if num_samples == 1 else text + s.text() + '\n') + '---------------')


if __name__ == '__main__':
    try:
        main()
    except BrokenPipeError:  # `python sample.py ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
