"""What the entry points build from a frozen config, in one place.

Two levels, so that a tool without weights or data compiles exactly what training runs:
  `train_setup(cfg, model_config, sampling)` -> `TrainSetup`: what needs no weights and no
    data: the mesh, the optimizer, the step settings, the state layout, the state init, the
    train step and the evaluation sampler (grpo_jax.main, grpo_jax.aot).
  `build_run(cfg)` -> `Run`: loads the tokenizer, the model, the dataset rows and the reward
    scorers, and builds the setup around them (grpo_jax.main, grpo_jax.bench).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import evaluate as evaluate_lib
from grpo_jax import mesh as mesh_lib
from grpo_jax import models
from grpo_jax import optimizer as optimizer_lib
from grpo_jax import process_scoring
from grpo_jax import rewards as rewards_lib
from grpo_jax import sampler as sampler_lib
from grpo_jax import scoring
from grpo_jax import train_step as train_step_lib
from grpo_jax.errors import UserError
from grpo_jax.models import attention as attention_lib
from grpo_jax.models import layer_scan
from grpo_jax.models import lora as lora_lib
from grpo_jax.models import peft_io

# -- the model, its tokenizer, the data ---------------------------------------------------------


def attention_impl(cfg: config_lib.Config, backend: str | None = None) -> str:
  """The attention implementation model.attention names on backend (default: jax's)."""
  return attention_lib.resolve(cfg.model.attention, backend or jax.default_backend())


def lora_spec(cfg: config_lib.Config) -> models.LoRASpec | None:
  """The model.lora section as the model reads it; None when LoRA is off (rank 0)."""
  lora = cfg.model.lora
  if lora.rank == 0:
    return None
  return models.LoRASpec(rank=lora.rank, alpha=lora.alpha, targets=lora.target_names,
                         dropout=lora.dropout, base_dtype=lora.base_dtype)


def demo_model_config(cfg: config_lib.Config, tokenizer,
                      backend: str | None = None) -> models.ModelConfig:
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
      dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
      scan_layers=cfg.model.scan_layers, attention=attention_impl(cfg, backend), lora=lora_spec(cfg))


def load_tokenizer(path: str):
  """A local Hugging Face tokenizer; remote code is never trusted."""
  import transformers  # pylint: disable=g-import-not-at-top

  try:
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                      local_files_only=True)
  except (OSError, ValueError) as e:
    raise UserError(f"model.path={path!r}: cannot load a tokenizer from it ({e})") from None


def load_model(cfg: config_lib.Config):
  """(tokenizer, model) for model.path, or the demo tokenizer and a fresh demo model; with
  LoRA, adapters over it (fresh, or those of model.lora.init_from)."""
  if not cfg.model.path:
    tokenizer = data_lib.demo_tokenizer()
    model = models.init(demo_model_config(cfg, tokenizer), seed=cfg.train.seed)
  elif not os.path.isdir(cfg.model.path):
    raise UserError(f"model.path={cfg.model.path!r} is not a directory; give a local Hugging "
                    "Face checkpoint dir (config.json + safetensors) or \"\" for the demo model")
  else:  # the model first: its errors (no config.json, an unknown family) say more
    model = models.from_pretrained(cfg.model.path, dtype=cfg.model.dtype,
                                   param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                                   scan_layers=cfg.model.scan_layers,
                                   attention=attention_impl(cfg), lora=lora_spec(cfg),
                                   seed=cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.path)
  if cfg.model.lora.init_from:
    model = load_initial_adapter(cfg, model)
  return tokenizer, model


def load_initial_adapter(cfg: config_lib.Config, model):
  """The model with the adapters of model.lora.init_from, whose rank, alpha and targets must
  be the config's (the train state's layout follows the config); dropout stays the config's."""
  directory, spec = cfg.model.lora.init_from, lora_spec(cfg)
  found = peft_io.adapter_spec(directory, spec.base_dtype)
  for key in ("rank", "alpha", "targets"):
    if getattr(found, key) != getattr(spec, key):
      raise UserError(
          f"model.lora.init_from={directory!r} holds adapters of rank {found.rank}, alpha "
          f"{found.alpha}, targets {','.join(found.targets)}; set model.lora.rank, "
          "model.lora.alpha and model.lora.targets to those")
  unscanned = layer_scan.unscanned(model)  # the model itself unless scanned
  peft_io.read_adapters(unscanned, directory)
  return layer_scan.scanned(unscanned) if model.config.scan_layers else unscanned


def host_device() -> jax.Device | None:
  """This host's CPU device, to read a checkpoint into before laying it out on the mesh, so
  that no one accelerator ever holds the whole model; None (the default device) when jax
  runs without its CPU backend."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return None


def load_rows(cfg: config_lib.Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(training rows, held-out evaluation rows) of the data sources."""
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


def sampling_settings(cfg: config_lib.Config, tokenizer,
                      model_config: models.ModelConfig) -> sampler_lib.SamplingSettings:
  """The training rollout's sampling: the `sampler` section, the model's and the tokenizer's
  EOS ids, the tokenizer's pad id (tokenizer None, for a compile-only check: the model's)."""
  eos = set(model_config.eos_token_ids or ())
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    eos.add(int(tokenizer.eos_token_id))
  pad = data_lib.pad_id(tokenizer) if tokenizer is not None else model_config.pad_token_id
  return sampler_lib.SamplingSettings.from_config(
      cfg.sampler, eos_token_ids=tuple(sorted(eos)), pad_token_id=pad or 0)


# -- what needs no weights and no data ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The mesh, optimizer, step settings and layout of a run, and its compiled programs."""

  cfg: config_lib.Config
  mesh: Mesh
  graphdef: nnx.GraphDef
  abstract_params: Any  # nnx.State of jax.ShapeDtypeStruct
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  settings: train_step_lib.StepSettings
  eval_sampling: sampler_lib.SamplingSettings  # evaluation: eval.temperature, eval.max_new_tokens
  layout: train_step_lib.Layout
  state_shardings: train_step_lib.TrainState  # of NamedSharding

  @property
  def init(self):
    """jit: params laid out by layout.params -> the TrainState laid out by state_shardings."""
    c = self.cfg
    return jax.jit(lambda p: train_step_lib.init_state(p, self.tx, beta=c.grpo.beta,
                                                       seed=c.train.seed,
                                                       ref_reset_every=c.grpo.ref_reset_every),
                   in_shardings=(self.layout.params,), out_shardings=self.state_shardings)

  def init_state(self, params) -> train_step_lib.TrainState:
    """A train state around params (any layout), laid out on the mesh."""
    return self.init(jax.device_put(params, self.layout.params))

  def abstract_state(self) -> train_step_lib.TrainState:
    """The train state's shapes, dtypes and shardings, without any array."""
    shapes = jax.eval_shape(self.init, self.abstract_params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, self.state_shardings)

  def train_step(self, reward_fn: train_step_lib.RewardFn, reward_names: Sequence[str], *,
                 donate: bool = True):
    """The jitted `train_step(state, batch) -> (state, metrics)` scoring with reward_fn."""
    return train_step_lib.make_train_step(
        self.graphdef, self.tx, self.lr_schedule, self.settings, reward_fn, tuple(reward_names),
        layout=self.layout, state_shardings=self.state_shardings,
        metrics_sharding=mesh_lib.replicated(self.mesh), donate=donate)

  def eval_sample_fn(self):
    """The jitted sampler of evaluation (evaluate.make_sample_fn)."""
    return evaluate_lib.make_sample_fn(self.graphdef, self.eval_sampling, self.layout)


def train_setup(cfg: config_lib.Config, model_config: models.ModelConfig,
                sampling: sampler_lib.SamplingSettings,
                devices: Sequence[jax.Device] | None = None) -> TrainSetup:
  """The TrainSetup of cfg for a model of model_config's shape on devices (default: all),
  with the LoRA adapters and base storage of cfg's model.lora and its model.scan_layers."""
  model_config = dataclasses.replace(model_config, lora=lora_spec(cfg),
                                     scan_layers=cfg.model.scan_layers)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: models.init(model_config)))
  mesh = mesh_lib.make_mesh(cfg.mesh.shape, devices)
  tx, lr_schedule = optimizer_lib.for_grpo(cfg)
  param_shardings = mesh_lib.param_shardings(abstract_params, mesh)
  replicated = mesh_lib.replicated(mesh)
  opt_state = jax.eval_shape(tx.init, lora_lib.split_trainable(abstract_params)[0])
  state_shardings = train_step_lib.TrainState(
      step=replicated, params=param_shardings,
      opt_state=mesh_lib.opt_state_shardings(tx, opt_state,
                                             lora_lib.split_trainable(param_shardings)[0]),
      ref_params=lora_lib.reference_part(param_shardings, beta=cfg.grpo.beta,
                                         ref_reset_every=cfg.grpo.ref_reset_every),
      key=replicated)
  settings = train_step_lib.StepSettings(
      grpo=cfg.grpo, grad_accum_steps=cfg.train.grad_accum_steps, sampling=sampling,
      row_shards=mesh_lib.row_shards(mesh), kept_groups=cfg.data.prompts_per_step)
  eval_sampling = dataclasses.replace(sampling, max_new_tokens=cfg.eval.max_new_tokens,
                                      temperature=cfg.eval.temperature, stop_at_eos=True)
  return TrainSetup(
      cfg=cfg, mesh=mesh, graphdef=graphdef, abstract_params=abstract_params, tx=tx,
      lr_schedule=lr_schedule, settings=settings, eval_sampling=eval_sampling,
      layout=train_step_lib.Layout(params=param_shardings, rows=mesh_lib.batch_sharding(mesh)),
      state_shardings=state_shardings)


# -- a run: the setup with its model, data and rewards -----------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a training run reads besides the weights: the setup, the tokenizer, the
  dataset rows, and the scorers of training and evaluation."""

  cfg: config_lib.Config
  setup: TrainSetup
  tokenizer: Any
  train_rows: list[dict[str, Any]]
  eval_rows: list[dict[str, Any]]
  scorer: scoring.Scorer  # the train step's reward callback, over train_rows
  eval_scorer: scoring.Scorer  # evaluation's correctness reward, over eval_rows
  eval_reward: str  # its name

  def prompt_stream(self) -> data_lib.PromptStream:
    """The training rows' ids in batches of the prompts a step samples (B', see
    Config.sampled_prompts_per_step), shuffled each epoch by train.seed."""
    return data_lib.PromptStream(list(range(len(self.train_rows))),
                                 self.cfg.sampled_prompts_per_step, self.cfg.train.seed)

  def batch(self, row_ids: Sequence[int]) -> train_step_lib.Batch:
    """The train step's batch of the training rows row_ids."""
    rows = [self.train_rows[i] for i in row_ids]
    tokens, mask = data_lib.encode_row_prompts(self.tokenizer, rows, self.cfg.data)
    return train_step_lib.Batch(prompt_tokens=jnp.asarray(tokens, jnp.int32),
                                prompt_mask=jnp.asarray(mask, jnp.int32),
                                row_ids=jnp.asarray(row_ids, jnp.int32))


def step_scorer(cfg: config_lib.Config, tokenizer, specs: rewards_lib.StepSpecs | None
                ) -> process_scoring.StepScorer | None:
  """The scorer of process supervision's step rewards `specs` (`step_rewards`); None under
  outcome supervision (specs None)."""
  if specs is None:
    return None
  return process_scoring.StepScorer(tokenizer, specs,
                                    max_steps=cfg.grpo.max_steps_per_completion,
                                    timeout_s=cfg.rewards_timeout_s)


def build_run(cfg: config_lib.Config) -> tuple[Run, Any]:
  """(the run, the model's initial params in host memory).

  Reads the data and the rewards first (a bad row or reward name fails before a model
  loads), then the tokenizer and the model into host memory: TrainSetup.init_state lays the
  params out on the mesh from there, so no one device ever holds the whole model.
  """
  train_rows, eval_rows = load_rows(cfg)
  specs = rewards_lib.parse_spec(cfg.rewards)
  step_specs = (rewards_lib.parse_step_spec(cfg.step_rewards)
                if cfg.grpo.supervision == "process" else None)
  eval_reward = evaluate_lib.correctness_reward(cfg)
  eval_specs = ([s for s in specs if s.name == eval_reward]
                or list(rewards_lib.parse_spec(eval_reward)))
  with jax.default_device(host_device()):
    tokenizer, model = load_model(cfg)
  scorer = scoring.Scorer(tokenizer, train_rows, specs, max_new_tokens=cfg.sampler.max_new_tokens,
                          timeout_s=cfg.rewards_timeout_s,
                          steps=step_scorer(cfg, tokenizer, step_specs))
  eval_scorer = scoring.Scorer(tokenizer, eval_rows, eval_specs,
                               max_new_tokens=cfg.eval.max_new_tokens,
                               timeout_s=cfg.rewards_timeout_s)
  setup = train_setup(cfg, model.config, sampling_settings(cfg, tokenizer, model.config))
  run = Run(cfg=cfg, setup=setup, tokenizer=tokenizer, train_rows=train_rows,
            eval_rows=eval_rows, scorer=scorer, eval_scorer=eval_scorer, eval_reward=eval_reward)
  return run, nnx.state(model)
