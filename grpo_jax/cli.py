"""Command-line plumbing shared by the entry points (main, sft, rejection_sample, bench).

Flags are defined only when a module runs as the program (`define_flags()` under
`__main__`), so entry points can import each other.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax.errors import exit_on_user_error


def define_flags(*, workdir: bool = True) -> None:
  """--config (configs/<name>.py[:arg], overridable by --config.<key>=value), --workdir, --debug."""
  config_flags.DEFINE_config_file("config", None, "Config file: configs/<name>.py[:arg].")
  if workdir:
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots.")
  flags.DEFINE_bool("debug", False, "Show Python tracebacks for user errors.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing: a bad flag, or a config file that rejects its argument (a UserError
  raised while --config is read), is one `error:` line and exit 2."""
  try:
    return exit_on_user_error(flags.FLAGS)(argv)
  except flags.Error as e:
    msg = " ".join(str(e).split())
    print(f"error: {msg}; see --helpfull for the allowed flags", file=sys.stderr)
    sys.exit(2)


def run_main(main: Callable[[list[str]], None]) -> None:
  """app.run with our flag parsing; library INFO logs (Orbax's) are hidden unless --debug."""

  def quiet_main(argv):
    if not flags.FLAGS.debug:
      logging.set_verbosity(logging.WARNING)
    main(argv)

  app.run(quiet_main, flags_parser=parse_flags)
