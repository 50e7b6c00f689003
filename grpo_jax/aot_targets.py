"""The accelerators `python -m grpo_jax.aot` compiles for, named as users name slices.

A slice (v5e-8, v4-8, h100x8, ...) maps to the compiler's topology and to its chips' usable
HBM, peak bfloat16 FLOP/s and HBM bandwidth. `compile_devices` makes the slice's compile-only
devices on this host: libtpu's for a TPU slice, the jax CUDA plugin's for a GPU one; no
accelerator is needed. Call `prepare_environment` before JAX starts a backend.

Chip figures (per chip; peak FLOP/s dense, without sparsity):
  usable HBM, TPU: the limit libtpu 0.0.42.1 states for one program ("exceeds available HBM
    (15.75G)"), read from compiles for each generation on 2026-11-29 (GiB, two decimals);
  usable HBM, H100: the share of the 84,942,979,072 bytes an H100 80GB HBM3 reports that
    XLA's GPU allocator takes: 75% unless XLA_CLIENT_MEM_FRACTION (formerly
    XLA_PYTHON_CLIENT_MEM_FRACTION) says otherwise (usable_hbm_bytes);
  peak and bandwidth: Google Cloud TPU documentation ("TPU v4", "TPU v5e", "TPU v5p",
    "TPU v6e" system architecture tables) and NVIDIA's H100 SXM datasheet (989 TFLOP/s
    BF16 Tensor Core dense, 3.35 TB/s).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, MutableMapping

from grpo_jax.errors import UserError

GIB = 1 << 30
H100_DEVICE_BYTES = 84_942_979_072
GPU_MEMORY_FRACTION_ENV = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: per-chip figures, bfloat16 peak dense."""

  generation: str  # as in slice names: "v4", "v5e", "v5p", "v6e", "h100"
  platform: str  # "tpu" | "cuda"
  hbm_bytes: int  # TPU: what the compiler lets one program use; GPU: the device's memory
  peak_flops: float  # FLOP/s
  hbm_bandwidth: float  # bytes/s


CHIPS = {
    "v4": Chip("v4", "tpu", int(30.75 * GIB), 275e12, 1200e9),
    "v5e": Chip("v5e", "tpu", int(15.75 * GIB), 197e12, 819e9),
    "v5p": Chip("v5p", "tpu", int(95.74 * GIB), 459e12, 2765e9),
    "v6e": Chip("v6e", "tpu", int(31.25 * GIB), 918e12, 1638e9),
    "h100": Chip("h100", "cuda", H100_DEVICE_BYTES, 989e12, 3.35e12),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A slice as users name it and as the compiler names it.

  topology: libtpu's topology name ("v5e:2x4": chips along each axis) for TPU, the CUDA
  plugin's "partitions x hosts x devices per host" ("1x1x8") for GPU. v4 and v5p count two
  TensorCores per chip in their names (v4-8 has 4 chips); chip_config_name "megacore" makes
  libtpu give one device per chip, as a v4 runs JAX.
  """

  name: str
  chip: Chip
  chips: int
  topology: str
  chip_config_name: str = ""

  @property
  def platform(self) -> str:
    return self.chip.platform

  def topology_kwargs(self) -> dict[str, str]:
    """Keyword arguments of jax.experimental.topologies.get_topology_desc for this slice."""
    if self.platform == "cuda":
      return {"platform": "cuda", "topology": self.topology,
              "target_config": gpu_target_config(self.chip)}
    kwargs = {"platform": "tpu", "topology_name": self.topology}
    if self.chip_config_name:
      kwargs["chip_config_name"] = self.chip_config_name
    return kwargs


# (name suffix N, chips, the compiler's shape). v4 and v5p: N TensorCores, N / 2 chips.
_SHAPES_3D = ((8, 4, "2x2x1"), (16, 8, "2x2x2"), (32, 16, "2x2x4"), (64, 32, "2x4x4"))
_SHAPES_2D = ((4, 4, "2x2"), (8, 8, "2x4"), (16, 16, "4x4"), (32, 32, "4x8"), (64, 64, "8x8"),
              (128, 128, "8x16"), (256, 256, "16x16"))


def _slices() -> dict[str, Slice]:
  slices = [Slice(f"v4-{n}", CHIPS["v4"], chips, f"v4:{shape}", "megacore")
            for n, chips, shape in _SHAPES_3D]
  slices += [Slice(f"v5p-{n}", CHIPS["v5p"], chips, f"v5p:{shape}")
             for n, chips, shape in _SHAPES_3D[:2]]
  slices += [Slice(f"{gen}-{n}", CHIPS[gen], chips, f"{gen}:{shape}")
             for gen in ("v5e", "v6e") for n, chips, shape in _SHAPES_2D]
  slices += [Slice(f"h100x{gpus}", CHIPS["h100"], gpus, f"1x1x{gpus}") for gpus in (1, 8)]
  return {s.name: s for s in slices}


SLICES = _slices()


def usable_hbm_bytes(s: Slice, environ: Mapping[str, str] = os.environ) -> int:
  """HBM one program may use on a chip of `s` (GPU: the allocator's share of the memory)."""
  if s.platform != "cuda":
    return s.chip.hbm_bytes
  fraction = next((environ[k] for k in GPU_MEMORY_FRACTION_ENV if environ.get(k)), "0.75")
  try:
    return int(float(fraction) * s.chip.hbm_bytes)
  except ValueError:
    raise UserError(f"XLA_CLIENT_MEM_FRACTION={fraction!r} is not allowed: a number in (0, 1]") from None


def parse_topology(name: str) -> Slice:
  """The slice called `name`; a UserError listing the allowed names otherwise."""
  found = SLICES.get(name.strip().lower())
  if found is None:
    raise UserError(f"--topology={name!r} is not allowed: one of {', '.join(SLICES)}")
  return found


# GpuTargetConfigProto fields of an H100 SXM (compute capability 9.0), from NVIDIA's H100
# datasheet and the CUDA programming guide's limits for compute capability 9.0. The
# compiler reads them instead of asking a live GPU.
_H100_DEVICE_INFO = {
    "threads_per_block_limit": 1024,
    "threads_per_warp": 32,
    "shared_memory_per_block": 48 << 10,
    "shared_memory_per_block_optin": 227 << 10,
    "shared_memory_per_core": 228 << 10,
    "threads_per_core_limit": 2048,
    "core_count": 132,  # SMs
    "fpus_per_core": 128,
    "block_dim_limit_x": 2**31 - 1,
    "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535,
    "thread_dim_limit_x": 1024,
    "thread_dim_limit_y": 1024,
    "thread_dim_limit_z": 64,
    "memory_bandwidth": 2 * 2619 * 10**6 * 5120 // 8,  # 2619 MHz HBM3 DDR, 5120-bit bus
    "l2_cache_size": 50 << 20,
    "clock_rate_ghz": 1.98,
    "device_memory_size": H100_DEVICE_BYTES,
    "registers_per_core_limit": 65536,
    "registers_per_block_limit": 65536,
}


def gpu_target_config(chip: Chip) -> str:
  """The text GpuTargetConfigProto that the CUDA plugin compiles for (chip: an H100)."""
  if chip.generation != "h100":
    raise ValueError(f"no GPU description for {chip.generation}")
  fields = "".join(f"  {k}: {v}\n" for k, v in _H100_DEVICE_INFO.items())
  return ("gpu_device_info {\n" + fields + "  cuda_compute_capability { major: 9 minor: 0 }\n}\n"
          'platform_name: "CUDA"\ndevice_description_str: "NVIDIA H100 80GB HBM3"\n')


def prepare_environment(s: Slice, environ: MutableMapping[str, str] = os.environ) -> None:
  """Environment for compiling on this host for `s`; call it before JAX starts a backend.

  JAX itself runs on the CPU (the slice's devices are compile-only). For TPU, the host's
  accelerator type and worker list are given so that libtpu does not look for TPU hosts and
  print warnings; values already set are kept.
  """
  environ["JAX_PLATFORMS"] = "cpu"
  if s.platform == "tpu":
    environ.setdefault("TPU_ACCELERATOR_TYPE", s.name)
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def compile_devices(s: Slice) -> list:
  """The compile-only devices of slice `s` (needs libtpu, or jax-cuda12-plugin for GPU)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  package = "jax-cuda12-plugin" if s.platform == "cuda" else "libtpu"
  try:
    devices = topologies.get_topology_desc(**s.topology_kwargs()).devices
  except (RuntimeError, NotImplementedError) as e:
    raise UserError(f"--topology={s.name} needs {package} (pip install -e \".[aot]\"): "
                    f"{' '.join(str(e).split())}") from None
  if len(devices) != s.chips:
    raise RuntimeError(f"{s.name}: the compiler made {len(devices)} devices, not {s.chips}")
  return list(devices)
