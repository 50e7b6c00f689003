"""Host malloc tuning for JAX on the CPU: keep XLA's freed temporaries inside the process."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

from grpo_jax import hardware

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
TUNE_MALLOC_ENV = "GRPO_JAX_TUNE_MALLOC"


def tune() -> bool:
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
  if not hardware.jax_is_cpu_only():
    return False
  libc = ctypes.CDLL(None)
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
