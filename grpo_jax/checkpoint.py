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

import jax
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
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _META: ocp.JsonCheckpointHandler()},
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

  def restore(self, like: Any, *, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta) of `step` (default: the newest).

    `like` is a pytree of arrays or jax.ShapeDtypeStruct with shardings (e.g. the freshly
    initialised state, or jax.eval_shape of it); the restored arrays take its shapes, dtypes
    and shardings.
    """
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    self.wait()
    steps = self.all_steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      raise UserError(f"no complete checkpoint for step {step} in {self.directory}; "
                      f"available steps: {steps or 'none'}")
    self._check_layout(step, abstract_state)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract_state),
            _META: ocp.args.JsonRestore()}))
    return restored[_STATE], dict(restored[_META])

  def _check_layout(self, step: int, abstract_state: Any) -> None:
    """Raises a UserError when the saved arrays' names or shapes differ from the target's.

    That happens when a run resumes with another model shape or optimizer than it was
    saved with; Orbax would fail deep inside with a traceback. Dtypes may differ (the
    restore casts).
    """
    saved = _shapes(self._manager.item_metadata(step)[_STATE].tree)
    wanted = _shapes(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
    problems = []
    for k in sorted(saved.keys() | wanted.keys(), key=lambda k: (k[0] != "params", k)):
      if k not in wanted:
        problems.append(f"{_name(k)} is in the checkpoint but not in this config's state")
      elif k not in saved:
        problems.append(f"{_name(k)} is not in the checkpoint")
      elif wanted[k] != saved[k]:
        problems.append(f"{_name(k)} has shape {wanted[k]} here and {saved[k]} in the checkpoint")
    if problems:
      more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
      raise UserError(
          f"checkpoint {self.directory}/{step} was written with another model or optimizer "
          f"config: {problems[0]}{more}; resume with the config it was written with, or "
          "start in a new workdir")

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


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...] | None]:
  """Flat {path: shape} of a nested-dict tree of arrays (None for an empty node)."""
  return {k: (tuple(v.shape) if hasattr(v, "shape") else None)
          for k, v in ocp.tree.to_flat_dict(tree).items()}


def _name(path: tuple[str, ...]) -> str:
  return "/".join(p for p in path if p != "value")
