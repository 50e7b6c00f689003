"""accuracy: is the model's final answer mathematically equal to the row's answer?"""

from __future__ import annotations

from grpo_jax.errors import UserError
from grpo_jax.rewards import extract, math_worker

# Most checks take milliseconds; one still running after this long scores 0.
CHECK_TIMEOUT_S = 2.0


def accuracy(prompts: list[str], completions: list[str], *,
             answer: list[str] | None = None, **unused) -> list[float | None]:
  """1.0 when the final answer equals the gold answer per math-verify, else 0.0.

  The final answer is the last `\\boxed{}`, else the last `<answer>` tag, else the text
  after the last `####` (`extract.final_answer`); it is read as LaTeX math and compared
  with column "answer" (read the same way when it holds a boxed / tagged / `####` answer)
  by math-verify, so 0.5, 1/2 and \\frac{1}{2} are equal. A completion without a final
  answer scores 0.0; a row whose gold answer does not parse scores None. Model text is
  parsed, never evaluated; checks run in killable child processes (`math_worker`).
  """
  del prompts, unused
  if answer is None:
    raise UserError("reward 'accuracy' needs a dataset column 'answer'")
  pairs = []
  for gold, completion in zip(answer, completions, strict=True):
    gold = "" if gold is None else str(gold)
    pairs.append((extract.final_answer(gold) or gold, extract.final_answer(completion)))
  return math_worker.pool().check_all(pairs, CHECK_TIMEOUT_S)
