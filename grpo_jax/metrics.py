"""Metrics: `workdir/metrics.jsonl`, TensorBoard scalars, a terminal progress line, a plot.

metrics.jsonl holds one JSON object per line: {"step": int, "train/loss": float, ...}.
JSON has no NaN or infinity, so non-finite values are written as the strings "NaN",
"Infinity" and "-Infinity" (valid JSON for any reader); `read_metrics` turns them back
into floats.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "progress.png"
TB_DIR = "tb"
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _scalar(key: str, value: Any) -> int | float:
  """A metric value (Python, numpy or jax scalar of any dtype) as a Python int or float."""
  array = np.asarray(value)
  if array.size != 1 or array.dtype.kind in "OSUMm":
    raise TypeError(f"metric {key!r} is not a numeric scalar: {value!r}")
  array = array.reshape(())
  return int(array) if array.dtype.kind in "iu" else float(array)


def _to_json(value: int | float) -> int | float | str:
  if isinstance(value, float) and not math.isfinite(value):
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  return value


def _from_json(value: Any) -> Any:
  return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def check_finite(metrics: Mapping[str, Any]) -> list[str]:
  """Names of the metrics whose value is NaN or infinite."""
  return [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of workdir/metrics.jsonl in file order ([] when there is none).

  A last line without its newline (a write cut short by a crash) is left out.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  return [{k: _from_json(v) for k, v in json.loads(line).items()}
          for line in lines[:-1] if line.strip()]


class MetricsWriter:
  """Appends records to workdir/metrics.jsonl and, optionally, TensorBoard (workdir/tb).

  Pass enabled=(jax.process_index() == 0) so that one process writes; a disabled
  writer does nothing.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self.tensorboard = tensorboard
    self._file: TextIO | None = None
    self._tb = None
    if enabled:
      os.makedirs(self.workdir, exist_ok=True)
      self._open()

  def _open(self, purge_step: int | None = None) -> None:
    self._file = open(os.path.join(self.workdir, METRICS_FILE), "a", encoding="utf-8")
    if self.tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # Event files are named by the second they were opened in; the suffix keeps a
      # writer opened in the same second from overwriting (and sorts after) the last.
      self._tb = tensorboardX.SummaryWriter(os.path.join(self.workdir, TB_DIR),
                                            purge_step=purge_step,
                                            filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes {"step": step, **metrics}; values are numeric scalars of any kind."""
    if not self.enabled:
      return
    values = {k: _scalar(k, v) for k, v in metrics.items()}
    record = {"step": int(step), **{k: _to_json(v) for k, v in values.items()}}
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, global_step=int(step))
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops the records of steps after `step`, before a resumed run writes them again.

    metrics.jsonl is rewritten atomically (temporary file, then rename); TensorBoard
    is told to discard its events after `step` (a purge step in the event log).
    """
    self._keep_only(lambda r: r["step"] <= step, purge_step=step + 1)

  def keep_sft_records_upto(self, sft_step: int) -> None:
    """Drops every record but the SFT records of steps up to `sft_step`, before SFT resumed
    from that step (0: a fresh start) writes the rest; TensorBoard discards everything."""
    self._keep_only(lambda r: r.get("sft/step", sft_step + 1) <= sft_step, purge_step=0)

  def _keep_only(self, keep: Callable[[dict[str, Any]], bool], purge_step: int) -> None:
    if not self.enabled:
      return
    self._close_files()
    path = os.path.join(self.workdir, METRICS_FILE)
    kept = [r for r in read_metrics(self.workdir) if keep(r)]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in kept:
        f.write(json.dumps({k: _to_json(v) for k, v in r.items()}, allow_nan=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    self._open(purge_step=purge_step)

  def _close_files(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def close(self) -> None:
    self._close_files()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Prints `step/total` with reward, KL, step time and ETA, at most every `every_s` s.

  One plain line per print, so logs and pipes (no TTY) read well. The first and the
  last step are always printed. ETA extrapolates the wall time per step since the
  first update, evaluation and checkpointing included.
  """

  def __init__(self, total_steps: int, *, every_s: float = 10.0, enabled: bool = True,
               title: str = "step", stream: TextIO | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.total_steps = total_steps
    self.every_s = every_s
    self.enabled = enabled
    self.title = title
    self._stream = stream
    self._clock = clock
    self._start: tuple[int, float] | None = None
    self._last_print = -math.inf

  def update(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    now = self._clock()
    if self._start is None:
      self._start = (step, now)
    if now - self._last_print < self.every_s and step not in (self._start[0],
                                                              self.total_steps):
      return
    self._last_print = now
    parts = [f"{self.title} {step}/{self.total_steps}"]
    for key, label in (("rl/reward_mean", "reward"), ("rl/kl", "kl"),
                       ("train/loss", "loss"), ("sft/loss", "loss"),
                       ("eval/pass@1", "pass@1")):
      if key in metrics:
        parts.append(f"{label} {float(metrics[key]):.4g}")
    if "perf/step_s" in metrics:
      parts.append(f"{float(metrics['perf/step_s']):.2f} s/step")
    first_step, first_time = self._start
    if step > first_step:
      per_step = (now - first_time) / (step - first_step)
      parts.append(f"eta {_duration(per_step * max(self.total_steps - step, 0))}")
    print(" | ".join(parts), file=self._stream or sys.stdout, flush=True)


def plot(workdir: str | os.PathLike) -> str:
  """Writes workdir/progress.png: rl/reward_mean and eval/pass@1 (and maj@k) by step."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  records = read_metrics(workdir)

  def series(key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]

  fig = Figure(figsize=(10, 4), layout="constrained")
  FigureCanvasAgg(fig)
  train_ax, eval_ax = fig.subplots(1, 2)
  train_ax.plot(*series("rl/reward_mean"), label="rl/reward_mean")
  train_ax.set(title="training reward", xlabel="step", ylabel="mean reward")
  eval_keys = ["eval/pass@1"] + sorted({k for r in records for k in r
                                        if k.startswith("eval/maj@")})
  for key in eval_keys:
    eval_ax.plot(*series(key), marker="o", label=key)
  eval_ax.set(title="held-out evaluation", xlabel="step", ylabel="accuracy")
  for ax in (train_ax, eval_ax):
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
  path = os.path.join(os.fspath(workdir), PLOT_FILE)
  fig.savefig(path, dpi=100)
  return path
