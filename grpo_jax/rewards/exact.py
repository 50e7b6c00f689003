"""exact_match: the reward of the built-in synthetic tasks."""

from __future__ import annotations

from grpo_jax.errors import UserError
from grpo_jax.rewards import countdown, extract


def exact_match(prompts: list[str], completions: list[str], *,
                answer: list[str] | None = None, task: list[str] | None = None,
                numbers: list[list[int]] | None = None, **unused) -> list[float]:
  """1.0 when `extract.extract_answer` equals column "answer" normalised, else 0.0.

  Rows with task "countdown" instead check the final answer (`extract.final_answer`)
  as an expression over column "numbers" that must equal the target in "answer"
  (`countdown.solves`).
  """
  del prompts, unused
  if answer is None:
    raise UserError("reward 'exact_match' needs a dataset column 'answer'")
  tasks = task if task is not None else [None] * len(completions)
  scores = []
  for i, (completion, gold, row_task) in enumerate(zip(completions, answer, tasks, strict=True)):
    if row_task == "countdown":
      if numbers is None:
        raise UserError("countdown rows need a dataset column 'numbers'")
      expression = extract.final_answer(completion)
      scores.append(float(expression is not None
                          and countdown.solves(expression, numbers[i], gold)))
    else:
      final = extract.extract_answer(completion)
      scores.append(float(final is not None and final == extract.normalize(str(gold))))
  return scores
