"""The host side of rewards: decode completions and score them against their prompts' rows.

Used by the train step's reward callback, by evaluation and by rejection sampling, so that
all three score the same way.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from grpo_jax import data as data_lib
from grpo_jax import rewards as rewards_lib


class Scorer:
  """Scores completions of rows of one dataset with weighted reward functions.

  `scorer(row_ids [B], tokens [B*G, N], mask [B*G, N])` -> (total [B*G], per-function
  [F, B*G] with NaN for no score, number of failed reward calls). Completion i belongs to
  row row_ids[i // G]. `seconds` accumulates the wall time spent scoring (decode included),
  which the trainer logs per step as "perf/reward_s".
  """

  def __init__(self, tokenizer, rows: Sequence[dict[str, Any]], specs, *, max_new_tokens: int,
               timeout_s: float = 10.0):
    self.tokenizer = tokenizer
    self.rows = rows
    self.specs = tuple(specs)
    self.max_new_tokens = max_new_tokens
    self.timeout_s = timeout_s
    self.seconds = 0.0

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.specs)

  def score_texts(self, rows: Sequence[dict[str, Any]], completions: Sequence[str],
                  lengths: Sequence[int]):
    """Scores completions[i] against rows[i]; returns rewards.compute's result."""
    columns: dict[str, Any] = {}
    for key in sorted({k for row in rows for k in row} - {"prompt"}):
      columns[key] = [row.get(key) for row in rows]
    columns["completion_lengths"] = [int(x) for x in lengths]
    columns["max_completion_length"] = self.max_new_tokens
    prompts = [row["prompt"] for row in rows]
    return rewards_lib.compute(self.specs, prompts, list(completions), columns,
                               timeout_s=self.timeout_s)

  def decode(self, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    return data_lib.decode_completions(self.tokenizer, tokens, mask)

  def __call__(self, row_ids: np.ndarray, tokens: np.ndarray, mask: np.ndarray):
    start = time.perf_counter()
    try:
      return self._score(row_ids, tokens, mask)
    finally:
      self.seconds += time.perf_counter() - start

  def _score(self, row_ids: np.ndarray, tokens: np.ndarray, mask: np.ndarray):
    group_size = tokens.shape[0] // row_ids.shape[0]
    rows = [self.rows[int(i)] for i in np.repeat(row_ids, group_size)]
    result = self.score_texts(rows, self.decode(tokens, mask), mask.sum(-1))
    per_fn = np.stack([result.per_fn[name] for name in self.names]) if self.specs else (
        np.zeros((0, tokens.shape[0]), np.float32))
    return result.total, per_fn, result.num_failed
