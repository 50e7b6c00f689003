"""What every entry point (main, sft, rejection_sample, bench) builds from a frozen config."""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
from absl import logging

from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import models
from grpo_jax import rewards as rewards_lib
from grpo_jax.errors import UserError

CORRECTNESS_REWARDS = ("accuracy", "exact_match")


def demo_model_config(cfg: config_lib.Config, tokenizer) -> models.ModelConfig:
  """The built-in demo model: a small Qwen2-shaped decoder over the demo tokenizer."""
  demo = cfg.model.demo
  return models.ModelConfig(
      family="qwen2", vocab_size=len(tokenizer), hidden_size=demo.hidden_size,
      intermediate_size=demo.intermediate_size, num_layers=demo.num_layers,
      num_heads=demo.num_heads, num_kv_heads=demo.num_kv_heads,
      head_dim=demo.hidden_size // demo.num_heads, rope_theta=10000.0, rope_scaling=None,
      rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, qk_norm=False,
      max_position_embeddings=4096, bos_token_id=None,
      eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
      dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype or cfg.model.dtype,
      remat=cfg.model.remat)


def load_tokenizer(path: str):
  """A local Hugging Face tokenizer; remote code is never trusted."""
  import transformers  # pylint: disable=g-import-not-at-top

  try:
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                      local_files_only=True)
  except (OSError, ValueError) as e:
    raise UserError(f"model.path={path!r}: cannot load a tokenizer from it ({e})") from None


def load_model(cfg: config_lib.Config):
  """(tokenizer, model) for model.path, or the demo tokenizer and a fresh demo model."""
  if not cfg.model.path:
    tokenizer = data_lib.demo_tokenizer()
    return tokenizer, models.init(demo_model_config(cfg, tokenizer), seed=cfg.train.seed)
  if not os.path.isdir(cfg.model.path):
    raise UserError(f"model.path={cfg.model.path!r} is not a directory; give a local "
                    "Hugging Face checkpoint dir (config.json + safetensors) or \"\" for the demo model")
  model = models.from_pretrained(cfg.model.path, dtype=cfg.model.dtype,
                                 param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
  return load_tokenizer(cfg.model.path), model


def eos_token_ids(tokenizer, model: models.Transformer) -> tuple[int, ...]:
  ids = set(model.config.eos_token_ids or ())
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return tuple(sorted(ids))


def load_rows(cfg: config_lib.Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(train rows, held-out eval rows)."""
  seed = cfg.train.seed
  skip = cfg.data.skip_bad_rows
  if cfg.data.eval_source:
    train = data_lib.load_rows(cfg.data.source, split="train", seed=seed, skip_bad_rows=skip)
    evals = data_lib.load_rows(cfg.data.eval_source, split="eval", seed=seed, skip_bad_rows=skip)
  elif cfg.data.source.startswith("synthetic:"):
    train = data_lib.load_rows(cfg.data.source, split="train", seed=seed)
    evals = data_lib.load_rows(cfg.data.source, split="eval", seed=seed,
                               num_rows=cfg.data.num_eval_rows)
  else:
    rows = data_lib.load_rows(cfg.data.source, split="train", seed=seed, skip_bad_rows=skip)
    train, evals = data_lib.split_eval(rows, cfg.data.num_eval_rows, seed)
  if not train:
    raise UserError(f"data.source={cfg.data.source!r} has no training rows left after holding "
                    f"out data.num_eval_rows={cfg.data.num_eval_rows} for evaluation")
  return train, evals


def reward_specs(cfg: config_lib.Config):
  return rewards_lib.parse_spec(cfg.rewards)


def correctness_reward(cfg: config_lib.Config) -> str:
  """The reward evaluation counts as "correct": accuracy if configured, else exact_match."""
  names = [s.name for s in reward_specs(cfg)]
  for name in CORRECTNESS_REWARDS:
    if name in names:
      return name
  return "accuracy" if cfg.data.source.startswith(("jsonl:", "tfds:")) else "exact_match"


def host_device() -> jax.Device | None:
  """This host's CPU device, to read a checkpoint into before laying it out on the mesh, so
  that no one accelerator ever holds the whole model; None (the default device) when jax
  runs without its CPU backend."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return None


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


class StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

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
