"""User-facing errors: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
  """A mistake in the user's input (config value, file, row) rather than a bug.

  The message names the problem and what is allowed, on one line.
  """


def exit_on_user_error(fn: F) -> F:
  """Wraps an entry point: a UserError prints `error: <message>` and exits 2.

  With --debug on the command line (or GRPO_JAX_DEBUG=1) the traceback is kept.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      if "--debug" in sys.argv or os.environ.get("GRPO_JAX_DEBUG") == "1":
        raise
      msg = " ".join(str(e).split())
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(2)

  return wrapper  # type: ignore[return-value]

