"""Scoring sampled answers: the answer of a generated turn, exact match against a reference, the verifier that
checks a twin exercise without its reference answer, and the unbiased pass@k (REFERENCE 16.5)."""
import re

from tasks import synth


def extract_answer(text):
    """The final answer of a generated assistant turn: after the last </think>, before <|im_end|>, first line."""
    text = text.split("<|im_end|>")[0].rsplit("</think>", 1)[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def check_answer(kind, pred, gold):
    """Exact match after normalising case, spaces, list commas and a final period; numbers ignore ',' and ' '."""
    norm = lambda s: re.sub(r"\s*,\s*", ", ", " ".join(str(s).strip().rstrip(".").lower().split()))
    if kind == "arithmetic":
        norm = lambda s: re.sub(r"[,\s]", "", str(s)).rstrip(".")
    return norm(pred) == norm(gold)


def verifiable(kind):
    return kind in synth.EXERCISES


def verify(kind, prompt, pred):
    """Accept pred if it is the answer recomputed from the prompt (tasks.synth.solve); the reference answer is
    never read, so this is a test-time check a deployed system could run. False for a prompt it cannot parse."""
    solved = synth.solve(kind, prompt) if verifiable(kind) else None
    return solved is not None and check_answer(kind, pred, solved)


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1), as the stable product
    1 - prod_{i=n-c+1..n} (1 - k/i); 1.0 when fewer than k samples are wrong."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    p = 1.0
    for i in range(n - c + 1, n + 1):
        p *= 1.0 - k / i
    return 1.0 - p
