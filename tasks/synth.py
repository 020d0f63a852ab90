"""PleIAs/SYNTH as chats, and its offline twin.

The row mapping (a SYNTH row -> one user turn and one assistant turn with <think> reasoning), the check that a
rendered conversation is well formed, the deterministic offline twin's five exercise kinds (arithmetic, count,
sort, reverse, rag: made-up words and names, so every answer comes from the prompt), the train/val split by id,
and `solve`: each twin exercise's answer recomputed from its prompt alone, which is what the verifier checks a
sampled answer against. prepare.py fetches rows and writes files; this module only builds and reads text.
"""
import hashlib
import random
import re

from tasks.calculator import OUTPUT_END, OUTPUT_START, TOOL_END, TOOL_START, evaluate as calculator_eval

EOT = "<|endoftext|>"

CHAT_FIELDS = ("query", "constraints", "synthetic_reasoning", "synthetic_answer")


def row_to_chat(row):
    """SYNTH row -> (user, assistant) as the seed checklist maps it: constraints join the query only for rag."""
    user = (row.get("query") or "").strip()
    if row.get("exercise") == "rag" and (row.get("constraints") or "").strip():
        user += "\n" + row["constraints"].strip()
    reasoning, answer = (row.get("synthetic_reasoning") or "").strip(), (row.get("synthetic_answer") or "").strip()
    return user, f"<think>{reasoning}</think>\n{answer}"


# ChatML as prepare.render_chatml writes it (REFERENCE 15), with the assistant's <think> part
CHAT_RE = re.compile(r"<\|im_start\|>user\n(.+)<\|im_end\|>\n<\|im_start\|>assistant\n"
                     r"<think>(.*)</think>\n(.+)<\|im_end\|>", re.S)


def valid_chat(text):
    """Exactly one user and one assistant turn, every tag once and in order, non-empty question and answer."""
    once = all(text.count(t) == n for t, n in (("<|im_start|>", 2), ("<|im_end|>", 2), ("<think>", 1), ("</think>", 1)))
    return once and EOT not in text and CHAT_RE.fullmatch(text) is not None


# ---------------------------------------------------------------------------------------------------------
# The offline twin: SYNTH-schema exercises, each with a step-by-step reasoning trace and a checkable answer.
# Made-up words and names, so answers come from the prompt (and the rag sources), never from memory.
SYLLABLES = "ba ko ri sta mel von dra li ter en qua zo rum pel sa ni tor gra bel mi ossi lan der ve cal".split()
WORDS = "apple river stone cloud lamp tiger honey glass maple otter violin pepper candle mirror rocket".split()
RAG_FACTS = (("The capital of {e} is {a}.", "What is the capital of {e}?"),
             ("{e} was founded in the year {a}.", "In which year was {e} founded?"),
             ("The {e} engine was invented by {a}.", "Who invented the {e} engine?"))
FILLER = ("Its markets are busy in the spring.", "The region is known for its mild winters.",
          "Travellers often arrive by the northern road.", "Local records were kept in three languages.")


def pseudo_word(rng, lo=2, hi=4, title=False):
    w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(lo, hi)))
    return w.title() if title else w


def arithmetic_exercise(rng, calculator=False):
    """Multi-digit + and - column by column (carries, borrows); * as two partial products. With the calculator
    the reasoning is one tool call and its result instead (the same numbers: the rng is drawn the same way)."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(10, 999), rng.randint(11, 99)
        ans, units, tens = a * b, b % 10, b // 10 * 10
        steps = [f"{a} * {units} = {a * units}", f"{a} * {tens} = {a * tens}", f"{a * units} + {a * tens} = {ans}"]
    else:
        a, b = rng.randint(100, 99999), rng.randint(10, 99999)
        a, b = (b, a) if op == "-" and b > a else (a, b)
        ans, carry, steps = a + b if op == "+" else a - b, 0, ["Work digit by digit from the right"]
        da, db = str(a)[::-1], str(b)[::-1]
        for k in range(max(len(da), len(db))):
            x, y = (int(d[k]) if k < len(d) else 0 for d in (da, db))
            if op == "+":
                s = x + y + carry
                steps.append(f"{x} + {y} + carry {carry} = {s}, write {s % 10}, carry {s // 10}")
                carry = s // 10
            else:
                d = x - y - carry
                write = f", borrow 10: write {d + 10}" if d < 0 else f", write {d}"
                steps.append(f"{x} - {y} - borrow {carry} = {d}" + write)
                carry = int(d < 0)
        steps += [f"final carry {carry}"] if carry else []
    if calculator:
        call = f"{TOOL_START}{a} {op} {b}{TOOL_END}{OUTPUT_START}{calculator_eval(f'{a} {op} {b}')}{OUTPUT_END}"
        return f"What is {a} {op} {b}?", "", f"Use the calculator: {call}", str(ans)  # the answer copies the output
    return f"What is {a} {op} {b}?", "", "; ".join(steps) + f". So {a} {op} {b} = {ans}.", str(ans)


def count_exercise(rng):
    """Letters in a made-up word, spelled out with a running count."""
    word = pseudo_word(rng)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("hjwxy")  # sometimes absent
    marks, n = [], 0
    for c in word:
        n += c == letter
        marks.append(f"{c} ({n})" if c == letter else c)
    q = f"How many times does the letter '{letter}' appear in the word '{word}'?"
    return q, "", f"Spell it out and count each '{letter}': {', '.join(marks)}. Total: {n}.", str(n)


def list_exercise(rng, kind):
    """Sort (selection, step by step) or reverse a short list of numbers or words."""
    numeric = rng.random() < 0.5
    n = rng.randint(3, 7)
    items = [str(rng.randint(0, 99)) for _ in range(n)] if numeric else rng.sample(WORDS, n)
    if kind == "reverse":
        ans = items[::-1]
        steps = ", ".join(f"{x} (item {len(items) - k})" for k, x in enumerate(ans))
        reasoning = f"Read the list from the last item to the first: {steps}."
        return f"Reverse this list: {', '.join(items)}.", "", reasoning, ", ".join(ans)
    key, rest, steps = int if numeric else str, list(items), []
    while rest:
        low = min(rest, key=key)
        steps.append(f"smallest of {', '.join(rest)} is {low}" if len(rest) > 1 else f"{low} is left")
        rest.remove(low)
    q = f"Sort these {'numbers in ascending order' if numeric else 'words alphabetically'}: {', '.join(items)}."
    reasoning = "Take the smallest remaining item each time: " + "; ".join(steps) + "."
    return q, "", reasoning, ", ".join(sorted(items, key=key))


def rag_exercise(rng):
    """3-6 <source_N> passages about different made-up entities; the needle sits at a random depth."""
    fact, question = rng.choice(RAG_FACTS)
    n = rng.randint(3, 6)
    entities = list(dict.fromkeys(pseudo_word(rng, 2, 3, title=True) for _ in range(n + 3)))[:n]
    values = [str(rng.randint(1200, 1950)) if "year" in fact else pseudo_word(rng, 2, 3, title=True) for _ in entities]
    sources = [f"<source_{k + 1}>\n{fact.format(e=e, a=v)} {rng.choice(FILLER)}\n</source_{k + 1}>"
               for k, (e, v) in enumerate(zip(entities, values))]
    depth = rng.randrange(len(entities))
    e, ans = entities[depth], values[depth]
    reasoning = f"The question is about {e}. Source {depth + 1} says: {fact.format(e=e, a=ans)} So the answer is {ans}."
    return question.format(e=e), "\n".join(sources), reasoning, ans


EXERCISES = dict(arithmetic=arithmetic_exercise, count=count_exercise, sort=lambda rng: list_exercise(rng, "sort"),
                 reverse=lambda rng: list_exercise(rng, "reverse"), rag=rag_exercise)


def local_synth_rows(n, seed, calculator=False):
    """The offline twin of SYNTH: n exercises, the five kinds in turn, fully determined by seed. calculator: the
    arithmetic reasoning is a calculator call (tasks.calculator's tool tokens) instead of column arithmetic."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        kind = list(EXERCISES)[i % len(EXERCISES)]
        q, constraints, reasoning, ans = arithmetic_exercise(rng, calculator) if kind == "arithmetic" else EXERCISES[kind](rng)
        rows.append(dict(synth_id=f"local-{seed}-{i:06d}", exercise=kind, language="en", query=q,
                         constraints=constraints, synthetic_reasoning=reasoning, synthetic_answer=ans))
    return rows


def in_val(synth_id, val_frac):
    """Split by a hash of synth_id: stable, and independent of row order."""
    return int(hashlib.sha1(str(synth_id).encode()).hexdigest()[:8], 16) % 10000 < val_frac * 10000


# The verifier's side: an exercise's answer from its prompt alone (the prompt formats above, parsed back)
SOLVERS = (
    ("arithmetic", re.compile(r"What is (\d+ [-+*] \d+)\?"), lambda m: calculator_eval(m[1])),
    ("count", re.compile(r"How many times does the letter '(.)' appear in the word '(\w+)'\?"),
     lambda m: str(m[2].count(m[1]))),
    ("sort", re.compile(r"Sort these (numbers in ascending order|words alphabetically): (.+)\."),
     lambda m: ", ".join(sorted(m[2].split(", "), key=int if m[1].startswith("numbers") else str))),
    ("reverse", re.compile(r"Reverse this list: (.+)\."), lambda m: ", ".join(m[1].split(", ")[::-1])),
)


def solve_rag(prompt):
    question = prompt.split("\n", 1)[0]
    for fact, asked in RAG_FACTS:
        m = re.fullmatch(re.escape(asked).replace(r"\{e\}", r"(\w+)"), question)
        if m:
            m = re.search(re.escape(fact).replace(r"\{e\}", re.escape(m[1])).replace(r"\{a\}", r"(\w+)"), prompt)
            return m[1] if m else None
    return None


def solve(kind, prompt):
    """The answer of a twin exercise recomputed from its prompt, or None if the prompt is not of that kind."""
    if kind == "rag":
        return solve_rag(prompt)
    for name, pattern, answer in SOLVERS:
        m = pattern.fullmatch(prompt) if name == kind else None
        if m:
            return answer(m)
    return None
