"""SIGTERM and SIGINT (preemption, Ctrl-C) as a flag the training loops check after each step."""

from __future__ import annotations

import signal

from absl import logging


class StopRequest:
  """Turns SIGTERM / SIGINT into `requested`; a second signal stops at once."""

  def __init__(self):
    self.requested = False
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # a second signal: stop now
      raise KeyboardInterrupt
    logging.warning("signal %d: finishing this step, checkpointing, then exiting", signum)
    self.requested = True
