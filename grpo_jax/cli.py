"""Command-line plumbing shared by the entry points (main, sft, rejection_sample, bench).

Flags are defined only when a module runs as the program (`define_flags()` under
`__main__`), so entry points can import each other.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax import config as config_lib
from grpo_jax import hardware
from grpo_jax import host_malloc
from grpo_jax.errors import UserError, exit_on_user_error

_CONFIG_ARG = re.compile(r"^--?config(?:=(.*))?$")
_OVERRIDE_ARG = re.compile(r"^--?(?:no)?config\.([^=]+)")


def define_flags(*, workdir: bool = True) -> None:
  """--config (configs/<name>.py[:arg], overridable by --config.<key>=value), --workdir, --debug."""
  config_flags.DEFINE_config_file("config", None, "Config file: configs/<name>.py[:arg].")
  if workdir:
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots.")
  flags.DEFINE_bool("debug", False, "Show Python tracebacks for user errors.")


def _check_config_args(argv: list[str]) -> None:
  """Raises UserError for a --config file that does not exist or an unknown --config.<key>.

  absl would defer the first to a traceback when the config is first read, and turn the
  second into a traceback while parsing.
  """
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":  # the end of the flags
      return
    config = _CONFIG_ARG.match(arg)
    if config:
      value = config.group(1) if config.group(1) is not None else (
          argv[i + 1] if i + 1 < len(argv) else "")
      path = value.split(":", 1)[0]
      if not os.path.isfile(path):
        raise UserError(f"--config={value}: config file {path!r} does not exist; give "
                        "configs/<name>.py, optionally with :<arg>")
    override = _OVERRIDE_ARG.match(arg)
    if override and not config_lib.is_key(override.group(1)):
      raise config_lib.unknown_key_error(override.group(1))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing: a bad flag, a missing config file, an unknown config key, or a config
  file that rejects its argument (a UserError raised while --config is read), is one
  `error:` line and exit 2."""

  def parse(argv: list[str]) -> list[str]:
    if "config" in flags.FLAGS:
      _check_config_args(argv)
    return flags.FLAGS(argv)

  try:
    return exit_on_user_error(parse)(argv)
  except flags.Error as e:
    msg = " ".join(str(e).split())
    print(f"error: {msg}; see --helpfull for the allowed flags", file=sys.stderr)
    sys.exit(2)


def run_main(main: Callable[[list[str]], None]) -> None:
  """app.run with our flag parsing; library INFO logs (Orbax's) are hidden unless --debug.

  First, before JAX starts a backend or its threads: the CPU where no accelerator is
  attached (hardware.default_to_cpu), and host malloc tuned (host_malloc.tune).
  """
  hardware.default_to_cpu()
  host_malloc.tune()

  def quiet_main(argv):
    if not flags.FLAGS.debug:
      logging.set_verbosity(logging.WARNING)
    main(argv)

  app.run(quiet_main, flags_parser=parse_flags)
