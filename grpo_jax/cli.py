"""Command-line plumbing shared by the entry points (main, sft, rejection_sample, bench).

Flags are defined only when a module runs as the program (`define_flags()` under
`__main__`), so entry points can import each other.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import re
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax import config as config_lib
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


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
TUNE_MALLOC_ENV = "GRPO_JAX_TUNE_MALLOC"


# Attached accelerators, as the kernel shows them: Google's PCI vendor id with the device id
# of a TPU chip (v2/v3, v4, v5p, v5e, v6e, TPU7x); the device nodes of TPU drivers (accel,
# vfio), of NVIDIA's driver (and WSL's) and of AMD's KFD.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
_DEVICE_FILES = ("dev/accel[0-9]*", "dev/vfio/[0-9]*", "dev/nvidia[0-9]*", "dev/nvidiactl",
                 "dev/dxg", "dev/kfd")


def _has_accelerator(root: str = "/") -> bool:
  """Whether a TPU chip or a GPU is attached (read from /sys and /dev; starts no backend)."""
  if any(glob.glob(os.path.join(root, pattern)) for pattern in _DEVICE_FILES):
    return True
  for device in glob.glob(os.path.join(root, "sys/bus/pci/devices/*")):
    try:
      with open(os.path.join(device, "vendor")) as v, open(os.path.join(device, "device")) as d:
        if v.read().strip() == _GOOGLE_PCI_VENDOR and d.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return False


def _jax_is_cpu_only() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator is attached.

  Decided from the hardware, not from the installed packages: libtpu and the CUDA plugin
  (the aot extra) compile for accelerators on CPU-only hosts.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  return not _has_accelerator()


def default_to_cpu() -> bool:
  """Runs JAX on the CPU where no accelerator is attached and JAX_PLATFORMS is unset.

  JAX would otherwise start every accelerator package installed (libtpu and the CUDA plugin,
  which the aot extra brings for compiling ahead of time) and print their failures to find a
  device. Returns whether it chose the CPU; call it before JAX starts a backend.
  """
  if os.environ.get("JAX_PLATFORMS", "").strip() or _has_accelerator():
    return False
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  return True


def tune_host_malloc() -> bool:
  """Keeps the memory XLA CPU frees inside the process; returns whether it did.

  XLA CPU allocates a call's temporaries afresh each time, and glibc gives large freed
  blocks back to the kernel (munmap, or dropping a thread's heap), so every GRPO step
  faults its temporaries in again page by page: 71,600 faults (280 MB) per step on the
  TRL comparison model, whose update runs a fifth to a half faster without them. One malloc
  arena that never maps or trims makes them reusable (sampling, which never faulted, is
  0-20% slower with it: BENCHMARKS.md "Host malloc"). Only on Linux with glibc, only
  when JAX runs on the CPU (accelerators keep their temporaries on the device), and not
  when GRPO_JAX_TUNE_MALLOC=0. Call it before JAX's first computation: threads started
  earlier keep their own arenas.
  """
  if os.environ.get(TUNE_MALLOC_ENV, "1") == "0":
    return False
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  if not _jax_is_cpu_only():
    return False
  libc = ctypes.CDLL(None)
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def run_main(main: Callable[[list[str]], None]) -> None:
  """app.run with our flag parsing; library INFO logs (Orbax's) are hidden unless --debug.

  First, before JAX starts a backend or its threads: the CPU where no accelerator is
  attached (default_to_cpu), and host malloc tuned (tune_host_malloc).
  """
  default_to_cpu()
  tune_host_malloc()

  def quiet_main(argv):
    if not flags.FLAGS.debug:
      logging.set_verbosity(logging.WARNING)
    main(argv)

  app.run(quiet_main, flags_parser=parse_flags)
