"""Orbax checkpoints: `workdir/checkpoints/<step>/` holding the train state and a JSON meta.

Each step is written to `<step>.orbax-checkpoint-tmp-*` and renamed when complete (on
GCS a commit marker plays that part), so a half-written step is never listed or
restored. Every process calls every method; Orbax coordinates the hosts and writes
the JSON meta from the primary process only. An async save returns once the arrays
are copied to host memory, so the caller may donate or overwrite the state at once.

Damage found on restore: the meta carries the fingerprint of every array (fingerprint.py)
and a SHA-256 of itself, because Orbax reads a flipped bit back without complaint (it
does fail on a truncated or missing file). `restore_newest_good` moves a checkpoint that
fails to read or to verify aside to `<step>.corrupt` (never deletes it) and falls back to
the next newest. A save first checks that the directory takes a file and has room for the
arrays; a full or read-only disk is a UserError naming the directory and the bytes needed,
and the checkpoints already written stay as they were.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging as std_logging
import os
import shutil
import socket
import sys
import traceback
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from grpo_jax import fingerprint
from grpo_jax.errors import UserError

_STATE, _META = "state", "meta"
_FINGERPRINTS, _SHA256 = "_array_fingerprints", "_sha256"  # meta keys this module adds
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# How the errors above read once TensorStore or a background thread has turned them to text.
_STORAGE_WORDS = tuple(os.strerror(n) for n in _STORAGE_ERRNOS)


class Unreadable(Exception):
  """A checkpoint that cannot be read back as it was written."""


class Checkpointer:
  """Saves and restores (state pytree, JSON meta) per step, keeping the newest `keep`."""

  def __init__(self, directory: str | os.PathLike, *, keep: int,
               every_steps: int = 0, async_save: bool = True):
    """`every_steps`: save() writes steps that are multiples of it (0: only forced)."""
    directory = os.fspath(directory)
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.every_steps = every_steps
    self._pending: tuple[int, int] | None = None  # (step, bytes) of a save still writing
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

    A step that is already saved is not written again. A directory that takes no file or
    has less room than the arrays need, or a write that fails for want of room or
    permission (here or, for an async save, at the next save or wait()), raises UserError;
    the checkpoints saved before stay complete.
    """
    due = force or (self.every_steps > 0 and step % self.every_steps == 0)
    if not due or step in self._manager.all_steps():
      return False
    self.wait()  # Orbax would wait too; so a failure of the last save is reported as its own
    needed = sum(x.nbytes for x in jax.tree.leaves(state))
    self._check_room(step, needed)
    sealed = _seal(meta, fingerprint.of_tree(state))
    with self._storage_errors(step, needed):
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardSave(state),
              _META: ocp.args.JsonSave(sealed)}),
          force=True)
    self._pending = (step, needed)
    return saved

  def restore(self, like: Any, *, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta) of `step` (default: the newest).

    `like` is a pytree of arrays or jax.ShapeDtypeStruct with shardings (e.g. the freshly
    initialised state, or jax.eval_shape of it); the restored arrays take its shapes, dtypes
    and shardings, whatever mesh the checkpoint was written from. A checkpoint that does
    not read back as it was written is a UserError.
    """
    self.wait()
    steps = self.all_steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      raise UserError(f"no complete checkpoint for step {step} in {self.directory}; "
                      f"available steps: {steps or 'none'}")
    try:
      return self._read(like, step)
    except Unreadable as e:
      raise UserError(f"checkpoint {self.directory}/{step} is unreadable: {e}") from None

  def restore_newest_good(self, like: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest checkpoint that reads back as it was written;
    None when there is no checkpoint. `like` as for restore().

    Newer ones that fail are moved aside to `<step>.corrupt` (one warning names them and
    the step resumed from). When none reads back, nothing is moved and UserError is raised.
    """
    self.wait()
    bad: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        state, meta = self._read(like, step)
      except Unreadable as e:
        bad.append((step, str(e)))
        continue
      if bad:
        self._set_aside(bad, step)
      return step, state, meta
    if bad:
      steps = ", ".join(str(s) for s, _ in bad)
      raise UserError(
          f"no checkpoint in {self.directory} reads back as written (steps {steps}; "
          f"step {bad[0][0]}: {bad[0][1]}); nothing was moved: move them out of the way to "
          "start this run over, or put back a copy")
    return None

  def _read(self, like: Any, step: int) -> tuple[Any, dict[str, Any]]:
    """Restores and verifies `step` on every process; raises Unreadable (on every process)."""
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    problem, state, meta, saved = "", None, {}, None
    _drop_leftover_reports()  # before the read: TensorStore may report as soon as it fails
    try:
      self._check_layout(step, abstract_state)
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardRestore(abstract_state),
              _META: ocp.args.JsonRestore()}))
      state = restored[_STATE]
      meta, saved = _unseal(dict(restored[_META]))
    except (UserError, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      if "out of memory" in str(e).lower():
        raise
      problem = _one_line(e)
    if not _everywhere(not problem):
      raise Unreadable(problem or "another process could not read its part")
    wrong = fingerprint.mismatches(saved, state) if saved else []
    if wrong:
      more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
      raise Unreadable(f"array {wrong[0]}{more} differs from what was saved")
    return state, meta

  def _set_aside(self, bad: list[tuple[int, str]], resumed: int) -> None:
    """Renames the checkpoints of `bad` to `<step>.corrupt` and warns once."""
    moved = []
    if jax.process_index() == 0:
      for step, _ in bad:
        src = epath.Path(self.directory) / str(step)
        dst, n = src.parent / f"{step}.corrupt", 0
        while dst.exists():
          n += 1
          dst = src.parent / f"{step}.corrupt.{n}"
        src.rename(dst)
        moved.append(dst.name)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("grpo_jax.checkpoint.set_aside")
    self._manager.reload()
    if moved:
      steps = ", ".join(str(s) for s, _ in bad)
      why = "; ".join(f"{s}: {reason}" for s, reason in bad) if len(bad) > 1 else bad[0][1]
      logging.warning("checkpoint%s %s in %s %s not read back as written (%s); moved aside to "
                      "%s; resuming from step %d", "s" if len(bad) > 1 else "", steps,
                      self.directory, "do" if len(bad) > 1 else "does", why, ", ".join(moved),
                      resumed)

  def _check_room(self, step: int, needed: int) -> None:
    """Raises UserError (on every process) unless the directory takes a file and has
    `needed` bytes free. Paths with a scheme (gs://) are not checked."""
    problem = ""
    if "://" not in self.directory:
      reason = _unwritable(self.directory)
      if not reason and shutil.disk_usage(self.directory).free < needed:
        reason = "not enough free space"
      if reason:
        problem = self._cannot_write(step, needed, reason)
    if not _everywhere(not problem):
      raise UserError(problem or f"another process cannot write checkpoint {step} to "
                      f"{self.directory} (its log says why)")

  @contextlib.contextmanager
  def _storage_errors(self, step: int | None, needed: int):
    """Turns a write that failed for want of room or permission into a UserError."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      problem = _storage_problem(e)
      if step is None or not problem:
        raise
      if "://" not in self.directory and jax.process_index() == 0:
        for partial in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
          shutil.rmtree(partial, ignore_errors=True)
      self._manager.reload()
      raise UserError(self._cannot_write(step, needed, problem)) from None

  def _cannot_write(self, step: int, needed: int, reason: str) -> str:
    free = ""
    if "://" not in self.directory and os.path.isdir(self.directory):
      free = f", {shutil.disk_usage(self.directory).free} are free"
    return (f"cannot write checkpoint {step} to {self.directory}: {reason}; it needs about "
            f"{needed} bytes{free}. The checkpoints written before it are complete (newest: "
            f"step {self._manager.latest_step()}): make room or make the directory writable, "
            "then run the same command again to resume")

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
    if problems and _layer_layout(saved) != _layer_layout(wanted):
      problems.insert(0, f"its layers are stored {_layer_layout(saved)}")
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
    """Blocks until an async save has finished writing (UserError if it could not)."""
    pending, self._pending = self._pending, None
    with self._storage_errors(*(pending or (None, 0))):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self.wait()
    self._manager.close()


def check_writable(directory: str, what: str) -> None:
  """Raises UserError unless `directory` exists (or can be made) and takes a new file.

  `what` names it for the user (e.g. "--workdir"). Paths with a scheme are not checked.
  """
  if "://" in directory:
    return
  reason = _unwritable(directory)
  if reason:
    raise UserError(f"{what}={directory} is not writable ({reason}); give a directory this "
                    "user can write to, on a disk with room for the checkpoints")


def _unwritable(directory: str) -> str:
  """Why `directory` cannot be made or take a one-byte file; "" when it can."""
  probe = os.path.join(directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"\0")
    os.remove(probe)
  except OSError as e:
    return e.strerror or str(e)
  return ""


def _drop_leftover_reports() -> None:
  """From now on, drops what Python reports about the leftovers of a failed Orbax read (once
  installed, for the rest of the process): the read's abandoned coroutines, whose finalisers
  print their exception and "Event loop is closed" tracebacks by the dozen when they are
  collected, and TensorStore completing one of them later from its own thread, which reports
  the closed loop through sys.excepthook, and asyncio logging the read's tasks whose exception
  nobody retrieved. They say nothing the error line does not. Installed
  before every read, not after a failed one: TensorStore's threads can report between the
  read failing and the caller catching the error (a CI run printed two such tracebacks)."""
  if getattr(sys.excepthook, "drops_leftovers", False):
    return
  unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook

  def unraisablehook(unraisable):
    if not (_from_orbax(unraisable.object) or _closed_loop(unraisable.exc_value)):
      unraisable_hook(unraisable)

  def excepthook(kind, value, tb):
    if not _closed_loop(value):
      except_hook(kind, value, tb)

  excepthook.drops_leftovers = True
  sys.unraisablehook, sys.excepthook = unraisablehook, excepthook
  std_logging.getLogger("asyncio").addFilter(_not_an_orbax_task)


def _not_an_orbax_task(record: std_logging.LogRecord) -> bool:
  """False for asyncio's "... exception was never retrieved" about a task or gathering future
  of an abandoned Orbax read (logged when it is collected, often after the run's error line)."""
  if "exception was never retrieved" not in record.getMessage().split("\n", 1)[0]:
    return True
  orbax = f"{os.sep}orbax{os.sep}"
  if orbax in record.getMessage():
    return False
  error = record.exc_info[1] if record.exc_info else None
  return not (error is not None and orbax in "".join(traceback.format_exception(error)))


def _from_orbax(obj: Any) -> bool:
  code = getattr(obj, "cr_code", None)  # a coroutine's
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _closed_loop(e: BaseException | None) -> bool:
  return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective in multi-process runs)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _digest(meta: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _seal(meta: dict[str, Any], fingerprints: dict[str, str]) -> dict[str, Any]:
  """meta plus the arrays' fingerprints plus a SHA-256 of both."""
  body = {**meta, _FINGERPRINTS: fingerprints}
  return {**body, _SHA256: _digest(body)}


def _unseal(saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str] | None]:
  """(meta, fingerprints) of a sealed meta; raises Unreadable when its SHA-256 differs.
  Checkpoints written before sealing existed have neither and pass."""
  sha = saved.pop(_SHA256, None)
  if sha is not None and sha != _digest(saved):
    raise Unreadable("its meta does not match the SHA-256 saved with it")
  return saved, saved.pop(_FINGERPRINTS, None)


def _chain(e: BaseException) -> list[BaseException]:
  out = [e]
  while (e := e.__cause__ or e.__context__) is not None and e not in out:
    out.append(e)
  return out


def _storage_problem(e: BaseException) -> str:
  """The system's words when `e` is a write refused for want of room or permission; ""
  for any other error."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in _STORAGE_ERRNOS:
      return os.strerror(x.errno)
    words = [w for w in _STORAGE_WORDS if w in str(x)]
    if words:
      return words[0]
  return ""


def _one_line(e: BaseException, limit: int = 240) -> str:
  """The innermost cause of `e`, on one line, at most `limit` characters."""
  inner = _chain(e)[-1]
  text = " ".join(str(inner).split()) or type(inner).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...] | None]:
  """Flat {path: shape} of a nested-dict tree of arrays (None for an empty node)."""
  return {k: (tuple(v.shape) if hasattr(v, "shape") else None)
          for k, v in ocp.tree.to_flat_dict(tree).items()}


def _layer_layout(shapes: dict[tuple[str, ...], Any]) -> str | None:
  """How a state's layers are stored, as model.scan_layers says; None without layers."""
  for k in shapes:
    if k[:2] == ("params", "layers") and len(k) > 2:
      return ("one by one (model.scan_layers=False)" if k[2].isdigit() else
              "stacked (model.scan_layers=True)")
  return None


def _name(path: tuple[str, ...]) -> str:
  return "/".join(p for p in path if p != "value")
