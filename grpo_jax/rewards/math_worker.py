"""math-verify in child processes, so that a runaway check can be killed.

math-verify's own timeouts use signal.alarm, which works only on the main thread, and no
timeout inside this process can stop a check stuck in C code: `9^{9^{9^9}}` makes sympy
compute a huge integer power while holding the GIL, which freezes every thread. So the
checks run in a pool of child processes (`serve`) that each read one JSON request per
line on stdin and answer one JSON line on stdout; a child that does not answer within
the time limit is killed and a fresh one is started for the next check. A child that dies
while checking (killed from outside, or crashed by what it was given) costs that one
check, which scores NaN and counts as a reward failure; the next check starts a fresh
one, and a dead child is always waited for (no zombie). Children exit when their stdin
closes, that is with this process.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import select
import subprocess
import sys
import threading
import time

from grpo_jax.rewards import runner

_LOG = logging.getLogger(__name__)
_READY = b"ready"
STARTUP_TIMEOUT_S = 120.0


class CheckTimeout(Exception):
  """A check did not finish in time; its child process was killed."""


class WorkerDied(Exception):
  """The child process ended while checking; a fresh one is started next time."""


class _Worker:
  """The parent's end of one child process; started on first use."""

  def __init__(self):
    self._proc: subprocess.Popen | None = None
    self._buf = b""

  def _start(self) -> None:
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, env.get("PYTHONPATH")) if p)
    self._proc = subprocess.Popen(
        [sys.executable, "-c", "from grpo_jax.rewards import math_worker; math_worker.serve()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    self._buf = b""
    try:
      line = self._read_line(STARTUP_TIMEOUT_S)
    except (CheckTimeout, WorkerDied) as e:
      raise RuntimeError(f"math-verify worker failed to start ({e!r})") from e
    if line != _READY:
      self.stop()
      raise RuntimeError(f"math-verify worker failed to start (said {line!r})")

  def reap(self) -> None:
    """Waits for the child if it has died (between checks, say), so no zombie stays."""
    if self._proc is not None and self._proc.poll() is not None:
      self.stop()

  def stop(self) -> None:
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      self._proc.stdin.close()
      self._proc.stdout.close()
      self._proc = None

  def _read_line(self, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    fd = self._proc.stdout.fileno()
    while b"\n" not in self._buf:
      remaining = deadline - time.monotonic()
      if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
        self.stop()
        raise CheckTimeout(f"no answer within {timeout_s:g} s")
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        self.stop()
        raise WorkerDied("math-verify worker exited")
      self._buf += chunk
    line, _, self._buf = self._buf.partition(b"\n")
    return line

  def check(self, gold: str, pred: str | None, timeout_s: float) -> float | None:
    """1.0 / 0.0 for `pred` against `gold`; None when `gold` does not parse."""
    if self._proc is None or self._proc.poll() is not None:
      self.stop()
      self._start()
    request = json.dumps({"gold": gold, "pred": pred}).encode() + b"\n"
    try:
      self._proc.stdin.write(request)
      self._proc.stdin.flush()
    except BrokenPipeError as e:
      self.stop()
      raise WorkerDied("math-verify worker exited") from e
    return json.loads(self._read_line(timeout_s))


_lost_checks = 0


def _log_lost_check(pred: str | None, error: Exception) -> None:
  """Warns about the first check that got no answer; logs the rest at debug."""
  global _lost_checks
  _lost_checks += 1
  level = logging.WARNING if _lost_checks == 1 else logging.DEBUG
  score = "NaN" if isinstance(error, WorkerDied) else "0"
  _LOG.log(level, "accuracy: answer %.80r scored %s: %s (%d so far; warned once)",
           pred, score, error, _lost_checks)


class Pool:
  """Child processes that check (gold, pred) pairs in parallel, one per parent thread."""

  def __init__(self, size: int):
    self.size = size
    self._idle: queue.Queue[_Worker] = queue.Queue()
    for _ in range(size):
      self._idle.put(_Worker())

  def check_all(self, pairs: list[tuple[str, str | None]],
                timeout_s: float) -> list[float | None]:
    """Checks every pair. One that times out scores 0.0 (its child is killed: so long a
    check means a hostile answer); one whose child dies scores NaN and is reported to the
    reward runner as a failure (runner.report_failures).

    A child that cannot start raises RuntimeError.
    """
    results: list[float | None] = [0.0] * len(pairs)
    died: list[int] = []
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(pairs)):
      todo.put(i)
    errors: list[BaseException] = []

    def drive() -> None:
      worker = self._idle.get()
      try:
        while True:
          try:
            i = todo.get_nowait()
          except queue.Empty:
            return
          try:
            results[i] = worker.check(*pairs[i], timeout_s)
          except CheckTimeout as e:
            _log_lost_check(pairs[i][1], e)
          except WorkerDied as e:
            results[i] = math.nan
            died.append(i)
            _log_lost_check(pairs[i][1], e)
      except BaseException as e:  # pylint: disable=broad-except
        errors.append(e)
      finally:
        self._idle.put(worker)

    threads = [threading.Thread(target=drive, daemon=True, name="math-verify")
               for _ in range(min(self.size, len(pairs)))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    self._reap_idle()
    if errors:
      raise errors[0]
    runner.report_failures(len(died))
    return results

  def close(self) -> None:
    """Stops the idle children (a later check starts fresh ones)."""
    self._each_idle(_Worker.stop)

  def _reap_idle(self) -> None:
    self._each_idle(_Worker.reap)

  def _each_idle(self, fn) -> None:
    idle = []
    while True:
      try:
        idle.append(self._idle.get_nowait())
      except queue.Empty:
        break
    for worker in idle:
      fn(worker)
      self._idle.put(worker)


_POOL: Pool | None = None
_POOL_LOCK = threading.Lock()


def pool() -> Pool:
  """The process-wide pool: up to 4 children, fewer on small machines."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = Pool(max(1, min(4, os.cpu_count() or 1)))
    return _POOL


def serve() -> None:
  """The child's loop: answer requests until stdin closes."""
  out = os.fdopen(os.dup(1), "wb", buffering=0)
  os.dup2(2, 1)  # Anything else printed goes to stderr, not into the answers.
  logging.basicConfig(level=logging.ERROR)
  import math_verify  # pylint: disable=import-outside-toplevel

  @functools.lru_cache(maxsize=1 << 12)
  def parse(text: str) -> list:
    return math_verify.parse(f"${text.strip().strip('$')}$", parsing_timeout=None)

  def check(gold: str, pred: str | None) -> float | None:
    gold_parsed = parse(gold)
    if not gold_parsed:
      return None
    if pred is None:
      return 0.0
    return float(math_verify.verify(gold_parsed, parse(pred), timeout_seconds=None))

  out.write(_READY + b"\n")
  for line in sys.stdin.buffer:
    request = json.loads(line)
    try:
      answer = check(request["gold"], request["pred"])
    except Exception:  # pylint: disable=broad-except
      answer = 0.0
    out.write(json.dumps(answer).encode() + b"\n")
