"""Step rewards for process supervision: each step of a synthetic task's worked solution,
checked by rule.

A step reward function has the shape `fn(prompts, completions, **columns) ->
list[list[tuple[int, float]] | None]`: for each completion, (end, reward) pairs, end being
the character offset just past the step's last character (`completion[:end]` is the text
up to and including the step, 1 <= end <= len(completion)), or None for no score.

Here a step is a line of the reasoning (inside <think>...</think>, else the whole
completion) that is an equation; other lines are text, not steps. A step scores 1.0 when
right and 0.0 when wrong, and the final answer is the last step, ending where it is
written and scored as `exact_match` scores the completion; a completion without one gets
0.0 at its end. Text is parsed (regular expressions, `ast` for countdown expressions), never
evaluated.
"""

from __future__ import annotations

import collections
import re
from typing import Callable, Iterator

from grpo_jax.errors import UserError
from grpo_jax.rewards import columns, countdown, extract

Steps = list[tuple[int, float]]
# Longer numbers make a step wrong (int() refuses > 4300 digits; nothing needs 30).
_MAX_DIGITS = 30
_PROBLEM = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)")
# left op right [sign carry_in] = result [, carry|borrow carry_out]
_COLUMN = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)\s*(?:([+\-])\s*(\d+)\s*)?=\s*(-?\d+)\s*"
                     r"(?:,\s*(carry|borrow)\s+(\d+))?")
_INTEGER = re.compile(r"-?\d+")


def _lines(completion: str) -> Iterator[tuple[str, int]]:
  """The stripped non-blank lines of the reasoning and the offset just past each."""
  start, end = extract.reasoning_span(completion)
  for match in re.finditer(r"[^\n]+", completion[start:end]):
    line = match.group().rstrip()
    if line.strip():
      yield line.strip(), start + match.start() + len(line)


def _number(text: str | None, default: int = 0) -> int | None:
  """The integer `text` spells (`default` when absent); None when it is too long."""
  if text is None:
    return default
  return int(text) if len(text.lstrip("-")) <= _MAX_DIGITS else None


def _final_step(completion: str, found: tuple[str, int] | None,
                right: Callable[[str], bool]) -> tuple[int, float]:
  """The final answer `found` (answer, end) as a step: (end, 1.0 when right(answer) else
  0.0); a completion without one gets 0.0 at its end."""
  if found is None:
    return len(completion), 0.0
  return found[1], float(right(found[0]))


def _column_right(match: re.Match, op: str, expected: columns.Column) -> bool:
  """Whether an equation line is `expected`, the column the problem has at its place."""
  left, line_op, right, sign, carry_in, result, word, carry_out = match.groups()
  sign_ok = sign is None or sign == ("-" if op == "-" else "+")
  word_ok = word is None or word == ("borrow" if op == "-" else "carry")
  values = [_number(left), _number(right), _number(carry_in), _number(result),
            _number(carry_out)]
  return line_op == op and sign_ok and word_ok and values == list(expected)


def _arithmetic(prompt: str, completion: str) -> Steps | None:
  problem = _PROBLEM.search(prompt)
  if problem is None:
    return None
  a, op, b = _number(problem.group(1)), problem.group(2), _number(problem.group(3))
  if a is None or b is None or op == "-" and a < b:
    return None
  if not completion:
    return []
  expected = columns.columns(a, b, op)
  value = {"+": a + b, "-": a - b, "*": a * b}[op]
  steps = []
  for line, end in _lines(completion):
    match = _COLUMN.fullmatch(line)
    if match is None:
      continue
    k = len(steps)
    if k < len(expected):
      right = _column_right(match, op, expected[k])
    else:  # the whole problem once, then nothing: extra equations are wrong
      right = k == len(expected) and match.group(4, 7) == (None, None) and [
          _number(match.group(1)), match.group(2), _number(match.group(3)),
          _number(match.group(6))] == [a, op, b, value]
    steps.append((end, float(right)))
  steps.append(_final_step(completion, extract.extract_answer_at(completion),
                           lambda answer: answer == str(value)))
  return steps


def arithmetic_steps(prompts: list[str], completions: list[str], *,
                     task: list[str] | None = None, **unused) -> list[Steps | None]:
  """Steps of `synthetic:arithmetic`'s worked solution: its column lines, the whole
  problem, the final answer.

  The problem "a op b" is read from the prompt (the first one in it), and its result
  computed, so no "answer" column is needed. The k-th equation line of the reasoning
  is right when it is column k of `columns.columns(a, b, op)`: the right digits, the
  carry (or borrow) in from column k-1 and out to column k+1, the right result (spaces
  are free). The equation after the last column is right when it is "a op b = result";
  equations after it are wrong. Rows of another task (column "task") or whose prompt has
  no problem score None; an empty completion has no steps.
  """
  del unused
  tasks = task if task is not None else ["arithmetic"] * len(completions)
  return [_arithmetic(prompt, completion) if row_task == "arithmetic" else None
          for prompt, completion, row_task in zip(prompts, completions, tasks, strict=True)]


def _countdown(completion: str, numbers: list[int], target: str) -> Steps:
  if not completion:
    return []
  pool = collections.Counter(int(n) for n in numbers)
  steps = []
  for line, end in _lines(completion):
    expression, equals, result = line.rpartition("=")
    evaluated = countdown.evaluate(expression) if equals else None
    if evaluated is None or not _INTEGER.fullmatch(result.strip()):
      continue  # text, not an equation
    used, value = evaluated
    stated = _number(result.strip())
    right = (len(used) >= 2 and countdown.uses_numbers(used, list(pool.elements()))
             and value == stated)
    pool -= collections.Counter(used)
    if stated is not None:
      pool[stated] += 1
    steps.append((end, float(right)))
  steps.append(_final_step(completion, extract.final_answer_at(completion),
                           lambda expression: countdown.solves(expression, numbers, target)))
  return steps


def countdown_steps(prompts: list[str], completions: list[str], *,
                    answer: list[str] | None = None, numbers: list[list[int]] | None = None,
                    task: list[str] | None = None, **unused) -> list[Steps | None]:
  """Steps of `synthetic:countdown`'s worked solution: each intermediate equation, then
  the final answer.

  An equation line "expression = integer" is right when its expression combines at
  least two numbers that are still available, each once, and equals the integer.
  Available: the row's "numbers" at first; each equation then takes the numbers it uses
  and gives back the number it states (right or not, so every line is judged on its
  own). The final answer is right when it is an expression that makes the target
  ("answer") from the numbers (`countdown.solves`). Rows of another task (column "task")
  score None; an empty completion has no steps.
  """
  del prompts, unused
  if answer is None or numbers is None:
    raise UserError("step reward 'countdown_steps' needs dataset columns 'answer' and "
                    "'numbers'")
  tasks = task if task is not None else ["countdown"] * len(completions)
  return [_countdown(completion, row_numbers, target)
          if row_task == "countdown" and row_numbers is not None else None
          for completion, row_numbers, target, row_task
          in zip(completions, numbers, answer, tasks, strict=True)]
