"""The measurements of `python -m grpo_jax.bench`: a whole GRPO step and its phases, how a
step scales, the sampler; see bench.py for the command line and what each figure means.

Each measurement compiles once, timed on its own, then reports the median of `steps` calls
after `warmup` untimed ones, results ready.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from grpo_jax import bench_trl
from grpo_jax import builder
from grpo_jax import completion_logps as logps_lib
from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import models
from grpo_jax import sampler
from grpo_jax import train_step as train_step_lib
from grpo_jax.errors import UserError

QWEN_SHAPE = "qwen2.5-0.5b-shape"
QWEN_NAMES = (QWEN_SHAPE, "qwen2.5-0.5b")  # both name random weights in Qwen2.5-0.5B's shape
SWEEP_KEYS = {"G": "grpo.num_generations", "N": "sampler.max_new_tokens",
              "B": "data.prompts_per_step"}


def qwen25_05b_shape(dtype: str) -> models.ModelConfig:
  """Qwen2.5-0.5B's architecture (the weights are drawn at random)."""
  return models.ModelConfig(
      family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
      num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
      tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768,
      eos_token_ids=(151643,), pad_token_id=151643, dtype=dtype, param_dtype=dtype)


def check_model_spec(spec: str) -> None:
  if spec not in ("demo",) + QWEN_NAMES and not os.path.isdir(spec):
    raise UserError(f"--model={spec!r} is not allowed: demo | {' | '.join(QWEN_NAMES)} | a "
                    "local Hugging Face checkpoint dir")


def load_model(spec: str, dtype: str, seed: int,
               lora: models.LoRASpec | None = None) -> models.Transformer:
  """The model named by --model, with fresh LoRA adapters of `lora` (if given)."""
  check_model_spec(spec)
  if spec in QWEN_NAMES:
    return models.init(dataclasses.replace(qwen25_05b_shape(dtype), lora=lora), seed=seed)
  cfg = config_lib.defaults()
  cfg.model.path = "" if spec == "demo" else spec
  cfg.model.dtype = dtype
  cfg.train.seed = seed
  if lora is not None:
    cfg.model.lora.rank, cfg.model.lora.alpha = lora.rank, lora.alpha
    cfg.model.lora.base_dtype = lora.base_dtype
  _, model = builder.load_model(config_lib.freeze(cfg, num_devices=1))
  return model


def model_path(spec: str, dtype: str, workdir: str) -> str:
  """model.path for --model: "" for demo, a checkpoint dir written here for the Qwen shape."""
  check_model_spec(spec)
  if spec not in QWEN_NAMES:
    return "" if spec == "demo" else spec
  out = os.path.join(workdir, "qwen2.5-0.5b-shape")
  if not os.path.isfile(os.path.join(out, "config.json")):
    models.save_pretrained(load_model(spec, dtype, 0), out)
    data_lib.demo_tokenizer().save_pretrained(out)  # prompts only: any tokenizer will do
  return out


@dataclasses.dataclass(frozen=True)
class Timing:
  compile_s: float  # lower + compile
  step_s: float  # median over the timed calls, results ready


def time_compiled(jitted, args: tuple[Any, ...], static: dict[str, Any], steps: int,
                  vary: Callable[[tuple[Any, ...], int], tuple[Any, ...]],
                  warmup: int = 0) -> Timing:
  """Compiles jitted(*args, **static) once, then times `steps` calls of vary(args, i) after
  `warmup` untimed ones."""
  start = time.perf_counter()
  compiled = jitted.lower(*args, **static).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(warmup + steps):
    call_args = vary(args, i)
    start = time.perf_counter()
    jax.block_until_ready(compiled(*call_args))
    times.append(time.perf_counter() - start)
  return Timing(compile_s=compile_s, step_s=statistics.median(times[warmup:]))


def decode_bytes(params: nnx.State, config: models.ModelConfig, batch: int,
                 cache_len: float) -> tuple[int, float]:
  """(weight bytes, KV-cache bytes) one decode step reads, the cache holding cache_len slots.

  Every parameter counts (an untied input embedding is in fact only gathered).
  """
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  kv_bytes = (2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.head_dim *
              config.compute_dtype.itemsize)
  return weight_bytes, kv_bytes


def bandwidth_bound(params: nnx.State, config: models.ModelConfig, batch: int, prompt_len: int,
                    new_tokens: int, mem_bw_gbs: float, tokens_per_s: float) -> dict[str, float]:
  """Decoding tokens_per_s against the memory-bandwidth bound.

  Decode step s (1..N-1) attends to T + s slots, T + N/2 on average; one step reads the
  weights and that KV cache once, so the bound is B / ((weights + KV) / bandwidth) tokens/s.
  """
  weight_bytes, kv_bytes = decode_bytes(params, config, batch, prompt_len + new_tokens / 2)
  bound_step_s = (weight_bytes + kv_bytes) / (mem_bw_gbs * 1e9)
  bound_tokens_per_s = batch / bound_step_s
  return {
      "weight_bytes": weight_bytes,
      "kv_bytes_mean": kv_bytes,
      "bound_decode_step_s": bound_step_s,
      "bound_tokens_per_s": bound_tokens_per_s,
      "bound_ratio": tokens_per_s / bound_tokens_per_s,
  }


def peak_memory() -> tuple[int, str]:
  """(bytes, what they are): the device's peak_bytes_in_use where jax reports it (GPU, TPU),
  else this process's peak resident memory (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return bench_trl.peak_rss_bytes(), "process peak RSS"


def device_name() -> str:
  """The accelerator, or for CPU the processor's model name and the cores this process has."""
  d = jax.devices()[0]
  if d.platform != "cpu":
    return f"{jax.device_count()} x {d.device_kind} ({d.platform})"
  model = "cpu"
  if os.path.isfile("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as fp:
      model = next((line.split(":", 1)[1].strip() for line in fp
                    if line.startswith("model name")), model)
  return f"{model}, {len(os.sched_getaffinity(0))} cores (CPU)"


@dataclasses.dataclass(frozen=True)
class BenchArgs:
  """What the sampler benchmark reads from the command line."""

  batch: int  # B
  prompt_len: int  # T
  new_tokens: int  # N
  steps: int
  mem_bw_gbs: float
  seed: int
  lora_rollout: str = "merged"  # LoRA: merged once per call | low_rank (at every token)


@jax.jit(static_argnames=("settings",))
def _generate_low_rank(graphdef, params, prompt_tokens, prompt_mask, key, settings):
  """sampler.generate_jit without merging: LoRA adapters applied at every new token."""
  return sampler.generate_from(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, key,
                               settings)


def bench_sampler(model: models.Transformer, args: BenchArgs) -> dict[str, Any]:
  """Samples N tokens after [B, T] prompts (stop_at_eos=False: exactly N per row)."""
  b, t, n = args.batch, args.prompt_len, args.new_tokens
  key = jax.random.key(args.seed)
  tokens = jax.random.randint(key, (b, t), 0, model.config.vocab_size, jnp.int32)
  mask = jnp.ones((b, t), jnp.int32)
  settings = sampler.SamplingSettings(max_new_tokens=n, stop_at_eos=False)
  graphdef, params = nnx.split(model)
  generate = _generate_low_rank if args.lora_rollout == "low_rank" else sampler.generate_jit
  timing = time_compiled(
      generate, (graphdef, params, tokens, mask, key), {"settings": settings},
      args.steps,
      vary=lambda args, i: (*args[:4], jax.random.fold_in(key, i)))
  tokens_per_s = b * n / timing.step_s
  return {"compile_s": timing.compile_s, "step_s": timing.step_s, "tokens_per_s": tokens_per_s,
          **bandwidth_bound(params, model.config, b, t, n, args.mem_bw_gbs, tokens_per_s)}


# -- the whole GRPO step ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepArgs:
  steps: int  # timed steps
  warmup: int  # untimed steps after the compile
  pieces: bool = True  # also time sampling / log-probs / update as separate programs
  peak_tflops: float | None = None  # for MFU
  mem_bw_gbs: float | None = None  # for the sampling bandwidth bound


def time_train_steps(run: builder.Run, state: train_step_lib.TrainState, stream,
                     steps: int, warmup: int) -> tuple[dict[str, Any], train_step_lib.TrainState]:
  """Runs warmup + steps train steps as the trainer does (batch made outside the timing,
  metrics fetched inside it). Each prompt shape compiles once, outside the timing.
  Returns (figures, the state after the steps)."""
  train_step = run.setup.train_step(run.scorer, run.scorer.names)
  compiled, compile_times, step_times, reward_times, faults = {}, [], [], [], []
  for i in range(warmup + steps):
    batch = run.batch(stream.next())
    shape = batch.prompt_tokens.shape
    if shape not in compiled:
      start = time.perf_counter()
      compiled[shape] = train_step.lower(state, batch).compile()
      compile_times.append(time.perf_counter() - start)
    start, faults_start = time.perf_counter(), _minor_faults()
    state, metrics = compiled[shape](state, batch)
    metrics = jax.device_get(metrics)
    if i >= warmup:
      step_times.append(time.perf_counter() - start)
      reward_times.append(float(metrics["perf/reward_s"]))
      faults.append(_minor_faults() - faults_start)
  return {"compile_s": compile_times[0], "compiles": len(compile_times),
          "step_s": statistics.median(step_times), "step_times_s": step_times,
          "reward_s": statistics.median(reward_times),
          "page_faults_per_step": statistics.median(faults)}, state


def _minor_faults() -> int:
  """Minor page faults of this process so far (memory the kernel had to map in afresh)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_step_pieces(setup: builder.TrainSetup, state: train_step_lib.TrainState,
                     batch: train_step_lib.Batch, steps: int, warmup: int) -> dict[str, Any]:
  """The step's phases compiled each on its own, from train_step's own functions: sampling
  (`sample`), old + reference log-probs (`reference_logps`) and the update (one
  `minibatch_update`, timed once and counted mu * M times)."""
  graphdef, settings = setup.graphdef, setup.settings
  key = jax.random.key(0)
  sample = jax.jit(functools.partial(train_step_lib.sample, graphdef, settings=settings,
                                     layout=setup.layout))
  sampling = time_compiled(sample, (state.params, batch, key), {}, steps,
                           vary=lambda a, i: (*a[:2], jax.random.fold_in(key, i)), warmup=warmup)
  rollout = sample(state.params, batch, key)
  logps = jax.jit(functools.partial(train_step_lib.reference_logps, graphdef, settings=settings,
                                    layout=setup.layout))
  passes = int(settings.grpo.needs_old_logps) + int(settings.grpo.beta > 0)
  logps_s = 0.0
  if passes:
    logps_s = time_compiled(logps, (state, rollout), {}, steps, vary=lambda a, i: a,
                            warmup=warmup).step_s
  old_logps, ref_logps = logps(state, rollout)
  r = rollout.tokens.shape[0]
  advs = train_step_lib.Advantages(
      advs=jax.random.normal(key, (r,)), loss_mask=rollout.mask, kept=jnp.ones((r,)),
      zero_std=jnp.zeros((r // settings.grpo.num_generations,), bool))
  batches = train_step_lib.loss_batches(rollout, advs, old_logps, ref_logps, settings)
  update = jax.jit(functools.partial(train_step_lib.minibatch_update, graphdef, setup.tx,
                                     settings=settings, layout=setup.layout))
  minibatch = jax.tree.map(lambda x: x[0], batches)
  update_one = time_compiled(update, (state.params, state.opt_state, minibatch), {}, steps,
                             vary=lambda a, i: a, warmup=warmup)
  return {"sampling_s": sampling.step_s, "logps_s": logps_s, "logps_passes": passes,
          "update_s": update_one.step_s * settings.grpo.updates_per_step}


def train_flops(cfg: config_lib.Config, num_params: int, prompt_len: int, logps_passes: int,
                row_shards: int = 1) -> int:
  """Model FLOPs of a step's log-prob passes (2 P per token) and updates (6 P per token, mu
  times), over the tokens the model runs on: each row's N - 1 completion tokens ahead of the
  last, and a prompt once per block of rows that share it (completion_logps.prompt_share)."""
  g, n = cfg.grpo.num_generations, cfg.sampler.max_new_tokens
  r = cfg.data.prompts_per_step * g
  micro_rows = r // (cfg.grpo.minibatches_per_iteration * cfg.train.grad_accum_steps)

  def tokens(rows_per_pass):
    share = logps_lib.prompt_share(g, rows_per_pass, row_shards)
    return r * (n - 1) + r // share * prompt_len

  return (6 * num_params * cfg.grpo.num_iterations * tokens(micro_rows) +
          2 * num_params * logps_passes * tokens(r))


def bench_step(cfg: config_lib.Config, args: StepArgs) -> dict[str, Any]:
  """Times the compiled GRPO step of `cfg` (see bench.py for the figures)."""
  cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, tensorboard=False))
  run, params = builder.build_run(cfg)
  state = run.setup.init_state(params)
  del params
  stream = run.prompt_stream()
  r = cfg.data.prompts_per_step * cfg.grpo.num_generations
  n = cfg.sampler.max_new_tokens
  result, state = time_train_steps(run, state, stream, args.steps, args.warmup)
  # Before the pieces, which hold copies of the state of their own.
  result["peak_memory_bytes"], result["peak_memory_kind"] = peak_memory()
  batch = run.batch(stream.next()[:cfg.data.prompts_per_step])  # the pieces: B prompts
  t = batch.prompt_tokens.shape[1]
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  sampled_rows = cfg.sampled_prompts_per_step * cfg.grpo.num_generations  # B' G
  result.update(rows=r, prompt_len=t, new_tokens=n, num_params=num_params,
                step_rollout_tokens_per_s=sampled_rows * n / result["step_s"])
  if args.pieces:
    pieces = time_step_pieces(run.setup, state, batch, args.steps, args.warmup)
    mu = cfg.grpo.num_iterations
    seq_tokens = r * (t + n)
    result.update(pieces)
    result["other_s"] = result["step_s"] - (pieces["sampling_s"] + pieces["logps_s"] +
                                            pieces["update_s"] + result["reward_s"])
    result["rollout_tokens_per_s"] = r * n / pieces["sampling_s"]
    result["train_tokens_per_s"] = mu * seq_tokens / pieces["update_s"]
    if args.mem_bw_gbs:
      model = nnx.merge(run.setup.graphdef, state.params)
      result.update(bandwidth_bound(state.params, model.config, r, t, n, args.mem_bw_gbs,
                                    result["rollout_tokens_per_s"]))
    if args.peak_tflops:
      flops = train_flops(cfg, num_params, t, pieces["logps_passes"],
                          run.setup.settings.row_shards)
      result["train_flops"] = flops
      result["mfu"] = flops / (pieces["update_s"] + pieces["logps_s"]) / (args.peak_tflops * 1e12)
  return result


# -- scaling -----------------------------------------------------------------------------------


def bench_scaling(base: ml_collections.ConfigDict, args: StepArgs,
                  sweeps: dict[str, Sequence[int]]) -> list[dict[str, Any]]:
  """Step time as one of G, N, B (SWEEP_KEYS) takes each of its values, the others at base's."""
  measured: dict[tuple[int, int, int], dict[str, Any]] = {}
  table = []
  for letter, values in sweeps.items():
    for value in values:
      cfg = base.copy_and_resolve_references()
      section, key = SWEEP_KEYS[letter].split(".")
      cfg[section][key] = value
      gnb = (cfg.grpo.num_generations, cfg.sampler.max_new_tokens, cfg.data.prompts_per_step)
      if gnb not in measured:
        frozen = config_lib.freeze(cfg)
        measured[gnb] = bench_step(frozen, dataclasses.replace(args, pieces=False))
      r = measured[gnb]
      table.append({"vary": letter, "G": gnb[0], "N": gnb[1], "B": gnb[2],
                    "step_s": r["step_s"], "compile_s": r["compile_s"],
                    "completion_tokens_per_s": r["step_rollout_tokens_per_s"]})
  return table
