"""format and format_lenient: is the completion laid out as reasoning, then answer?

Both read the completion together with a `<think>` that the chat template left open at
the end of the prompt (`extract.opened_think`).
"""

from __future__ import annotations

import re

from grpo_jax.rewards import extract

# Text that holds no think/answer tag.
_UNTAGGED = r"(?:(?!</?think>|</?answer>).)*"
_STRICT = re.compile(
    rf"<think>\n({_UNTAGGED})\n</think>\n<answer>\n({_UNTAGGED})\n</answer>\s*", re.DOTALL)
_LENIENT = re.compile(rf"\s*<think>({_UNTAGGED})</think>((?:(?!</?think>).)*)", re.DOTALL)


def _score(pattern: re.Pattern, prompts: list[str], completions: list[str]) -> list[float]:
  scores = []
  for prompt, completion in zip(prompts, completions, strict=True):
    match = pattern.fullmatch(extract.opened_think(prompt, completion))
    scores.append(float(match is not None and all(g.strip() for g in match.groups())))
  return scores


def format_strict(prompts: list[str], completions: list[str], **unused) -> list[float]:
  """1.0 for exactly `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`, else 0.0.

  Both parts must be non-blank and free of further tags; only whitespace may follow.
  """
  del unused
  return _score(_STRICT, prompts, completions)


def format_lenient(prompts: list[str], completions: list[str], **unused) -> list[float]:
  """1.0 for `<think>...</think>` then some answer text (any whitespace, tags or \\boxed).

  The reasoning and the answer text must be non-blank; there must be one think block.
  """
  del unused
  return _score(_LENIENT, prompts, completions)
