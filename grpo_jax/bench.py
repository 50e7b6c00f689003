"""Benchmarks: a whole GRPO step, grpo_jax next to TRL, how a step scales, the sampler.

  python -m grpo_jax.bench --what=step [--config=configs/x.py ...] [--steps=5 --warmup=1]
  python -m grpo_jax.bench --what=trl [--trl_venv=DIR | --trl_python=PYTHON]
  python -m grpo_jax.bench --what=scaling [--sweep_g=4,8,16 --sweep_n=32,64,128 --sweep_b=4,8,16]
  python -m grpo_jax.bench --what=sampler --model=demo --batch=8 --new_tokens=64 --prompt_len=16

Without --config, step / trl / scaling use the comparison setup, made in --workdir: a tiny
Qwen2 checkpoint (hidden 128, 4 layers, vocab 512: random weights, a tokenizer trained
locally), 64 arithmetic prompts, B = 8 prompts x G = 8 completions of N = 64 tokens with no
early EOS, beta 0.04, float32, and the reward `bench_trl.letter_reward`, the same as the TRL
side gets. Making it needs PyTorch (the TRL side's Python) and a repository checkout.

Each benchmark compiles once, timed on its own, then reports the median of --steps calls
after --warmup untimed ones, results ready. `step` times the compiled train step as the
trainer runs it, and also the pieces of a step compiled as separate programs from the same
pure functions: sampling (`sampler.generate_from`), old + reference log-probs
(`train_step.completion_logps`) and the update (the gradient of `loss.grpo_loss` over
them, then the optimizer, once per minibatch); "other" is what the whole step takes beyond
the pieces and the reward callback, and the host page faults per step (on CPU, temporaries
the kernel maps in afresh: see `cli.tune_host_malloc`). On accelerators (or given --peak_tflops / --mem_bw_gbs)
it also reports sampling against the memory-bandwidth bound and the update's MFU.
--model=qwen2.5-0.5b-shape swaps in random weights in Qwen2.5-0.5B's shape.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app
from absl import flags
from flax import nnx

from grpo_jax import bench_trl
from grpo_jax import cli
from grpo_jax import components
from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import loss as loss_lib
from grpo_jax import main as main_lib
from grpo_jax import mesh as mesh_lib
from grpo_jax import models
from grpo_jax import sampler
from grpo_jax import train_step as train_step_lib
from grpo_jax.errors import UserError, exit_on_user_error

QWEN_SHAPE = "qwen2.5-0.5b-shape"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_REWARD = "grpo_jax.bench_trl:letter_reward"
TRL_PINS = ("torch==2.13.0", "trl==1.16.0")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
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
  if spec not in ("demo", QWEN_SHAPE) and not os.path.isdir(spec):
    raise UserError(f"--model={spec!r} is not allowed: demo | {QWEN_SHAPE} | a local "
                    "Hugging Face checkpoint dir")


def load_model(spec: str, dtype: str, seed: int) -> models.Transformer:
  """The model named by --model."""
  check_model_spec(spec)
  if spec == QWEN_SHAPE:
    return models.init(qwen25_05b_shape(dtype), seed=seed)
  cfg = config_lib.defaults()
  cfg.model.path = "" if spec == "demo" else spec
  cfg.model.dtype = dtype
  cfg.train.seed = seed
  _, model = components.load_model(config_lib.freeze(cfg, num_devices=1))
  return model


def model_path(spec: str, dtype: str, workdir: str) -> str:
  """model.path for --model: "" for demo, a checkpoint dir written here for the Qwen shape."""
  check_model_spec(spec)
  if spec != QWEN_SHAPE:
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


def bench_sampler(model: models.Transformer, args: BenchArgs) -> dict[str, Any]:
  """Samples N tokens after [B, T] prompts (stop_at_eos=False: exactly N per row)."""
  b, t, n = args.batch, args.prompt_len, args.new_tokens
  key = jax.random.key(args.seed)
  tokens = jax.random.randint(key, (b, t), 0, model.config.vocab_size, jnp.int32)
  mask = jnp.ones((b, t), jnp.int32)
  settings = sampler.SampleConfig(max_new_tokens=n, stop_at_eos=False)
  graphdef, params = nnx.split(model)
  timing = time_compiled(
      sampler.generate_jit, (graphdef, params, tokens, mask, key), {"settings": settings}, args.steps,
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


def time_train_steps(trainer: main_lib.Trainer, steps: int, warmup: int) -> dict[str, Any]:
  """Runs warmup + steps train steps as the trainer does (batch made outside the timing,
  metrics fetched inside it). Each prompt shape compiles once, outside the timing."""
  compiled, compile_times, step_times, reward_times, faults = {}, [], [], [], []
  state = trainer.state
  for i in range(warmup + steps):
    batch = trainer.batch()
    shape = batch.prompt_tokens.shape
    if shape not in compiled:
      start = time.perf_counter()
      compiled[shape] = trainer.train_step.lower(state, batch).compile()
      compile_times.append(time.perf_counter() - start)
    start, reward_start, faults_start = (time.perf_counter(), trainer.scorer.seconds,
                                         _minor_faults())
    state, metrics = compiled[shape](state, batch)
    jax.device_get(metrics)
    if i >= warmup:
      step_times.append(time.perf_counter() - start)
      reward_times.append(trainer.scorer.seconds - reward_start)
      faults.append(_minor_faults() - faults_start)
  trainer.state = state
  return {"compile_s": compile_times[0], "compiles": len(compile_times),
          "step_s": statistics.median(step_times), "step_times_s": step_times,
          "reward_s": statistics.median(reward_times),
          "page_faults_per_step": statistics.median(faults)}


def _minor_faults() -> int:
  """Minor page faults of this process so far (memory the kernel had to map in afresh)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_step_pieces(trainer: main_lib.Trainer, batch: train_step_lib.Batch, steps: int,
                     warmup: int) -> dict[str, Any]:
  """Sampling, old + reference log-probs and the update, each compiled on its own.

  The update is the gradient of grpo_loss over one minibatch of R / M rows, then the
  optimizer; it is timed once and counted mu * M times.
  """
  cfg, graphdef, state = trainer.step_cfg, trainer.graphdef, trainer.state
  g, n = cfg.num_generations, cfg.sampling.max_new_tokens
  prompt_tokens = jnp.repeat(batch.prompt_tokens, g, axis=0)  # [R, T]
  prompt_mask = jnp.repeat(batch.prompt_mask, g, axis=0)
  key = jax.random.key(0)
  sample_args = (graphdef, state.params, batch.prompt_tokens, batch.prompt_mask, key)
  sample_static = {"settings": cfg.sampling, "samples_per_prompt": g}
  sampling = time_compiled(
      sampler.generate_jit, sample_args, sample_static, steps,
      vary=lambda a, i: (*a[:4], jax.random.fold_in(key, i)), warmup=warmup)
  out = sampler.generate_jit(*sample_args, **sample_static)
  seqs = dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=out.tokens,
              mask=out.mask)
  logps_of = functools.partial(train_step_lib.rows_logps, graphdef, num_generations=g,
                               temperature=cfg.sampling.temperature or 1.0)

  policies = {}  # the log-probs the step computes before its updates
  if cfg.needs_old_logps:
    policies["old"] = state.params
  if cfg.beta > 0:
    policies["ref"] = state.ref_params
  logps_jit = jax.jit(lambda ps, rows: {k: logps_of(p, rows) for k, p in ps.items()})
  logps_s = 0.0
  if policies:
    logps_s = time_compiled(logps_jit, (policies, seqs), {}, steps, vary=lambda a, i: a,
                            warmup=warmup).step_s
  logps = logps_jit(policies, seqs)

  @jax.jit
  def update(params, opt_state, rows):
    def loss_of(p):
      return loss_lib.grpo_loss(
          logps_of(p, rows), rows.get("old"), rows.get("ref"),
          rows["advs"], rows["loss_mask"], epsilon_low=cfg.epsilon_low,
          epsilon_high=cfg.epsilon_high, delta=cfg.delta, beta=cfg.beta, loss_type=cfg.loss_type,
          importance_sampling_level=cfg.importance_sampling_level, max_completion_length=n)[0]
    updates, opt_state = trainer.tx.update(jax.grad(loss_of)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  minibatch = prompt_tokens.shape[0] // cfg.minibatches
  rows = dict(seqs, loss_mask=out.mask, advs=jax.random.normal(key, (prompt_tokens.shape[0],)),
              **logps)
  rows = jax.tree.map(lambda x: x[:minibatch], rows)
  update_one = time_compiled(update, (state.params, state.opt_state, rows), {}, steps,
                             vary=lambda a, i: a, warmup=warmup)
  return {"sampling_s": sampling.step_s, "logps_s": logps_s, "logps_passes": len(policies),
          "update_s": update_one.step_s * cfg.num_iterations * cfg.minibatches}


def train_flops(cfg: config_lib.Config, num_params: int, prompt_len: int, logps_passes: int,
                row_shards: int = 1) -> int:
  """Model FLOPs of a step's log-prob passes (2 P per token) and updates (6 P per token, mu
  times), over the tokens the model runs on: each row's N - 1 completion tokens ahead of the
  last, and a prompt once per block of rows that share it (train_step.prompt_share)."""
  g, n = cfg.grpo.num_generations, cfg.sampler.max_new_tokens
  r = cfg.data.prompts_per_step * g
  micro_rows = r // (cfg.grpo.minibatches_per_iteration * cfg.train.grad_accum_steps)

  def tokens(rows_per_pass):
    share = train_step_lib.prompt_share(g, rows_per_pass, row_shards)
    return r * (n - 1) + r // share * prompt_len

  return (6 * num_params * cfg.grpo.num_iterations * tokens(micro_rows) +
          2 * num_params * logps_passes * tokens(r))


def bench_step(cfg: config_lib.Config, workdir: str, args: StepArgs) -> dict[str, Any]:
  """Times the compiled GRPO step of `cfg` (see the module docstring for the figures)."""
  cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, tensorboard=False))
  trainer = main_lib.Trainer(cfg, workdir)
  r = cfg.data.prompts_per_step * cfg.grpo.num_generations
  n = cfg.sampler.max_new_tokens
  result = time_train_steps(trainer, args.steps, args.warmup)
  # Before the pieces, which hold copies of the state of their own.
  result["peak_memory_bytes"], result["peak_memory_kind"] = peak_memory()
  batch = trainer.batch()
  t = batch.prompt_tokens.shape[1]
  params = trainer.state.params
  num_params = sum(x.size for x in jax.tree.leaves(params))
  result.update(rows=r, prompt_len=t, new_tokens=n, num_params=num_params,
                step_rollout_tokens_per_s=r * n / result["step_s"])
  if args.pieces:
    pieces = time_step_pieces(trainer, batch, args.steps, args.warmup)
    mu = cfg.grpo.num_iterations
    seq_tokens = r * (t + n)
    result.update(pieces)
    result["other_s"] = result["step_s"] - (pieces["sampling_s"] + pieces["logps_s"] +
                                            pieces["update_s"] + result["reward_s"])
    result["rollout_tokens_per_s"] = r * n / pieces["sampling_s"]
    result["train_tokens_per_s"] = mu * seq_tokens / pieces["update_s"]
    if args.mem_bw_gbs:
      model = nnx.merge(trainer.graphdef, params)
      result.update(bandwidth_bound(params, model.config, r, t, n, args.mem_bw_gbs,
                                    result["rollout_tokens_per_s"]))
    if args.peak_tflops:
      flops = train_flops(cfg, num_params, t, pieces["logps_passes"],
                          mesh_lib.row_shards(trainer.mesh))
      result["train_flops"] = flops
      result["mfu"] = flops / (pieces["update_s"] + pieces["logps_s"]) / (args.peak_tflops * 1e12)
  return result


# -- the comparison setup and the TRL side ---------------------------------------------------


def trl_matched(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of cfg with what the TRL side does not vary set to what it does: float32 without
  remat, exactly N tokens (no early EOS), the shared reward, prompts as plain text, one update
  per step with the "grpo" loss, no SFT warm start and no evaluation."""
  cfg = cfg.copy_and_resolve_references()
  cfg.model.dtype = cfg.model.param_dtype = "float32"
  cfg.model.remat = False
  cfg.sampler.stop_at_eos = False
  cfg.sampler.top_p, cfg.sampler.top_k = 1.0, 0
  cfg.rewards = SHARED_REWARD
  cfg.data.use_chat_template = False
  cfg.data.system_prompt = None
  cfg.grpo.num_iterations = cfg.grpo.minibatches_per_iteration = cfg.train.grad_accum_steps = 1
  cfg.grpo.loss_type, cfg.grpo.scale_rewards = "grpo", "group"
  cfg.grpo.epsilon_low, cfg.grpo.epsilon_high, cfg.grpo.delta = 0.2, None, None
  cfg.train.max_grad_norm = 1.0
  cfg.sft.num_steps = 0
  cfg.eval.num_prompts = 0
  return cfg


def torch_python(trl_venv: str | None, trl_python: str | None) -> str:
  """The Python of the TRL side: --trl_python, the one in --trl_venv (made and filled with
  TRL_PINS if need be), or this one when torch and trl import here."""
  if trl_python:
    return trl_python
  if trl_venv:
    return ensure_trl_venv(trl_venv)
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("trl") is None:
    raise UserError("torch and trl are not importable here; pass --trl_venv=DIR to install "
                    f"{' '.join(TRL_PINS)} (CPU) there, or --trl_python=PYTHON")
  return sys.executable


def _pip(python: str, *args: str) -> None:
  proc = subprocess.run([python, "-m", "pip", "install", "--quiet", *args], check=False)
  if proc.returncode:
    raise UserError(f"pip install {' '.join(args)} failed (exit {proc.returncode}); allowed: a "
                    "--trl_venv where pip can reach the package index, or --trl_python=PYTHON")


def ensure_trl_venv(venv: str) -> str:
  """venv's python, after making the virtualenv and installing CPU torch + TRL if they are
  missing (torch from the CPU wheel index, so no CUDA build is pulled)."""
  python = os.path.join(venv, "bin", "python")
  if not os.path.exists(python):
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  if subprocess.run([python, "-c", "import torch, trl"], capture_output=True,
                    check=False).returncode:
    torch_pin, trl_pin = TRL_PINS
    _pip(python, "--index-url", TORCH_CPU_INDEX, torch_pin)
    _pip(python, trl_pin, torch_pin)
  return python


def _side(python: str, *args: str) -> None:
  """Runs `python -m grpo_jax.bench_trl ARGS` from the repository root, offline, on CPU."""
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "CUDA_VISIBLE_DEVICES": ""}
  proc = subprocess.run([python, "-m", "grpo_jax.bench_trl", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"grpo_jax.bench_trl {args[0]} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-6000:]}")


def comparison_config(workdir: str, python: str) -> ml_collections.ConfigDict:
  """The comparison setup (module docstring), made in workdir unless already there."""
  if not (REPO_ROOT / "tests" / "tiny_hf.py").is_file():
    raise UserError(f"the comparison setup is made by tests/tiny_hf.py, which {REPO_ROOT} lacks;"
                    " allowed: run from a repository checkout, or pass --config")
  model_dir = os.path.join(workdir, "tiny_qwen2")
  data = os.path.join(workdir, "prompts.jsonl")
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    _side(python, "checkpoint", model_dir)
  bench_trl.write_prompts(data)
  prompts = [row["prompt"] for row in data_lib.load_rows("jsonl:" + data)]
  tokens, _ = data_lib.encode_prompts(components.load_tokenizer(model_dir), prompts, buckets=())
  cfg = config_lib.defaults()
  cfg.model.path = model_dir
  cfg.data.source = "jsonl:" + data
  cfg.data.num_eval_rows = 0
  cfg.data.prompt_buckets = (tokens.shape[1],)  # the longest prompt: TRL pads to its batch's
  cfg.data.prompts_per_step = 8  # B
  cfg.grpo.num_generations = 8  # G
  cfg.sampler.max_new_tokens = 64  # N
  cfg.grpo.beta = 0.04
  return trl_matched(cfg)


def run_trl_side(python: str, cfg: config_lib.Config, workdir: str, args: StepArgs,
                 threads: int) -> dict[str, Any]:
  """TRL's GRPOTrainer on cfg's checkpoint, prompts and sizes, in a child process."""
  if not cfg.data.source.startswith("jsonl:"):
    raise UserError(f"data.source={cfg.data.source!r} is not allowed with --what=trl: "
                    "jsonl:<file> (TRL reads the same file)")
  if not cfg.model.path:
    raise UserError("model.path='' is not allowed with --what=trl: a local Hugging Face "
                    "checkpoint dir (TRL loads the same one)")
  out = os.path.join(workdir, "trl.json")
  _side(python, "trl", f"--model={cfg.model.path}", f"--data={cfg.data.source[len('jsonl:'):]}",
        f"--out={out}", f"--workdir={os.path.join(workdir, 'trl_run')}",
        f"--num_generations={cfg.grpo.num_generations}",
        f"--prompts_per_step={cfg.data.prompts_per_step}",
        f"--new_tokens={cfg.sampler.max_new_tokens}", f"--beta={cfg.grpo.beta}",
        f"--learning_rate={cfg.train.learning_rate}", f"--temperature={cfg.sampler.temperature}",
        f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={threads}",
        f"--seed={cfg.train.seed}")
  with open(out) as fp:
    return json.load(fp)


# -- scaling -----------------------------------------------------------------------------------


def bench_scaling(base: ml_collections.ConfigDict, workdir: str, args: StepArgs,
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
        measured[gnb] = bench_step(frozen, os.path.join(workdir, "scaling_G{}_N{}_B{}".format(*gnb)),
                                   dataclasses.replace(args, pieces=False))
      r = measured[gnb]
      table.append({"vary": letter, "G": gnb[0], "N": gnb[1], "B": gnb[2],
                    "step_s": r["step_s"], "compile_s": r["compile_s"],
                    "completion_tokens_per_s": r["step_rollout_tokens_per_s"]})
  return table


# -- printing ----------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def _mb(x: float) -> str:
  return f"{x / 2**20:.0f} MiB"


def step_rows(r: dict[str, Any]) -> list[list[str]]:
  """The figures of bench_step as (what, value) rows."""
  rows = [["step (median)", f"{r['step_s']:.4f} s"],
          ["compile", f"{r['compile_s']:.2f} s"],
          ["completion tokens/s over the step", f"{r['step_rollout_tokens_per_s']:.0f}"],
          ["host page faults per step (median)", f"{r['page_faults_per_step']:.0f}"]]
  if "sampling_s" in r:
    rows += [["sampling", f"{r['sampling_s']:.4f} s"],
             [f"log-probs (old / reference: {r['logps_passes']} forward)",
              f"{r['logps_s']:.4f} s"],
             ["update (loss, backward, optimizer)", f"{r['update_s']:.4f} s"],
             ["reward callback", f"{r['reward_s']:.4f} s"],
             ["other (step - the above)", f"{r['other_s']:.4f} s"],
             ["rollout tokens/s (sampling)", f"{r['rollout_tokens_per_s']:.0f}"],
             ["training tokens/s (update)", f"{r['train_tokens_per_s']:.0f}"]]
  if "bound_ratio" in r:
    rows.append(["sampling / bandwidth bound",
                 f"{100 * r['bound_ratio']:.1f}% of {r['bound_tokens_per_s']:.0f} tokens/s"])
  if "mfu" in r:
    rows.append(["MFU (update + log-probs)", f"{100 * r['mfu']:.1f}%"])
  rows.append([f"peak memory ({r['peak_memory_kind']})", _mb(r["peak_memory_bytes"])])
  return rows


def comparison_rows(ours: dict[str, Any], trl: dict[str, Any]) -> list[list[str]]:
  def pair(name, a, b, fmt):
    return [name, fmt(a), fmt(b), f"{b / a:.1f}x" if a else ""]
  sec = lambda x: f"{x:.3f} s"
  ours_rest = ours["step_s"] - ours["sampling_s"] - ours["logps_s"]
  return [
      pair("step (median)", ours["step_s"], trl["step_s"], sec),
      pair("sampling", ours["sampling_s"], trl["sampling_s"], sec),
      pair("reference log-probs", ours["logps_s"], trl["logps_s"], sec),
      pair("rest (rewards, loss, backward, optimizer)", ours_rest, trl["rest_s"], sec),
      ["rollout tokens/s (sampling)", f"{ours['rollout_tokens_per_s']:.0f}",
       f"{trl['rollout_tokens_per_s']:.0f}", ""],
      ["peak memory (process RSS)", _mb(ours["peak_memory_bytes"]),
       _mb(trl["peak_memory_bytes"]), ""],
  ]


# -- the command line --------------------------------------------------------------------------


def define_flags() -> None:
  """The command line (defined only when this module runs as the program)."""
  cli.define_flags(workdir=True)
  flags.DEFINE_enum("what", "step", ["step", "trl", "scaling", "sampler"], "What to measure.")
  flags.DEFINE_string("model", None, f"demo | {QWEN_SHAPE} | a local Hugging Face checkpoint "
                      "dir; step/scaling: replaces model.path (sampler default: demo).")
  flags.DEFINE_integer("steps", 5, "Timed calls after the compile.", lower_bound=1)
  flags.DEFINE_integer("warmup", 1, "Untimed calls after the compile (step, trl, scaling).",
                       lower_bound=0)
  flags.DEFINE_float("peak_tflops", 989.0, "Peak dense FLOP/s of the accelerator in TFLOP/s for "
                     "MFU (H100/H200 SXM bf16 989, TPU v5e 197, TPU v4 275); used off CPU or "
                     "when given.", lower_bound=1e-9)
  flags.DEFINE_float("mem_bw_gbs", 3350.0, "Memory bandwidth in GB/s for the bandwidth bound "
                     "(H100 SXM 3350, H200 4800, TPU v5e 819, TPU v4 1200); used off CPU or "
                     "when given.", lower_bound=1e-9)
  flags.DEFINE_string("trl_venv", None, "trl: run the TRL side in this virtualenv, made and "
                      f"filled with {' '.join(TRL_PINS)} (CPU wheels) if need be.")
  flags.DEFINE_string("trl_python", None, "trl: the Python that runs the TRL side "
                      "(default: this one, when torch and trl import).")
  flags.DEFINE_integer("threads", len(os.sched_getaffinity(0)), "trl: torch threads of the "
                       "TRL side (XLA uses every core by default).", lower_bound=1)
  flags.DEFINE_list("sweep_g", ["4", "8", "16"], "scaling: values of G.")
  flags.DEFINE_list("sweep_n", ["32", "64", "128"], "scaling: values of N.")
  flags.DEFINE_list("sweep_b", ["4", "8", "16"], "scaling: values of B.")
  flags.DEFINE_integer("batch", 64, "sampler: B, sequences per call.", lower_bound=1)
  flags.DEFINE_integer("new_tokens", 512, "sampler: N, tokens generated per sequence.",
                       lower_bound=1)
  flags.DEFINE_integer("prompt_len", 64, "sampler: T, prompt tokens per sequence.", lower_bound=1)
  flags.DEFINE_enum("dtype", "bfloat16", list(config_lib.DTYPES), "sampler: parameter and "
                    "compute dtype.")
  flags.DEFINE_integer("seed", 0, "sampler: seed of the random weights and prompts.")
  flags.DEFINE_string("out", None, "Also write the results as JSON to this file.")


def _ratio_flags(f: flags.FlagValues) -> dict[str, float | None]:
  """--peak_tflops / --mem_bw_gbs where they mean something: off CPU, or given."""
  on_cpu = jax.devices()[0].platform == "cpu"
  return {name: getattr(f, name) if not on_cpu or f[name].present else None
          for name in ("peak_tflops", "mem_bw_gbs")}


def _config(f: flags.FlagValues, workdir: str, python: Callable[[], str]) -> ml_collections.ConfigDict:
  """--config (with --model applied), or the comparison setup."""
  if f.config is None:
    return comparison_config(workdir, python())
  cfg = f.config.copy_and_resolve_references()
  if f.model:
    cfg.model.path = model_path(f.model, cfg.model.dtype, workdir)
  return cfg


def _print_header(title: str, cfg: config_lib.Config) -> None:
  print(f"{title} on {device_name()}: model={cfg.model.path or 'demo'} "
        f"B={cfg.data.prompts_per_step} G={cfg.grpo.num_generations} "
        f"N={cfg.sampler.max_new_tokens} dtype={cfg.model.dtype} beta={cfg.grpo.beta}")


def run_sampler(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  del workdir
  spec = f.model or "demo"
  args = BenchArgs(batch=f.batch, prompt_len=f.prompt_len, new_tokens=f.new_tokens,
                   steps=f.steps, mem_bw_gbs=f.mem_bw_gbs, seed=f.seed)
  r = bench_sampler(load_model(spec, f.dtype, f.seed), args)
  print(f"sampler on {device_name()}: model={spec} B={f.batch} T={f.prompt_len} "
        f"N={f.new_tokens} dtype={f.dtype}")
  print(f"compile: {r['compile_s']:.2f} s")
  print(f"steady: {r['step_s']:.4f} s per call (median of {f.steps}), "
        f"{r['tokens_per_s']:.1f} tokens/s")
  print(f"bandwidth bound: {(r['weight_bytes'] + r['kv_bytes_mean']) / 1e6:.2f} MB "
        f"per decode step (weights {r['weight_bytes'] / 1e6:.2f} MB + KV cache "
        f"{r['kv_bytes_mean'] / 1e6:.2f} MB) / {f.mem_bw_gbs:g} GB/s = "
        f"{r['bound_tokens_per_s']:.1f} tokens/s; achieved {100 * r['bound_ratio']:.1f}% of it")
  return {"model": spec, "dtype": f.dtype, **dataclasses.asdict(args), **r}


def run_step(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  cfg = config_lib.freeze(_config(f, workdir, lambda: torch_python(f.trl_venv, f.trl_python)))
  args = StepArgs(steps=f.steps, warmup=f.warmup, **_ratio_flags(f))
  r = bench_step(cfg, os.path.join(workdir, "jax"), args)
  _print_header("GRPO step", cfg)
  print(markdown_table(["what", "value"], step_rows(r)))
  return {"config": dataclasses.asdict(cfg), **r}


def run_trl(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  python = torch_python(f.trl_venv, f.trl_python)
  base = _config(f, workdir, lambda: python)
  cfg = config_lib.freeze(trl_matched(base) if f.config is not None else base)
  args = StepArgs(steps=f.steps, warmup=f.warmup)
  ours = bench_step(cfg, os.path.join(workdir, "jax"), args)
  trl = run_trl_side(python, cfg, workdir, args, f.threads)
  _print_header("grpo_jax vs TRL", cfg)
  print(markdown_table(["", "grpo_jax", trl["trainer"], "TRL / grpo_jax"],
                       comparison_rows(ours, trl)))
  speedup = trl["step_s"] / ours["step_s"]
  print(f"grpo_jax is {speedup:.1f}x faster per step (median of {f.steps} steps after "
        f"{f.warmup} warm-up; torch threads: {trl['threads']})")
  return {"config": dataclasses.asdict(cfg), "grpo_jax": ours, "trl": trl, "speedup": speedup}


def run_scaling(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  base = _config(f, workdir, lambda: torch_python(f.trl_venv, f.trl_python))
  sweeps = {}
  for letter, values in (("G", f.sweep_g), ("N", f.sweep_n), ("B", f.sweep_b)):
    try:
      sweeps[letter] = [int(v) for v in values]
    except ValueError:
      raise UserError(f"--sweep_{letter.lower()}={','.join(values)} is not allowed: "
                      "comma-separated integers") from None
  table = bench_scaling(base, workdir, StepArgs(steps=f.steps, warmup=f.warmup), sweeps)
  _print_header("GRPO step scaling (base)", config_lib.freeze(base))
  print(markdown_table(
      ["vary", "G", "N", "B", "step (median)", "completion tokens/s", "compile"],
      [[r["vary"], r["G"], r["N"], r["B"], f"{r['step_s']:.3f} s",
        f"{r['completion_tokens_per_s']:.0f}", f"{r['compile_s']:.1f} s"] for r in table]))
  return {"config": dataclasses.asdict(config_lib.freeze(base)), "scaling": table}


BENCHMARKS = {"step": run_step, "trl": run_trl, "scaling": run_scaling, "sampler": run_sampler}


@exit_on_user_error
def run(f: flags.FlagValues) -> dict[str, Any]:
  """Runs the benchmark --what names, prints its figures, writes --out."""
  workdir = f.workdir or tempfile.mkdtemp(prefix="grpo_jax_bench_")
  os.makedirs(workdir, exist_ok=True)
  record = {"what": f.what, "device": device_name(), "date": time.strftime("%Y-%m-%d"),
            "load_before": os.getloadavg()[0], **BENCHMARKS[f.what](f, workdir),
            "load_after": os.getloadavg()[0]}  # 1-minute load averages: is the machine quiet?
  print(f"load average (1 min) {record['load_before']:.1f} before, {record['load_after']:.1f} "
        f"after, on {len(os.sched_getaffinity(0))} cores")
  if f.out:
    with open(f.out, "w") as fp:
      json.dump(record, fp, indent=2)
  return record


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
