"""Synthetic reasoning tasks generated locally: multi-digit arithmetic and countdown.

A source string "synthetic:<task>[:key=value,...]" selects a task and its options, e.g.
"synthetic:arithmetic:digits=4,ops=+-*" or "synthetic:countdown:max_numbers=3". Every
row carries a worked "reasoning" that reaches the answer, for the SFT warm start.

Splits: a problem belongs to "eval" when crc32(prompt) % 10 == 0 and to "train"
otherwise, so the two splits never share a prompt whatever the seeds.
"""

from __future__ import annotations

import dataclasses
import operator
import random
import zlib
from typing import Callable

from grpo_jax.errors import UserError
from grpo_jax.rewards.columns import column_line, columns

INSTRUCTION = "Think in <think></think>, then answer in <answer></answer>."
SPLITS = ("train", "eval")
DEFAULT_NUM_ROWS = {"train": 10_000, "eval": 1_000}
_EVAL_BUCKETS = 10
_MAX_TARGET = 999
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


@dataclasses.dataclass(frozen=True)
class ArithmeticOptions:
  """digits: operands have 1..digits digits; ops: any of "+-*" (`*` by one digit).

  wrong_answers: the percentage of rows whose SFT target ends in a wrong final answer
  (the true one off by 1 or 10) after a correct worked solution, like unverified
  cold-start data. Only the SFT target ("sft_answer") is wrong; "answer", which the
  rewards check, stays true.

  unworked: the percentage of rows whose reasoning skips the columns: the one line
  "a+b=c", right like every other line. A model warm-started on them answers some
  problems at once and works others out column by column, and RL has to find which of the
  two pays. (Not in repr, which seeds the rows: sources without it keep their rows.)
  """

  digits: int = 3
  ops: str = "+-"
  wrong_answers: int = 0
  unworked: int = dataclasses.field(default=0, repr=False)

  def __post_init__(self):
    if not 1 <= self.digits <= 9:
      raise UserError(f"synthetic:arithmetic digits={self.digits} is out of range; allowed 1..9")
    if not 0 <= self.wrong_answers <= 100:
      raise UserError(f"synthetic:arithmetic wrong_answers={self.wrong_answers} is out of range;"
                      " allowed 0..100 (percent)")
    if not 0 <= self.unworked <= 100:
      raise UserError(f"synthetic:arithmetic unworked={self.unworked} is out of range;"
                      " allowed 0..100 (percent)")
    if not self.ops or set(self.ops) - set("+-*"):
      raise UserError(f"synthetic:arithmetic ops={self.ops!r} is invalid;"
                      " allowed: a non-empty mix of + - *")


@dataclasses.dataclass(frozen=True)
class CountdownOptions:
  """min_numbers..max_numbers numbers drawn from 1..max_number; targets up to 999."""

  min_numbers: int = 3
  max_numbers: int = 4
  max_number: int = 20

  def __post_init__(self):
    if not 2 <= self.min_numbers <= self.max_numbers <= 6:
      raise UserError(
          f"synthetic:countdown min_numbers={self.min_numbers} max_numbers={self.max_numbers}"
          " are invalid; allowed 2 <= min_numbers <= max_numbers <= 6")
    if not 2 <= self.max_number <= 100:
      raise UserError(f"synthetic:countdown max_number={self.max_number} is out of range;"
                      " allowed 2..100")


def _random_operand(rng: random.Random, max_digits: int) -> int:
  num_digits = rng.randint(1, max_digits)
  return rng.randint(0 if num_digits == 1 else 10 ** (num_digits - 1), 10 ** num_digits - 1)


def arithmetic_row(rng: random.Random, options: ArithmeticOptions) -> dict:
  """One arithmetic problem with its column-wise worked solution."""
  op = rng.choice(options.ops)
  a = _random_operand(rng, options.digits)
  if op == "*":
    b = rng.randint(2, 9)
  else:
    b = _random_operand(rng, options.digits)
    if op == "-" and a < b:
      a, b = b, a
  expr = f"{a}{op}{b}"
  answer = str(_OPS[op](a, b))
  lines = [column_line(col, op) for col in columns(a, b, op)]
  if options.unworked and rng.random() < options.unworked / 100:
    lines = []
  reasoning = "\n".join(lines + [f"{expr}={answer}"])
  row = {"prompt": f"Compute {expr}.\n{INSTRUCTION}", "answer": answer,
         "task": "arithmetic", "reasoning": reasoning}
  if options.wrong_answers and rng.random() < options.wrong_answers / 100:
    row["sft_answer"] = str(int(answer) + rng.choice((-10, -1, 1, 10)))
  return row


def _combine(rng: random.Random, x: tuple[int, str],
             y: tuple[int, str]) -> tuple[int, str, str] | None:
  """Applies a random operation to two (value, expression) pairs; None if not exact."""
  (a, ea), (b, eb) = x, y
  op = rng.choice("+-*/")
  if op in "-/" and a < b:
    (a, ea), (b, eb) = (b, eb), (a, ea)
  if op == "-" and a == b or op == "/" and a % b:
    return None
  value = _OPS[op](a, b)
  wrap = lambda e: e if e.isdigit() else f"({e})"
  return value, f"{wrap(ea)}{op}{wrap(eb)}", f"{a}{op}{b}={value}"


def _random_solution(rng: random.Random, numbers: list[int]) -> tuple[int, str, list[str]] | None:
  """Combines random pairs until one value is left: (value, expression, steps), or None."""
  pool, steps = [(n, str(n)) for n in numbers], []
  while len(pool) > 1:
    x, y = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
    combined = _combine(rng, x, y)
    if combined is None:
      return None
    value, expr, step = combined
    pool.append((value, expr))
    steps.append(step)
  return pool[0][0], pool[0][1], steps


def countdown_row(rng: random.Random, options: CountdownOptions) -> dict:
  """One countdown game: a target reachable from all the numbers with + - * /."""
  while True:
    numbers = [rng.randint(1, options.max_number)
               for _ in range(rng.randint(options.min_numbers, options.max_numbers))]
    solved = _random_solution(rng, numbers)
    if solved is not None and 0 < solved[0] <= _MAX_TARGET:
      break
  target, solution, steps = solved
  listed = ", ".join(map(str, numbers))
  return {"prompt": f"Use {listed} once each with + - * / to make {target}.\n{INSTRUCTION}",
          "answer": str(target), "numbers": numbers, "task": "countdown",
          "reasoning": "\n".join(steps), "solution": solution}


_TASKS: dict[str, tuple[type, Callable[[random.Random, object], dict]]] = {
    "arithmetic": (ArithmeticOptions, arithmetic_row),
    "countdown": (CountdownOptions, countdown_row),
}


def _parse_options(task: str, text: str, options_cls: type):
  """Parses "digits=4,ops=+-" into options_cls(digits=4, ops="+-")."""
  fields = {f.name: type(f.default) for f in dataclasses.fields(options_cls)}
  kwargs = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in fields:
      raise UserError(f"bad option {item!r} for synthetic:{task}; allowed: "
                      + ", ".join(f"{k}=..." for k in fields))
    if fields[key] is int:
      if not value.lstrip("-").isdigit():
        raise UserError(f"synthetic:{task} option {key} must be an integer, got {value!r}")
      kwargs[key] = int(value)
    else:
      kwargs[key] = value
  return options_cls(**kwargs)


def synthetic_rows(spec: str, *, split: str = "train", seed: int = 0,
                   num_rows: int | None = None) -> list[dict]:
  """Rows of the task named by spec ("<task>[:key=value,...]"), deterministic in seed."""
  task, _, option_text = spec.partition(":")
  if task not in _TASKS:
    raise UserError(f"unknown synthetic task {task!r}; allowed: "
                    + ", ".join(f"synthetic:{t}" for t in _TASKS))
  if split not in SPLITS:
    raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
  options_cls, make_row = _TASKS[task]
  options = _parse_options(task, option_text, options_cls)
  rng = random.Random(f"{task}|{options}|{seed}|{split}")
  want_eval = split == "eval"
  rows = []
  while len(rows) < (DEFAULT_NUM_ROWS[split] if num_rows is None else num_rows):
    row = make_row(rng, options)
    if (zlib.crc32(row["prompt"].encode()) % _EVAL_BUCKETS == 0) == want_eval:
      rows.append(row)
  return rows
