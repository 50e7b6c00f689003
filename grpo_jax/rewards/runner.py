"""Runs the reward functions on a batch of completions, each in its own thread.

Every function gets the whole batch and a shared deadline, `timeout_s` after the start.
A function that raises, misses the deadline or returns something other than one number
(or None) per completion gives NaN ("no score") for the completions concerned; the count
goes to `num_failed`, a warning is logged once per function and kind of failure, and the
run goes on. A `UserError` (a missing column, say) is re-raised: it will not fix itself.

A function that misses the deadline is abandoned: its thread is a daemon, so it never
keeps the process from exiting, and an exception is raised inside it to stop it; that
takes effect at its next Python bytecode, so a thread stuck in C code keeps running
until the C call returns, and whatever it returns then is dropped.

A function may also score most completions and report the others it could not score
(`report_failures`, e.g. when a checker process died): they count in `num_failed` too.

Step reward functions (process supervision, `compute_steps`) run under the same rules;
for each completion they return (end, reward) pairs or None, and a completion whose
pairs are malformed gets no steps from that function (counted in `num_failed`).

Works from any thread (no signals), e.g. a JAX host-callback thread.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
import numbers
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from grpo_jax.errors import UserError

_LOG = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()
_reported = threading.local()  # .count: failures the running function reported
_F32_MAX = float(np.finfo(np.float32).max)
_FAILED = object()  # what a function that raised or timed out returned


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """A reward function, the name it is logged under, and its weight in the total."""
  name: str
  fn: Callable[..., Sequence[Any]]
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class RewardResult:
  """total: [n] float32, the weighted sum over functions, skipping NaN (as TRL does);
  per_fn: name -> [n] float32, NaN where there is no score; num_failed: completions
  times functions that raised, timed out or returned a wrong value, plus the completions
  functions reported unscored (report_failures)."""
  total: np.ndarray
  per_fn: dict[str, np.ndarray]
  num_failed: int


@dataclasses.dataclass(frozen=True)
class StepResult:
  """steps: per completion, (end, reward) pairs sorted by end, the functions' weighted
  rewards summed at equal ends, or None when no function scored it; num_failed:
  completions times functions that raised, timed out or returned a wrong value."""
  steps: list[list[tuple[int, float]] | None]
  num_failed: int


class _Abandoned(BaseException):
  """Raised inside a reward thread that missed its deadline, to stop it."""


def report_failures(count: int) -> None:
  """Counts `count` completions the calling reward function could not score (it gives them
  NaN or None) in `num_failed`. Does nothing outside `compute`."""
  if hasattr(_reported, "count"):
    _reported.count += count


class _Call:
  """`fn()` running in a daemon thread."""

  def __init__(self, name: str, fn: Callable[[], Any]):
    self.done = threading.Event()
    self.value: Any = None
    self.error: BaseException | None = None
    self.reported = 0  # failures fn reported (report_failures)
    self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True,
                                    name=f"reward:{name}")
    self._thread.start()

  def _run(self, fn: Callable[[], Any]) -> None:
    _reported.count = 0
    try:
      self.value = fn()
      self.reported = _reported.count
    except _Abandoned:
      pass
    except BaseException as e:  # pylint: disable=broad-except
      self.error = e
    finally:
      self.done.set()

  def abandon(self) -> None:
    if self._thread.is_alive():
      ctypes.pythonapi.PyThreadState_SetAsyncExc(
          ctypes.c_ulong(self._thread.ident), ctypes.py_object(_Abandoned))


def _warn_once(name: str, kind: str, message: str) -> None:
  with _warned_lock:
    if (name, kind) in _warned:
      return
    _warned.add((name, kind))
  _LOG.warning("reward %r: %s (scores are NaN; warned once)", name, message)


def _score(v: Any) -> float | None:
  """v as a float32-representable number (NaN allowed); None when it is not one."""
  try:
    f = float(v) if isinstance(v, numbers.Real) else math.inf
  except OverflowError:
    return None
  return f if math.isnan(f) or abs(f) <= _F32_MAX else None


def _per_completion(name: str, value: Any, n: int) -> list | None:
  """What a function returned as a list of n, one item per completion; None (warned)
  when it is not a list of n."""
  if hasattr(value, "__array__"):
    value = np.asarray(value).tolist()
  if not isinstance(value, (list, tuple)) or len(value) != n:
    got = f"{len(value)} values" if isinstance(value, (list, tuple)) else type(value).__name__
    _warn_once(name, "length", f"returned {got} for {n} completions")
    return None
  return list(value)


def _scores(name: str, value: Any, n: int) -> tuple[np.ndarray, int]:
  """[n] float32 scores from what a function returned, and how many were unusable."""
  scores = np.full((n,), np.nan, np.float32)
  value = _per_completion(name, value, n)
  if value is None:
    return scores, n
  bad = 0
  for i, v in enumerate(value):
    if v is None:
      continue
    f = _score(v)
    if f is None:
      bad += 1
    else:
      scores[i] = f
  if bad:
    _warn_once(name, "value", "returned a value that is not a finite number or None")
  return scores, bad


def _steps(value: Any, text: str) -> list[tuple[int, float]]:
  """One completion's (end, reward) pairs sorted by end; raises TypeError or ValueError
  when `value` is not pairs of an int end in 1..len(text) and a number (or NaN)."""
  steps = []
  for pair in value:
    end, reward = pair
    if not isinstance(end, numbers.Integral) or isinstance(end, bool) or not (
        1 <= end <= len(text)):
      raise ValueError(f"step end {end!r}")
    score = _score(reward)
    if score is None:
      raise ValueError(f"step reward {reward!r}")
    steps.append((int(end), score))
  return sorted(steps, key=lambda step: step[0])


def _sum_or_nan(values: list[float]) -> float:
  """The sum of the values that are not NaN; NaN when all are."""
  kept = [v for v in values if not math.isnan(v)]
  return math.fsum(kept) if kept else math.nan


def _run(specs: Sequence[RewardSpec], prompts: Sequence[str], completions: Sequence[str],
         columns: dict[str, Any], timeout_s: float) -> list[Any]:
  """Calls every function on the batch, each in its own thread, under one deadline.

  Returns, per spec, (what it returned, or _FAILED (warned) when it raised or missed the
  deadline; the failures it reported). Re-raises a UserError.
  """
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
  if len({spec.name for spec in specs}) != len(specs):
    raise ValueError(f"reward names repeat: {[spec.name for spec in specs]}")
  calls = []
  for spec in specs:
    kwargs = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in columns.items()}
    calls.append(_Call(spec.name, functools.partial(
        spec.fn, list(prompts), list(completions), **kwargs)))
  deadline = time.monotonic() + timeout_s
  values = []
  for spec, call in zip(specs, calls):
    if not call.done.wait(max(0.0, deadline - time.monotonic())):
      call.abandon()
      _warn_once(spec.name, "timeout", f"did not finish within {timeout_s:g} s")
      values.append((_FAILED, 0))
    elif isinstance(call.error, UserError):
      raise call.error
    elif call.error is not None:
      _warn_once(spec.name, "raised", f"raised {call.error!r}")
      values.append((_FAILED, 0))
    else:
      values.append((call.value, call.reported))
  return values


def compute(specs: Sequence[RewardSpec], prompts: Sequence[str],
            completions: Sequence[str], columns: dict[str, Any], *,
            timeout_s: float = 10.0) -> RewardResult:
  """Scores n completions with every reward function; see the module docstring.

  columns: the dataset's other columns as lists of n, plus what the trainer adds
  (completion_lengths, max_completion_length); each function gets its own copies.
  """
  n = len(completions)
  per_fn: dict[str, np.ndarray] = {}
  num_failed = 0
  for spec, (value, reported) in zip(specs, _run(specs, prompts, completions, columns,
                                                 timeout_s)):
    if value is _FAILED:
      scores, failed = np.full((n,), np.nan, np.float32), n
    else:
      scores, failed = _scores(spec.name, value, n)
      failed = min(n, failed + reported)
    per_fn[spec.name] = scores
    num_failed += failed
  weights = np.asarray([spec.weight for spec in specs], np.float32)
  stacked = np.stack([per_fn[spec.name] for spec in specs], axis=1) if specs else (
      np.zeros((n, 0), np.float32))
  total = np.nansum(stacked * weights, axis=1).astype(np.float32)
  return RewardResult(total=total, per_fn=per_fn, num_failed=num_failed)


def compute_steps(specs: Sequence[RewardSpec], prompts: Sequence[str],
                  completions: Sequence[str], columns: dict[str, Any], *,
                  timeout_s: float = 10.0) -> StepResult:
  """Scores the steps of n completions with every step reward function (the module
  docstring's rules, per completion: a function whose list for a completion is not
  (int end in 1..len(completion), number) pairs gives it no steps, counted as failed).

  The functions' steps are merged by end: steps of any functions that end at the same
  character are one step whose reward is the sum of their weighted rewards, NaN ones
  skipped (NaN when all are). A completion no function scored gets None.
  """
  n = len(completions)
  merged: list[dict[int, list[float]] | None] = [None] * n
  num_failed = 0
  for spec, (value, reported) in zip(specs, _run(specs, prompts, completions, columns,
                                                 timeout_s)):
    value = None if value is _FAILED else _per_completion(spec.name, value, n)
    if value is None:
      num_failed += n
      continue
    num_failed += reported
    for i, (item, text) in enumerate(zip(value, completions)):
      if item is None:
        continue
      try:
        steps = _steps(item, text)
      except (TypeError, ValueError) as e:
        _warn_once(spec.name, "value", f"returned steps that are not (int end in "
                   f"1..len(completion), number) pairs ({e})")
        num_failed += 1
        continue
      if merged[i] is None:
        merged[i] = {}
      for end, reward in steps:
        merged[i].setdefault(end, []).append(spec.weight * reward)
  return StepResult(steps=[None if by_end is None else [
      (end, _sum_or_nan(rewards)) for end, rewards in sorted(by_end.items())]
                           for by_end in merged], num_failed=num_failed)
