"""Orbax checkpoints: `workdir/checkpoints/<step>/` holding the train state and a JSON meta.

Each step is written to `<step>.orbax-checkpoint-tmp-*` and renamed when complete (on
GCS a commit marker plays that part), so a half-written step is never listed or
restored. Every process calls every method; Orbax coordinates the hosts and writes
the JSON meta from the primary process only. An async save returns once the arrays
are copied to host memory, so the caller may donate or overwrite the state at once.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from grpo_jax.errors import UserError

_STATE, _META = "state", "meta"


class Checkpointer:
  """Saves and restores (state pytree, JSON meta) per step, keeping the newest `keep`."""

  def __init__(self, directory: str | os.PathLike, *, keep: int,
               every_steps: int = 0, async_save: bool = True):
    """`every_steps`: save() writes steps that are multiples of it (0: only forced)."""
    directory = os.fspath(directory)
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=(_STATE, _META),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True))

  def all_steps(self) -> list[int]:
    """The complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint, or None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves `state` and `meta` as `step` when due (or `force`); returns whether it did.

    A step that is already saved is not written again.
    """
    due = force or (self.every_steps > 0 and step % self.every_steps == 0)
    if not due or step in self._manager.all_steps():
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _META: ocp.args.JsonSave(meta)}),
        force=True)

  def restore(self, abstract_state: Any, *,
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta) of `step` (default: the newest).

    `abstract_state` is the state's pytree of jax.ShapeDtypeStruct with shardings
    (e.g. from jax.eval_shape); the arrays land directly in those shardings.
    """
    self.wait()
    steps = self.all_steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      raise UserError(f"no complete checkpoint for step {step} in {self.directory}; "
                      f"available steps: {steps or 'none'}")
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract_state),
            _META: ocp.args.JsonRestore()}))
    return restored[_STATE], dict(restored[_META])

  def delete_all(self) -> None:
    """Deletes every checkpoint of this directory (call it on every process)."""
    self.wait()
    for step in self.all_steps():
      self._manager.delete(step)

  def wait(self) -> None:
    """Blocks until an async save has finished writing."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.close()
