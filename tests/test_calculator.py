"""tasks/calculator.py: arithmetic is right, and nothing else ever runs, hangs or raises."""
import time

import pytest

from tasks.calculator import MAX_DIGITS, evaluate


@pytest.mark.parametrize('expr,want', [('12+30', '42'), ('7*6', '42'), ('2**10', '1024'), ('-3 + +5', '2'),
                                       ('(1+2)*(3+4)', '21'), ('17//5', '3'), ('17 % 5', '2'), ('1/4', '0.25'),
                                       ('10/2', '5'), ('2**-1', '0.5'), ('1_000 * 3', '3000'), ('0.1+0.2', '0.3'),
                                       ('(-8) ** 2', '64'), ('2**0.5', '1.41421356237'), (' 6 * 7 ', '42')])
def test_arithmetic(expr, want):
    assert evaluate(expr) == want


@pytest.mark.parametrize('expr,words', [
    ("__import__('os').system('echo hacked')", 'not Call'), ('open("/etc/passwd").read()', 'not Call'),
    ('x + 1', 'not Name'), ('(1).__class__', 'not Attribute'), ('[1, 2][0]', 'not Subscript'),
    ('lambda: 1', 'not Lambda'), ('1 if 1 else 2', 'not IfExp'), ('True + 1', 'not Constant'), ('1j * 2', 'not Constant'),
    ('"a" * 3', 'not Constant'), ('1 < 2', 'not Compare'), ('2 << 3', 'not BinOp'), ('1; 2', 'not an arithmetic'),
    ('import os', 'not an arithmetic'), ('1/0', 'division by zero'), ('5 % 0', 'division by zero'),
    ('0 ** -1', 'negative power'), ('(-8) ** 0.5', 'fractional power'), ('', 'empty'), ('1e308 * 10', 'digits'),
])
def test_anything_else_is_an_error_string(expr, words):
    out = evaluate(expr)
    assert out.startswith('error:') and words in out, out


@pytest.mark.parametrize('expr', ['9**9**9', '10**10**10', '2**1000000', '(10**50)**3', '99999999**99999999',
                                  '1' * 10000 + '+1', '9' * 101, '(' * 150 + '1' + ')' * 150, '-' * 199 + '1',
                                  '1' + '*1' * 99, '10**99*10**99'])
def test_huge_or_deep_inputs_answer_at_once(expr):
    t0 = time.perf_counter()
    out = evaluate(expr)
    assert time.perf_counter() - t0 < 1.0  # refused (or computed) before anything big is built
    assert out.startswith('error:') or len(out.lstrip('-')) <= MAX_DIGITS, out[:80]
    if expr in ('9**9**9', '2**1000000', '9' * 101, '1' * 10000 + '+1', '10**99*10**99'):
        assert out.startswith('error:')
