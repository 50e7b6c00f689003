"""When a process of a multi-process run is lost, the others stop with one line.

A process waiting in a collective for a peer that died may wait a long time: jax's
coordination service (which process 0 hosts) ends the others only after its heartbeat
timeout, with a long log, and a collective on CPU fails with a traceback at once. So
while `watch(timeout_s)` runs, every process publishes a beat in the service's key-value
store every timeout_s / 6 seconds and reads the others'. A process whose beat has not
changed for timeout_s (mesh.process_timeout_s) is lost; this process then prints

  error: process 1 of 2 (host-b) was lost: no heartbeat for 60 s (mesh.process_timeout_s); ...

and exits with EXIT_CODE. jax's heartbeat timeout is set to twice timeout_s
(`heartbeat_timeout_s`), so that this line comes first. Only the loss of process 0 is
reported by jax itself, at once and in its own words: its service goes with it.

A process that leaves the block normally publishes "done" and is no longer watched; one
that leaves it with an error publishes "failed", and the others stop at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator

import jax
from jax._src import distributed  # the coordination service's client (Orbax uses it too)

from grpo_jax.errors import UserError

EXIT_CODE = 1
_KEY = "grpo_jax/liveness/{}"
_DONE, _FAILED = "done", "failed"


def heartbeat_timeout_s(config: Any) -> int | None:
  """jax's heartbeat timeout for `config` (a ConfigDict, read before freeze): twice
  mesh.process_timeout_s; None (jax's default) for a value freeze will reject."""
  try:
    value = float(config.mesh.process_timeout_s)
  except (AttributeError, KeyError, TypeError, ValueError):
    return None
  return math.ceil(2 * value) if value >= 1 else None


class _Watchdog:
  """Publishes this process's beat and watches the others' (see the module docstring)."""

  def __init__(self, client, timeout_s: float):
    self.client = client
    self.timeout_s = timeout_s
    self.interval_s = timeout_s / 6
    self.me, self.count = jax.process_index(), jax.process_count()
    self.host = socket.gethostname()
    self.stopped = threading.Event()
    self.quiet = threading.Event()  # set once this process fails on its own account
    self._thread = threading.Thread(target=self._run, daemon=True, name="liveness")

  def start(self) -> None:
    self._publish("0")
    self._thread.start()

  def finish(self, state: str) -> None:
    """Publishes `state` (done / failed) and stops beating."""
    if state == _FAILED:
      self.quiet.set()
    self.stopped.set()
    self._thread.join()
    self._publish(state)

  def _publish(self, value: str) -> None:
    try:
      self.client.key_value_set(_KEY.format(self.me), f"{value} {self.host}",
                                allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # the service is gone with process 0; jax ends this process itself

  def _run(self) -> None:
    peers = [p for p in range(self.count) if p != self.me]
    start = time.monotonic()
    seen: dict[int, tuple[str | None, float]] = {p: (None, start) for p in peers}
    beat = 0
    while not self.stopped.wait(self.interval_s):
      beat += 1
      self._publish(str(beat))
      now = time.monotonic()
      for p in peers:
        try:
          value = self.client.key_value_try_get(_KEY.format(p))
        except Exception:  # pylint: disable=broad-except
          value = seen[p][0]  # not published yet, or the service did not answer
        if value != seen[p][0]:
          seen[p] = (value, now)
        state, _, host = (value or "").partition(" ")
        if state == _FAILED:
          self._stop_run(p, host, "stopped with an error (its own log says which)")
        elif state != _DONE and now - seen[p][1] > self.timeout_s:
          self._stop_run(p, host, f"was lost: no heartbeat for {self.timeout_s:g} s "
                         "(mesh.process_timeout_s)")

  def _stop_run(self, peer: int, host: str, what: str) -> None:
    if self.quiet.is_set():
      return
    where = f" ({host})" if host else ""
    print(f"error: process {peer} of {self.count}{where} {what}; process {self.me} stops too. "
          "Run every process again to resume from the newest checkpoint",
          file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)  # pylint: disable=protected-access


@contextlib.contextmanager
def watch(timeout_s: float) -> Iterator[None]:
  """Watches the other processes while the block runs; nothing in a one-process run.

  An error other than a UserError raised in the block waits up to timeout_s first: when a
  peer was lost (a collective failing because its peer died), the one line above ends the
  process instead of a traceback.
  """
  client = distributed.global_state.client
  if jax.process_count() == 1 or client is None:
    yield
    return
  dog = _Watchdog(client, timeout_s)
  dog.start()
  try:
    yield
  except Exception as e:
    if not isinstance(e, UserError):
      time.sleep(timeout_s + 2 * dog.interval_s)  # the watchdog exits if a peer was lost
    dog.finish(_FAILED)
    raise
  except BaseException:
    dog.finish(_FAILED)
    raise
  dog.finish(_DONE)
