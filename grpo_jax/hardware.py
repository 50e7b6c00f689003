"""Which accelerators this host has, read from the kernel (/sys, /dev) without starting JAX.

Installed packages say nothing about the hardware: the aot extra brings libtpu and the CUDA
plugin to CPU-only hosts, to compile for accelerators ahead of time.
"""

from __future__ import annotations

import glob
import os

# Google's PCI vendor id with the device id of a TPU chip (v2/v3, v4, v5p, v5e, v6e, TPU7x);
# the device nodes of TPU drivers (accel, vfio), of NVIDIA's driver (and WSL's) and of AMD's KFD.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
_DEVICE_FILES = ("dev/accel[0-9]*", "dev/vfio/[0-9]*", "dev/nvidia[0-9]*", "dev/nvidiactl",
                 "dev/dxg", "dev/kfd")


def has_accelerator(root: str = "/") -> bool:
  """Whether a TPU chip or a GPU is attached."""
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


def jax_is_cpu_only() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator is attached."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  return not has_accelerator()


def default_to_cpu() -> bool:
  """Runs JAX on the CPU where no accelerator is attached and JAX_PLATFORMS is unset.

  JAX would otherwise start every accelerator package installed (libtpu and the CUDA plugin
  of the aot extra) and print their failures to find a device. Returns whether it chose the
  CPU; call it before JAX starts a backend.
  """
  if os.environ.get("JAX_PLATFORMS", "").strip() or has_accelerator():
    return False
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  return True
