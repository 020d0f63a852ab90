"""The calculator tool: a safe arithmetic evaluator for the model's tool calls.

Only numbers, + - * / // % **, unary + and -, and parentheses are allowed: the expression is parsed with
Python's `ast` and walked here, never passed to eval(), so names, calls, attributes, subscripts and the rest
cannot run. Sizes are bounded before they are computed (9**9**9 is refused, not attempted), so a call never
hangs. Any problem comes back as a string starting with 'error:' for the model to read, never an exception.
"""
import ast
import math
import operator

# Tool-call tokens (special tokens of chat tokenizers; nanochat's python_start/output_start play this part):
# the model writes TOOL_START expression TOOL_END; the sampler appends OUTPUT_START result OUTPUT_END.
TOOL_START, TOOL_END, OUTPUT_START, OUTPUT_END = "<|tool_start|>", "<|tool_end|>", "<|output_start|>", "<|output_end|>"
TOOL_TOKENS = (TOOL_START, TOOL_END, OUTPUT_START, OUTPUT_END)

MAX_CHARS = 200           # longest expression accepted
MAX_DIGITS = 100          # longest number literal, and the largest result, in decimal digits
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalcError(Exception):
    pass


def digits(x):
    """Decimal digits of |x| (its integer part for floats), without converting a huge int to a string."""
    x = abs(x)
    return 1 if x < 10 else math.floor(math.log10(x)) + 1


def check_size(x):
    if isinstance(x, float) and not math.isfinite(x):
        raise CalcError("result is not a finite number")
    if digits(x) > MAX_DIGITS:
        raise CalcError(f"result has more than {MAX_DIGITS} digits")
    return x


def power(base, exp):
    """base ** exp, refused when the result would be too large (estimated from logarithms first)."""
    if base == 0 and exp < 0:
        raise CalcError("0 cannot be raised to a negative power")
    if abs(base) > 1 and exp * math.log10(abs(base)) > MAX_DIGITS:
        raise CalcError(f"result has more than {MAX_DIGITS} digits")
    if isinstance(exp, float) or exp < 0 or isinstance(base, float):
        if base < 0 and exp != int(exp):
            raise CalcError("a negative number to a fractional power is not a real number")
        return float(base) ** exp
    return base ** exp


def walk(node):
    if isinstance(node, ast.Expression):
        return walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = walk(node.left), walk(node.right)
        if isinstance(node.op, ast.Pow):
            return check_size(power(left, right))
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalcError("division by zero")
        return check_size(BINARY[type(node.op)](left, right))
    raise CalcError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")


def format_number(x):
    """Integers as they are; floats with up to 12 significant digits, without a trailing .0 when whole."""
    if isinstance(x, float):
        if x == int(x) and abs(x) < 1e15:
            return str(int(x))
        return f"{x:.12g}"
    return str(x)


def evaluate(expr):
    """The value of an arithmetic expression as text, or 'error: ...'."""
    if not isinstance(expr, str) or not expr.strip():
        return "error: empty expression"
    if len(expr) > MAX_CHARS:
        return f"error: expression longer than {MAX_CHARS} characters"
    if any(len(run) > MAX_DIGITS for run in "".join(c if c.isdigit() else " " for c in expr).split()):
        return f"error: a number has more than {MAX_DIGITS} digits"
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "error: not an arithmetic expression"
    try:
        return format_number(walk(tree))
    except CalcError as e:
        return f"error: {e}"
    except (OverflowError, RecursionError, MemoryError):
        return "error: the expression is too large"


def tool_output(text):
    """For generated text ending in TOOL_END: the text the sampler appends (OUTPUT_START result OUTPUT_END), the
    result being evaluate() of what follows the last TOOL_START. None if the text does not end a call."""
    if not text.endswith(TOOL_END):
        return None
    head, start, expr = text[: -len(TOOL_END)].rpartition(TOOL_START)
    result = evaluate(expr) if start else "error: a tool call ends without starting"
    return f"{OUTPUT_START}{result}{OUTPUT_END}"
