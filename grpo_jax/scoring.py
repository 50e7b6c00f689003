"""The host side of rewards: decode completions and score them against their dataset rows.

The train step reaches a `Scorer` through a host callback; evaluation and rejection
sampling call it directly, so all three score the same way. Words: a dataset *row* is one
dict of a data source ({"prompt", "answer", ...}); a *completion* is one sampled sequence.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import flax
import numpy as np

from grpo_jax import data as data_lib
from grpo_jax import process_scoring
from grpo_jax import rewards as rewards_lib


@flax.struct.dataclass
class Rewards:
  """The scores of R completions (numpy on the host, jax arrays inside the step)."""

  total: Any  # [R] float32: the weighted sum over the reward functions (NaN skipped)
  per_fn: Any  # [F, R] float32: each function's score, NaN where it gave none
  failures: Any  # int32 []: completions x functions that raised, timed out or were malformed
  seconds: Any  # float32 []: wall time of the call (decoding included)
  # Process supervision only (None otherwise), S = grpo.max_steps_per_completion slots:
  step_rewards: Any = None  # [R, S] float32: each step's reward, NaN where there is none
  step_ends: Any = None  # [R, S] int32: the completion token where each step ends; -1: no step
  steps_truncated: Any = None  # [R] int32: steps merged into the last slot


class Scorer:
  """Scores completions of the rows of one dataset with weighted reward functions, and with
  step reward functions too under process supervision (`steps`).

  The reward callback's contract, `scorer(row_ids, tokens, mask) -> Rewards`:
    row_ids [B] int: for each prompt of the batch, the index of its row in `rows`;
    tokens [R, N] int, mask [R, N] int: the completions, R = B * G, the G completions of
      prompt b in rows b * G .. b * G + G - 1; the mask is 1 up to and including EOS.
  The completions are decoded once, and the reward columns built once, for the outcome
  and the step functions. Rewards.step_* are set when `steps` is given (S = its
  max_steps), None otherwise; Rewards.failures counts the failures of both kinds.
  `names` are the reward functions' names, in the order of Rewards.per_fn (one metric
  "rewards/<name>" each).
  """

  def __init__(self, tokenizer, rows: Sequence[dict[str, Any]], specs, *, max_new_tokens: int,
               timeout_s: float = 10.0, steps: process_scoring.StepScorer | None = None):
    self.tokenizer = tokenizer
    self.rows = rows
    self.specs = tuple(specs)
    self.max_new_tokens = max_new_tokens
    self.timeout_s = timeout_s
    self.steps = steps  # decodes as data.decode_completions does here: no extra EOS ids

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.specs)

  def columns(self, rows: Sequence[dict[str, Any]], lengths: Sequence[int]) -> dict[str, Any]:
    """The keyword columns reward functions get for completions of rows[i] (lengths[i]
    tokens): each dataset column but "prompt", completion_lengths, max_completion_length."""
    columns: dict[str, Any] = {}
    for key in sorted({k for row in rows for k in row} - {"prompt"}):
      columns[key] = [row.get(key) for row in rows]
    columns["completion_lengths"] = [int(x) for x in lengths]
    columns["max_completion_length"] = self.max_new_tokens
    return columns

  def score_texts(self, rows: Sequence[dict[str, Any]], completions: Sequence[str],
                  lengths: Sequence[int]) -> rewards_lib.RewardResult:
    """Scores completions[i] against rows[i] (lengths[i] tokens)."""
    return rewards_lib.compute(self.specs, [row["prompt"] for row in rows], list(completions),
                               self.columns(rows, lengths), timeout_s=self.timeout_s)

  def __call__(self, row_ids: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> Rewards:
    start = time.perf_counter()
    row_ids, tokens, mask = np.asarray(row_ids), np.asarray(tokens), np.asarray(mask)
    group_size = tokens.shape[0] // row_ids.shape[0]
    rows = [self.rows[int(i)] for i in np.repeat(row_ids, group_size)]
    prompts = [row["prompt"] for row in rows]
    texts = data_lib.decode_completions(self.tokenizer, tokens, mask)
    columns = self.columns(rows, mask.sum(-1))
    result = rewards_lib.compute(self.specs, prompts, texts, columns, timeout_s=self.timeout_s)
    per_fn = [np.asarray(result.per_fn[name], np.float32) for name in self.names]
    rewards = Rewards(
        total=np.asarray(result.total, np.float32),
        per_fn=np.stack(per_fn) if per_fn else np.zeros((0, tokens.shape[0]), np.float32),
        failures=np.int32(result.num_failed), seconds=np.float32(0.0))
    if self.steps is not None:
      steps = self.steps(prompts, texts, columns, tokens, mask, rewards.total)
      rewards = rewards.replace(
          step_rewards=steps.rewards, step_ends=steps.ends, steps_truncated=steps.num_truncated,
          failures=np.int32(result.num_failed + steps.num_failed))
    return rewards.replace(seconds=np.float32(time.perf_counter() - start))
