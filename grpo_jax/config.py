"""Configuration: the defaults, validation, and frozen dataclasses for jitted code.

The frozen dataclasses below are the one source of truth: `defaults()` builds the
`ml_collections.ConfigDict` that config files start from, with a placeholder for every
field that may be None (so `--config.grpo.epsilon_high=0.28` works), and `freeze()`
checks a ConfigDict against them and returns a hashable `Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
from typing import Any, Mapping, Optional

import ml_collections

from grpo_jax import typed_config
from grpo_jax.errors import UserError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
SUPERVISIONS = ("outcome", "process")
IS_LEVELS = ("token", "sequence")
DTYPES = ("float32", "bfloat16")
ATTENTION = ("auto", "xla", "blockwise", "splash", "cudnn")  # models/attention.py
LR_SCHEDULES = ("cosine", "constant")
SOURCE_PREFIXES = ("synthetic:", "jsonl:", "tfds:")
MESH_AXES = ("data", "fsdp", "tensor")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_BASE_DTYPES = DTYPES + ("int8", "nf4")
LORA_SFT_TRAINS = ("adapters", "weights")


@dataclasses.dataclass(frozen=True)
class DemoModelCfg:
  """Shape of the built-in demo model (used when model.path is "")."""
  hidden_size: int = 128  # D
  intermediate_size: int = 384  # F
  num_layers: int = 4  # L
  num_heads: int = 4  # H
  num_kv_heads: int = 2


@dataclasses.dataclass(frozen=True)
class LoRACfg:
  """LoRA / QLoRA: train low-rank adapters over a frozen base instead of every weight."""
  rank: int = 0  # r; 0 = off (every weight is trained)
  alpha: Optional[float] = None  # adapters scaled by alpha / rank; None: rank (scale 1)
  dropout: float = 0.0  # on the adapters' input, in the training forward
  targets: str = ",".join(LORA_TARGETS)  # comma-separated PEFT target_modules names
  base_dtype: Optional[str] = None  # float32 | bfloat16 | int8 | nf4 (QLoRA); None: model.dtype
  init_from: str = ""  # a PEFT adapter dir to start from; "" = fresh adapters
  # What SFT trains: the adapters, or every weight of a float base (which then is GRPO's
  # frozen base and pi_ref, kept in the checkpoints of a warm-started run).
  sft_trains: str = "adapters"  # adapters | weights

  @property
  def target_names(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.targets.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class ModelCfg:
  path: str = ""  # Hugging Face checkpoint dir; "" = the built-in demo model.
  dtype: str = "float32"  # compute dtype
  param_dtype: Optional[str] = None  # None: same as dtype
  remat: bool = False  # rematerialise each block in the backward pass
  scan_layers: bool = False  # blocks stacked and run by lax.scan: each compiled once
  attention: str = "auto"  # auto (per backend) | xla | blockwise | splash | cudnn
  demo: DemoModelCfg = DemoModelCfg()
  lora: LoRACfg = LoRACfg()


@dataclasses.dataclass(frozen=True)
class DataCfg:
  source: str = "synthetic:arithmetic"  # synthetic:<task> | jsonl:<file> | tfds:<name>[:split]
  prompts_per_step: int = 4  # B
  max_prompt_len: int = 256  # longer prompts are truncated from the left
  prompt_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
  eval_source: Optional[str] = None  # None: hold out num_eval_rows rows of source
  num_eval_rows: int = 64
  skip_bad_rows: bool = False  # skip (and count) malformed JSONL rows instead of failing
  use_chat_template: Optional[bool] = None  # None: when the tokenizer has one
  system_prompt: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class GrpoCfg:
  num_generations: int = 8  # G
  num_iterations: int = 1  # mu: policy updates per sampled batch
  beta: float = 0.0  # KL coefficient
  epsilon_low: float = 0.2
  epsilon_high: Optional[float] = None  # None: same as epsilon_low
  delta: Optional[float] = None  # cap on the unclipped ratio (two-sided clipping)
  loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
  scale_rewards: str = "group"  # group | batch | none
  supervision: str = "outcome"  # outcome | process (step rewards, DeepSeekMath 4.1.3)
  max_steps_per_completion: int = 16  # process: step slots; more steps merge into the last
  importance_sampling_level: str = "token"  # token | sequence (GSPO)
  mask_truncated_completions: bool = False  # no loss on completions without EOS
  drop_zero_std_groups: bool = False  # DAPO dynamic sampling: skip all-equal groups
  oversample: float = 1.0  # dynamic sampling: sample round(B * oversample) prompts, keep B
  top_entropy_quantile: float = 1.0  # policy loss on the top share of tokens by entropy; 1 = all
  minibatches_per_iteration: int = 1  # whole groups per minibatch
  ref_reset_every: int = 0  # iterative GRPO: reset pi_ref every K steps; 0 = never

  @property
  def updates_per_step(self) -> int:
    """Optimizer updates per sampled batch: mu iterations x minibatches."""
    return self.num_iterations * self.minibatches_per_iteration

  @property
  def step_slots(self) -> int:
    """S, the step slots of a completion the reward callback fills: 0 without process
    supervision."""
    return self.max_steps_per_completion if self.supervision == "process" else 0

  @property
  def needs_old_logps(self) -> bool:
    """Whether pi_old differs from pi_theta at some update: after the first of a batch."""
    return self.updates_per_step > 1


@dataclasses.dataclass(frozen=True)
class SamplerCfg:
  max_new_tokens: int = 64  # N
  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0  # 0 = off
  stop_at_eos: bool = True  # False generates exactly max_new_tokens


@dataclasses.dataclass(frozen=True)
class TrainCfg:
  num_steps: int = 200
  learning_rate: float = 1e-6
  lr_schedule: str = "cosine"  # cosine | constant (after linear warmup)
  warmup_steps: int = 0
  max_grad_norm: float = 1.0  # 0 = no clipping
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.99
  adam_eps: float = 1e-8
  grad_accum_steps: int = 1  # micro-batches per minibatch update
  max_nan_steps: int = 3  # stop after this many consecutive non-finite updates
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointCfg:
  every_steps: int = 100  # GRPO and SFT steps; 0 = only at the end and on SIGTERM
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalCfg:
  every_steps: int = 50  # 0 = only before training and at the end
  num_prompts: int = 64  # 0 = no evaluation
  k: int = 4  # samples per prompt: pass@1 averages them, maj@k votes
  temperature: Optional[float] = None  # None: sampler.temperature
  max_new_tokens: Optional[int] = None  # None: sampler.max_new_tokens


@dataclasses.dataclass(frozen=True)
class MeshCfg:
  shape: tuple[int, ...] = (1, -1, 1)  # MESH_AXES sizes; -1 fills the rest
  # Multi-process runs: a process silent this long is lost and the others stop (liveness.py).
  process_timeout_s: float = 60.0


@dataclasses.dataclass(frozen=True)
class SftCfg:
  """Cold-start supervised warm start before GRPO (DeepSeek-R1)."""
  num_steps: int = 0  # 0 = none
  learning_rate: float = 1e-4
  batch_size: int = 16
  max_len: int = 256
  source: Optional[str] = None  # None: data.source


@dataclasses.dataclass(frozen=True)
class LoggingCfg:
  every_steps: int = 1
  tensorboard: bool = True
  plot: bool = True  # workdir/progress.png at the end
  progress_every_s: float = 10.0  # terminal progress line at most this often


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelCfg = ModelCfg()
  data: DataCfg = DataCfg()
  grpo: GrpoCfg = GrpoCfg()
  sampler: SamplerCfg = SamplerCfg()
  rewards: str = "exact_match:1,format:0.2"  # "name:weight,..." or "module:function:weight"
  rewards_timeout_s: float = 10.0  # per reward-function call
  step_rewards: str = ""  # grpo.supervision="process": "name:weight,..." (outcome:w too)
  train: TrainCfg = TrainCfg()
  checkpoint: CheckpointCfg = CheckpointCfg()
  eval: EvalCfg = EvalCfg()
  mesh: MeshCfg = MeshCfg()
  sft: SftCfg = SftCfg()
  logging: LoggingCfg = LoggingCfg()

  @property
  def sampled_prompts_per_step(self) -> int:
    """B', the prompts a step samples: round(B * grpo.oversample); dynamic sampling trains
    on B of their groups."""
    return round(self.data.prompts_per_step * self.grpo.oversample)


def defaults() -> ml_collections.ConfigDict:
  """Every config key with its default value; config files start from this."""
  return typed_config.to_config_dict(Config())


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
  if not ok:
    raise UserError(f"config key {key}={value!r} is not allowed: {allowed}")


def _resolve_mesh(shape: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
  """Fills the one -1 of (data, fsdp, tensor) so that the product is num_devices."""
  key, allowed = "mesh.shape", "(data, fsdp, tensor) of ints >= 1, at most one -1"
  _check(len(shape) == 3, key, shape, allowed)
  _check(all(s >= 1 or s == -1 for s in shape) and shape.count(-1) <= 1, key, shape,
         allowed)
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape and num_devices % fixed == 0:
    shape = tuple(num_devices // fixed if s == -1 else s for s in shape)
  _check(math.prod(shape) == num_devices, key, shape,
         f"the product must equal the number of devices, {num_devices} "
         "(-1 fills one axis)")
  return shape


_ENUMS = {
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.attention": ATTENTION,
    "model.lora.base_dtype": LORA_BASE_DTYPES,
    "model.lora.sft_trains": LORA_SFT_TRAINS,
    "grpo.loss_type": LOSS_TYPES,
    "grpo.scale_rewards": SCALE_REWARDS,
    "grpo.supervision": SUPERVISIONS,
    "grpo.importance_sampling_level": IS_LEVELS,
    "train.lr_schedule": LR_SCHEDULES,
}

_AT_LEAST = {  # key: (smallest allowed value, what the smallest means)
    "model.demo.hidden_size": (1, ""),
    "model.demo.intermediate_size": (1, ""),
    "model.demo.num_layers": (1, ""),
    "model.demo.num_heads": (1, ""),
    "model.demo.num_kv_heads": (1, ""),
    "model.lora.rank": (0, "off"),
    "model.lora.alpha": (0, ""),
    "model.lora.dropout": (0, ""),
    "data.prompts_per_step": (1, ""),
    "data.max_prompt_len": (1, ""),
    "data.num_eval_rows": (0, ""),
    "grpo.num_generations": (2, "a group of one always has advantage 0"),
    "grpo.num_iterations": (1, ""),
    "grpo.beta": (0, "no KL term"),
    "grpo.epsilon_low": (0, ""),
    "grpo.epsilon_high": (0, ""),
    "grpo.minibatches_per_iteration": (1, ""),
    "grpo.ref_reset_every": (0, "never"),
    "grpo.max_steps_per_completion": (1, ""),
    "grpo.oversample": (1, "no over-sampling"),
    "grpo.top_entropy_quantile": (0, "only the highest-entropy tokens"),
    "sampler.max_new_tokens": (1, ""),
    "sampler.temperature": (0, "greedy"),
    "sampler.top_k": (0, "off"),
    "rewards_timeout_s": (1e-3, ""),
    "train.num_steps": (1, ""),
    "train.learning_rate": (0, ""),
    "train.warmup_steps": (0, ""),
    "train.max_grad_norm": (0, "no clipping"),
    "train.weight_decay": (0, ""),
    "train.adam_b1": (0, ""),
    "train.adam_b2": (0, ""),
    "train.adam_eps": (1e-30, ""),
    "train.grad_accum_steps": (1, ""),
    "train.max_nan_steps": (1, ""),
    "checkpoint.every_steps": (0, "only at the end"),
    "checkpoint.keep": (1, ""),
    "eval.every_steps": (0, "only before and after training"),
    "eval.num_prompts": (0, "no evaluation"),
    "eval.k": (1, ""),
    "eval.temperature": (0, "greedy"),
    "eval.max_new_tokens": (1, ""),
    "sft.num_steps": (0, "no warm start"),
    "sft.learning_rate": (0, ""),
    "sft.batch_size": (1, ""),
    "sft.max_len": (1, ""),
    "logging.every_steps": (1, ""),
    "logging.progress_every_s": (0, ""),
    "mesh.process_timeout_s": (1, ""),
}


def _get(c: Config, key: str) -> Any:
  for name in key.split("."):
    c = getattr(c, name)
  return c


def _validate(c: Config) -> None:
  """Raises UserError, naming the key, for the first value out of its allowed range."""
  for key, allowed in _ENUMS.items():
    _check(_get(c, key) in allowed, key, _get(c, key), "one of " + " | ".join(allowed))
  for key, (low, meaning) in _AT_LEAST.items():
    _check(_get(c, key) >= low, key, _get(c, key),
           f">= {low}" + (f" ({low} = {meaning})" if meaning else ""))
  for key in ("data.source", "data.eval_source", "sft.source"):
    source = _get(c, key)
    if source is None:  # data.eval_source: hold out rows of data.source
      continue
    prefix = next((p for p in SOURCE_PREFIXES if source.startswith(p)), "")
    _check(prefix and len(source) > len(prefix), key, source,
           "synthetic:<task> | jsonl:<file> | tfds:<name>[:split]")
  buckets = c.data.prompt_buckets
  _check(len(buckets) >= 1 and buckets[0] >= 1
         and list(buckets) == sorted(set(buckets)), "data.prompt_buckets", buckets,
         "a non-empty increasing tuple of lengths >= 1")
  _check(0 < c.sampler.top_p <= 1, "sampler.top_p", c.sampler.top_p, "0 < top_p <= 1")
  _check(c.train.adam_b1 < 1, "train.adam_b1", c.train.adam_b1, "0 <= b1 < 1")
  _check(c.grpo.top_entropy_quantile <= 1, "grpo.top_entropy_quantile",
         c.grpo.top_entropy_quantile, "0 <= q <= 1 (1 = every token)")
  _check(c.train.adam_b2 < 1, "train.adam_b2", c.train.adam_b2, "0 <= b2 < 1")
  _check(c.rewards.strip() != "", "rewards", c.rewards,
         "a non-empty 'name:weight,name:weight' list")
  g = c.grpo
  _check(g.supervision != "process" or c.step_rewards.strip() != "", "step_rewards",
         c.step_rewards, "a non-empty 'name:weight,...' list when grpo.supervision="
         "'process', e.g. arithmetic_steps or countdown_steps")
  _check(g.supervision == "process" or c.step_rewards.strip() == "", "step_rewards",
         c.step_rewards, "'' unless grpo.supervision='process' (step rewards drive only "
         "process supervision)")
  _check(g.supervision != "process" or g.scale_rewards == "group", "grpo.scale_rewards",
         g.scale_rewards, "'group' with grpo.supervision='process' (step rewards are "
         "normalised over their group)")
  _check(g.delta is None or g.delta > 1 + g.epsilon_high, "grpo.delta", g.delta,
         f"None or > 1 + epsilon_high = {1 + g.epsilon_high}")
  _check(c.data.prompts_per_step % g.minibatches_per_iteration == 0,
         "grpo.minibatches_per_iteration", g.minibatches_per_iteration,
         f"a divisor of data.prompts_per_step={c.data.prompts_per_step} "
         "(whole groups per minibatch)")
  _validate_lora(c.model.lora)
  demo = c.model.demo
  _check(demo.hidden_size % demo.num_heads == 0, "model.demo.hidden_size",
         demo.hidden_size, f"a multiple of model.demo.num_heads={demo.num_heads}")
  _check(demo.num_heads % demo.num_kv_heads == 0, "model.demo.num_heads",
         demo.num_heads, f"a multiple of model.demo.num_kv_heads={demo.num_kv_heads}")


def _validate_lora(lora: LoRACfg) -> None:
  targets = lora.target_names
  _check(bool(targets) and not set(targets) - set(LORA_TARGETS), "model.lora.targets",
         lora.targets, "a comma-separated list among " + ",".join(LORA_TARGETS))
  _check(lora.dropout < 1, "model.lora.dropout", lora.dropout, "0 <= dropout < 1")
  _check(lora.sft_trains == "adapters" or lora.base_dtype in DTYPES, "model.lora.sft_trains",
         lora.sft_trains, f"adapters with model.lora.base_dtype={lora.base_dtype!r} (SFT "
         "cannot train a quantized base)")
  if lora.rank == 0:
    _check(lora.base_dtype in DTYPES, "model.lora.base_dtype", lora.base_dtype,
           "int8 and nf4 quantize the frozen base of a LoRA run: set model.lora.rank > 0")
    _check(not lora.init_from, "model.lora.init_from", lora.init_from,
           "a PEFT adapter dir starts LoRA adapters: set model.lora.rank > 0")


def _check_batch_layout(c: Config) -> None:
  """Each micro-batch of B*G rows, and the B'*G sampled rows, must split evenly over the
  data-parallel devices."""
  data, fsdp, _ = c.mesh.shape
  rows = c.data.prompts_per_step * c.grpo.num_generations
  _check(rows % (data * fsdp) == 0, "data.prompts_per_step", c.data.prompts_per_step,
         f"prompts_per_step * grpo.num_generations = {rows} must be divisible by "
         f"the data-parallel size data*fsdp = {data * fsdp} of mesh.shape={c.mesh.shape}")
  micro = c.train.grad_accum_steps * c.grpo.minibatches_per_iteration
  _check(rows % (micro * data * fsdp) == 0, "train.grad_accum_steps",
         c.train.grad_accum_steps,
         f"B*G = {rows} rows split into minibatches_per_iteration * grad_accum_steps = "
         f"{micro} micro-batches must stay divisible by data*fsdp = {data * fsdp}")
  sampled = c.sampled_prompts_per_step * c.grpo.num_generations
  _check(sampled % (data * fsdp) == 0, "grpo.oversample", c.grpo.oversample,
         f"sampled prompts round(prompts_per_step * oversample) * grpo.num_generations = "
         f"{sampled} must be divisible by the data-parallel size data*fsdp = {data * fsdp}")


def _or(value: Any, default: Any) -> Any:
  return default if value is None else value


def freeze(cfg: ml_collections.ConfigDict | Mapping[str, Any], *,
           num_devices: int | None = None) -> Config:
  """Validates `cfg` and returns it as a frozen, hashable `Config`.

  Nones that mean "same as another key" are resolved and -1 in mesh.shape is filled,
  so jitted code reads plain values. `num_devices` defaults to jax.device_count().
  Raises UserError (one line naming the key, its value and what is allowed).
  """
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  values = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg
  c = typed_config.build(Config, values, "", unknown_key_error)
  g, e = c.grpo, c.eval
  c = dataclasses.replace(
      c,
      model=dataclasses.replace(
          c.model, param_dtype=_or(c.model.param_dtype, c.model.dtype),
          lora=dataclasses.replace(c.model.lora, alpha=_or(c.model.lora.alpha,
                                                           float(c.model.lora.rank)),
                                   base_dtype=_or(c.model.lora.base_dtype, c.model.dtype))),
      grpo=dataclasses.replace(g, epsilon_high=_or(g.epsilon_high, g.epsilon_low)),
      eval=dataclasses.replace(
          e, temperature=_or(e.temperature, c.sampler.temperature),
          max_new_tokens=_or(e.max_new_tokens, c.sampler.max_new_tokens)),
      sft=dataclasses.replace(c.sft, source=_or(c.sft.source, c.data.source)))
  _validate(c)
  c = dataclasses.replace(c, mesh=dataclasses.replace(
      c.mesh, shape=_resolve_mesh(c.mesh.shape, num_devices)))
  _check_batch_layout(c)
  return c


def keys() -> list[str]:
  """Every config key, dotted as on the command line ("grpo.beta")."""
  return [k for k, _ in typed_config.flat_items(Config())]


def is_key(key: str) -> bool:
  """Whether `key` is a config key or a section of them ("grpo", "model.demo")."""
  return any(k == key or k.startswith(key + ".") for k in keys())


def unknown_key_error(key: str) -> UserError:
  """The error for a key that no config has, suggesting the closest known key."""
  close = difflib.get_close_matches(key, keys(), n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]}?" if close else ""
  return UserError(f"unknown config key {key}{hint}")


def describe(c: Config) -> str:
  """One `key = value` line per config key, in section order."""
  return "\n".join(f"{k} = {v!r}" for k, v in typed_config.flat_items(c))


def digest(c: Config) -> str:
  """A short hash of every value, to tell whether a checkpoint came from this config."""
  return hashlib.sha256(describe(c).encode()).hexdigest()[:16]
