"""Joining a multi-process run (TPU pods, multi-node GPU) through jax.distributed."""

from __future__ import annotations

import os

import jax

from grpo_jax.errors import UserError


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"environment variable {name}={value!r} is not allowed: an integer "
                    ">= 0") from None


def init_distributed(heartbeat_timeout_s: int | None = None) -> None:
  """Joins a multi-process run (TPU pod, multi-node GPU) when one is configured.

  Call it before anything touches a device. Manual runs set JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; where the last two are
  unset, jax reads them from the cluster (Cloud TPU VM metadata, Slurm). GKE TPU pods are
  detected by jax alone. Otherwise a single process does nothing. `heartbeat_timeout_s`:
  after how long jax's service counts a silent process dead (None: jax's default).
  """
  timeouts = {} if heartbeat_timeout_s is None else {
      "heartbeat_timeout_seconds": heartbeat_timeout_s}
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    num_processes, process_id = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    if num_processes is not None and process_id is not None and not (
        num_processes >= 1 and 0 <= process_id < num_processes):
      raise UserError(f"JAX_PROCESS_ID={process_id} with JAX_NUM_PROCESSES={num_processes} "
                      "is not allowed: 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES")
    try:
      jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                 process_id=process_id, **timeouts)
    except ValueError as e:  # no cluster to read the unset values from
      raise UserError(f"JAX_COORDINATOR_ADDRESS={address!r} is set but {e}; set "
                      "JAX_NUM_PROCESSES and JAX_PROCESS_ID too") from None
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize(**timeouts)
