"""A deterministic, resumable stream of prompt batches with per-epoch shuffling."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from grpo_jax.errors import UserError


class PromptStream:
  """Batches of rows (any items: row dicts, row ids); epoch e visits permutation(seed, e).

  Position (epoch, index) is the whole state: a stream restored from state() yields the
  same batches as one that was never stopped. A batch that runs past the end of an epoch
  continues with the next epoch's order. shard(i, n) yields rows i::n of each global
  batch, for the host i of n; all hosts hold the same state.
  """

  def __init__(self, rows: Sequence[Any], batch_size: int, seed: int, *,
               shard_index: int = 0, shard_count: int = 1):
    if not rows:
      raise UserError("the prompt stream has no rows; the data source is empty")
    if batch_size < 1 or batch_size % shard_count:
      raise UserError(f"batch size {batch_size} must be positive and divisible by the"
                      f" number of processes ({shard_count})")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard index {shard_index} not in [0, {shard_count})")
    self.rows = rows
    self.batch_size = batch_size
    self.seed = seed
    self.shard_index = shard_index
    self.shard_count = shard_count
    self._epoch = 0
    self._index = 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

  def next(self) -> list[Any]:
    """The next batch: batch_size // shard_count rows (this shard's share)."""
    picked = []
    for _ in range(self.batch_size):
      picked.append(self.rows[self._order[self._index]])
      self._index += 1
      if self._index == len(self.rows):
        self._epoch, self._index = self._epoch + 1, 0
        self._order = self._permutation(self._epoch)
    return picked[self.shard_index::self.shard_count]

  __next__ = next

  def __iter__(self) -> PromptStream:
    return self

  def state(self) -> dict:
    """JSON-able position: {"epoch", "index", "num_rows"}."""
    return {"epoch": self._epoch, "index": self._index, "num_rows": len(self.rows)}

  def restore(self, state: dict) -> None:
    """Moves to a position saved by state()."""
    if state["num_rows"] != len(self.rows):
      raise UserError(f"the data has {len(self.rows)} rows but the checkpoint was taken with"
                      f" {state['num_rows']}; resume with the same data.source")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._order = self._permutation(self._epoch)

  def shard(self, index: int, count: int) -> PromptStream:
    """A stream at the same position yielding rows index::count of each global batch."""
    stream = PromptStream(self.rows, self.batch_size, self.seed,
                          shard_index=index, shard_count=count)
    stream.restore(self.state())
    return stream
