"""The countdown task: does an arithmetic expression over the given numbers hit the target?

The expression is parsed with `ast` and walked by hand: only integer literals, + - * /,
unary minus and parentheses are allowed, so nothing the model writes is ever executed.
"""

from __future__ import annotations

import ast
import collections
import fractions

_MAX_CHARS = 1000
# Spellings of * and / that models write in LaTeX or plain text.
_OPERATORS = {"\\times": "*", "\\cdot": "*", "×": "*", "\\div": "/", "÷": "/"}
_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class _NotAllowed(Exception):
  """The expression holds something other than numbers and + - * / ( )."""


def _literals(node: ast.expr) -> list[int]:
  """The integer literals of an allowed expression, in order; raises _NotAllowed."""
  if isinstance(node, ast.Constant) and type(node.value) is int:  # pylint: disable=unidiomatic-typecheck
    return [node.value]
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
    return _literals(node.operand)
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    return _literals(node.left) + _literals(node.right)
  raise _NotAllowed(type(node).__name__)


def _value(node: ast.expr) -> fractions.Fraction:
  """Exact value of an expression that `_literals` accepted."""
  if isinstance(node, ast.Constant):
    return fractions.Fraction(node.value)
  if isinstance(node, ast.UnaryOp):
    return -_value(node.operand)
  return _BINARY[type(node.op)](_value(node.left), _value(node.right))


def evaluate(expression: str) -> tuple[list[int], fractions.Fraction] | None:
  """The integer literals of `expression`, in order, and its exact value; None when it is
  not an expression of integers, + - * /, unary minus and parentheses, or has no value."""
  for spelling, op in _OPERATORS.items():
    expression = expression.replace(spelling, op)
  if len(expression) > _MAX_CHARS:
    return None
  try:
    tree = ast.parse(expression.strip(), mode="eval")
    return _literals(tree.body), _value(tree.body)
  except (SyntaxError, ValueError, RecursionError, MemoryError, _NotAllowed,
          ZeroDivisionError):
    return None


def uses_numbers(used: list[int], numbers: list[int]) -> bool:
  """True when `used` takes each of `numbers` at most once."""
  return not collections.Counter(used) - collections.Counter(int(n) for n in numbers)


def solves(expression: str, numbers: list[int], target: int | str) -> bool:
  """True when `expression` uses each of `numbers` at most once and equals `target`."""
  evaluated = evaluate(expression)
  try:
    return (evaluated is not None and uses_numbers(evaluated[0], numbers)
            and evaluated[1] == int(target))
  except ValueError:  # a number or the target is not an integer
    return False
