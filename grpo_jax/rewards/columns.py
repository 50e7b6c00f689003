"""Column-wise arithmetic: the lines of a worked solution of a + b, a - b or a * d, as
`synthetic:arithmetic` writes them and the step reward `arithmetic_steps` checks them.

A column line reads `left op right [carry term] = result[, carry|borrow out]`, least
significant column first, e.g. for 57+68: "7+8=15, carry 1", "5+6+1=12, carry 1".
"""

from __future__ import annotations

import typing


class Column(typing.NamedTuple):
  """One line of column-wise working: `left op right [carry term] = result[, out]`.

  For + and *, carry_in is added and carry_out is the carry to the next column; for -,
  carry_in is the borrow taken by the previous column (subtracted) and carry_out says
  whether this column borrows (left then holds the digit plus 10).
  """
  left: int
  right: int
  carry_in: int
  result: int
  carry_out: int


def columns(a: int, b: int, op: str) -> list[Column]:
  """The columns of a op b, least significant digit first (a >= b for "-"; b one digit
  for "*")."""
  if op == "*":
    carry, cols = 0, []
    for d in map(int, str(a)[::-1]):
      p = d * b + carry
      cols.append(Column(d, b, carry, p, p // 10))
      carry = p // 10
    return cols
  width = len(str(max(a, b)))
  digits_a, digits_b = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
  carry, cols = 0, []
  for x, y in zip(map(int, digits_a), map(int, digits_b)):
    if op == "+":
      s = x + y + carry
      cols.append(Column(x, y, carry, s, s // 10))
      carry = s // 10
    else:
      borrow = int(x - y - carry < 0)
      cols.append(Column(x + 10 * borrow, y, carry, x + 10 * borrow - y - carry, borrow))
      carry = borrow
  return cols


def column_line(col: Column, op: str) -> str:
  """The text of one column, e.g. "7+5+1=13, carry 1" or "12-5-1=6, borrow 1"."""
  sign, out = ("-", "borrow") if op == "-" else ("+", "carry")
  carry_in = f"{sign}{col.carry_in}" if col.carry_in else ""
  carry_out = f", {out} {col.carry_out}" if col.carry_out else ""
  return f"{col.left}{op}{col.right}{carry_in}={col.result}{carry_out}"
