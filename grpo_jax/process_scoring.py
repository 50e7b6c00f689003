"""The host side of process supervision: a batch's step rewards as fixed-size arrays
indexed by completion token, the input of `advantages.process_advantages`.

Step reward functions (`step_rewards`, run by `rewards.compute_steps`) mark where each
step ends by a character offset in the decoded completion. Here each end becomes the
completion token that holds the step's last character (a step ending inside a
multi-character token maps to that token; a character spread over several tokens maps
to the token that completes it). The tokens are decoded one by one and checked against
the text the functions saw, the whole as `data.decode_completions` decodes it
(`token_ends`).

Each completion has S = grpo.max_steps_per_completion slots. A completion with more
steps keeps its first S - 1 and merges the rest into slot S: that step ends where the
last merged one ends and its reward is the smallest of theirs (NaN ignored), so a wrong
step past the limit still makes the merged step wrong; the merged-away steps are counted.

Outcome and step rewards. DeepSeekMath's process supervision (4.1.3) uses step rewards
only, and so does `grpo.supervision="process"` by default: the outcome rewards
(`rewards`) are still computed and logged, but do not enter the advantages. Listing
"outcome:w" in `step_rewards` adds the outcome total times w as one more step that ends
at the completion's last token (EOS included), normalised with the group's other steps;
every token of the completion then shares in it, as in outcome supervision. That step
takes one of the S slots and is never merged.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np
from tokenizers import decoders

from grpo_jax import data as data_lib
from grpo_jax import rewards as rewards_lib
from grpo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class StepArrays:
  """A batch of R completions' steps in S slots, sorted by end within a row.

  rewards: [R, S] float32 reward of each step; NaN where a row has fewer steps (or a
    step has no score). ends: [R, S] int32 index of the completion token (0..N-1) where
    each step ends; -1 where there is no step. num_truncated: [R] int32 steps of each
    row merged into its last slot. num_failed: completions times step functions that
    raised, timed out or returned malformed steps.
  """
  rewards: np.ndarray
  ends: np.ndarray
  num_truncated: np.ndarray
  num_failed: int


def _stream_ends(tokenizer, ids: Sequence[int], text: str) -> np.ndarray | None:
  """[len(ids)] characters of `text` written once each token is decoded, by the tokenizer's
  incremental decoder; None when it has none, fails, or its pieces do not make up `text`."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    return None
  stream = decoders.DecodeStream(skip_special_tokens=False)
  try:
    pieces = [stream.step(backend, int(i)) or "" for i in ids]
  except Exception:  # pylint: disable=broad-except
    return None  # tokenizers raises a bare Exception, e.g. on a prefix that decodes anew
  if "".join(pieces) != text:
    return None
  return np.cumsum([len(piece) for piece in pieces])


def _bisect_ends(tokenizer, ids: Sequence[int], text: str, char_ends: Sequence[int]
                 ) -> list[int]:
  """token_ends by bisection: the first k whose prefix ids[:k + 1] decodes to a text that
  starts with text[:end], from the previous answer on (log2(len(ids)) prefix decodes)."""
  if data_lib.decode_ids(tokenizer, ids) != text:
    raise ValueError("the completion text is not the decoded completion tokens")
  found, low = [], 0
  for end in char_ends:
    high = len(ids) - 1
    while low < high:
      mid = (low + high) // 2
      if data_lib.decode_ids(tokenizer, ids[:mid + 1])[:end] == text[:end]:
        high = mid
      else:
        low = mid + 1
    found.append(low)
  return found


def token_ends(tokenizer, ids: Sequence[int], text: str, char_ends: Sequence[int]) -> list[int]:
  """For each character end (1..len(text), ascending), the index into `ids` of the token
  that writes character end - 1 of `text`, the decoded `ids`.

  The tokenizer's incremental decoder (tokenizers' DecodeStream, one step per token)
  gives each token's piece of text; when the pieces do not make up `text` (a tokenizer
  that cleans up spaces after decoding, or one without a Rust backend), prefixes are
  decoded instead (`_bisect_ends`, slower).
  """
  if any(not 1 <= end <= len(text) for end in char_ends):
    raise ValueError(f"character ends {list(char_ends)} are not all in 1..{len(text)}")
  written = _stream_ends(tokenizer, ids, text)
  if written is None:
    return _bisect_ends(tokenizer, ids, text, char_ends)
  return np.searchsorted(written, char_ends, side="left").tolist()


def pack_steps(steps: Sequence[tuple[int, float]], max_steps: int
               ) -> tuple[np.ndarray, np.ndarray, int]:
  """Steps (token end, reward), sorted by end, in `max_steps` slots: (rewards [S] float32,
  NaN-padded; ends [S] int32, -1-padded; how many steps were merged into the last slot)."""
  rewards = np.full((max_steps,), np.nan, np.float32)
  ends = np.full((max_steps,), -1, np.int32)
  kept = list(steps[:max_steps])
  if len(steps) > max_steps:
    tail = np.asarray([reward for _, reward in steps[max_steps - 1:]], np.float32)
    kept[-1] = (steps[-1][0], np.nan if np.all(np.isnan(tail)) else np.nanmin(tail))
  for slot, (end, reward) in enumerate(kept):
    ends[slot], rewards[slot] = end, reward
  return rewards, ends, max(0, len(steps) - max_steps)


class StepScorer:
  """Scores the steps of a batch of decoded completions into StepArrays.

  `scorer(prompts [R], completions [R], columns, tokens [R, N], mask [R, N], outcome
  [R])` -> StepArrays with S = max_steps slots: prompts, completions and columns as for
  `rewards.compute` (completions decoded from tokens and mask by
  `data.decode_completions` with the same eos_token_ids), outcome the outcome total
  (`rewards.compute(...).total`), used when the spec lists "outcome". `seconds`
  accumulates the wall time spent, to be logged with the outcome rewards' time.
  """

  def __init__(self, tokenizer, specs: rewards_lib.StepSpecs, *, max_steps: int,
               timeout_s: float = 10.0, eos_token_ids: Sequence[int] = ()):
    if specs.outcome_weight and specs.functions and max_steps < 2:
      raise UserError(f"grpo.max_steps_per_completion={max_steps} leaves no slot for "
                      "step rewards beside the outcome step; allowed: >= 2 when "
                      "step_rewards lists outcome and step functions")
    self.tokenizer = tokenizer
    self.specs = specs
    self.max_steps = max_steps
    self.timeout_s = timeout_s
    self.eos_token_ids = tuple(eos_token_ids)
    self.seconds = 0.0

  def __call__(self, prompts: Sequence[str], completions: Sequence[str],
               columns: dict[str, Any], tokens: np.ndarray, mask: np.ndarray,
               outcome: np.ndarray) -> StepArrays:
    start = time.perf_counter()
    try:
      return self._score(prompts, completions, columns, tokens, mask, outcome)
    finally:
      self.seconds += time.perf_counter() - start

  def _score(self, prompts, completions, columns, tokens, mask, outcome) -> StepArrays:
    result = rewards_lib.compute_steps(self.specs.functions, prompts, completions, columns,
                                       timeout_s=self.timeout_s)
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    positions = data_lib.text_positions(self.tokenizer, tokens, mask,
                                        eos_token_ids=self.eos_token_ids)
    with_outcome = bool(self.specs.outcome_weight)
    slots = self.max_steps - with_outcome
    rows = []
    for i, steps in enumerate(result.steps):
      steps = steps or []
      kept = token_ends(self.tokenizer, tokens[i, positions[i]], completions[i],
                        [end for end, _ in steps])
      token_steps = [(int(positions[i][k]), reward) for k, (_, reward) in zip(kept, steps)]
      rewards, ends, truncated = pack_steps(token_steps, slots)
      if with_outcome:  # after the kept steps; no step for a completion without tokens
        last = np.flatnonzero(mask[i])
        slot = int(np.sum(ends >= 0))
        rewards = np.insert(rewards, slot, self.specs.outcome_weight * outcome[i]
                            if last.size else np.nan)
        ends = np.insert(ends, slot, last[-1] if last.size else -1)
      rows.append((rewards, ends, truncated))
    return StepArrays(
        rewards=np.stack([r for r, _, _ in rows]).astype(np.float32),
        ends=np.stack([e for _, e, _ in rows]).astype(np.int32),
        num_truncated=np.asarray([t for _, _, t in rows], np.int32),
        num_failed=result.num_failed)
