"""Benchmarks of the compiled entry points: compile time apart from steady speed.

  python -m grpo_jax.bench --what=sampler --model=demo --batch=8 --new_tokens=64 \
      --prompt_len=16 --dtype=float32 --steps=3 [--mem_bw_gbs=3350] [--out=FILE.json]

--model is "demo" (the built-in demo model), "qwen2.5-0.5b-shape" (random weights
in Qwen2.5-0.5B's shape, nothing downloaded) or a local Hugging Face checkpoint
dir. Each benchmark lowers and compiles its function once (timed on its own),
then runs it --steps times with results ready and reports the median.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from flax import nnx

from grpo_jax import cli
from grpo_jax import components
from grpo_jax import config as config_lib
from grpo_jax import models
from grpo_jax import sampler
from grpo_jax.errors import UserError, exit_on_user_error

QWEN_SHAPE = "qwen2.5-0.5b-shape"


def qwen25_05b_shape(dtype: str) -> models.ModelConfig:
  """Qwen2.5-0.5B's architecture (the weights are drawn at random)."""
  return models.ModelConfig(
      family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
      num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
      tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768,
      eos_token_ids=(151643,), pad_token_id=151643, dtype=dtype, param_dtype=dtype)


def load_model(spec: str, dtype: str, seed: int) -> models.Transformer:
  """The model named by --model."""
  if spec == QWEN_SHAPE:
    return models.init(qwen25_05b_shape(dtype), seed=seed)
  if spec != "demo" and not os.path.isdir(spec):
    raise UserError(f"--model={spec!r} is not allowed: demo | {QWEN_SHAPE} | a local "
                    "Hugging Face checkpoint dir")
  cfg = config_lib.defaults()
  cfg.model.path = "" if spec == "demo" else spec
  cfg.model.dtype = dtype
  cfg.train.seed = seed
  _, model = components.load_model(config_lib.freeze(cfg, num_devices=1))
  return model


@dataclasses.dataclass(frozen=True)
class Timing:
  compile_s: float  # lower + compile
  step_s: float  # median over the timed calls, results ready


def time_compiled(jitted, args: tuple[Any, ...], static: dict[str, Any], steps: int,
                  vary: Callable[[tuple[Any, ...], int], tuple[Any, ...]]) -> Timing:
  """Compiles jitted(*args, **static) once, then times `steps` calls of vary(args, i)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args, **static).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(steps):
    call_args = vary(args, i)
    start = time.perf_counter()
    jax.block_until_ready(compiled(*call_args))
    times.append(time.perf_counter() - start)
  return Timing(compile_s=compile_s, step_s=statistics.median(times))


def decode_bytes(params: nnx.State, config: models.ModelConfig, batch: int,
                 cache_len: float) -> tuple[int, float]:
  """(weight bytes, KV-cache bytes) one decode step reads, the cache holding cache_len slots.

  Every parameter counts (an untied input embedding is in fact only gathered).
  """
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  kv_bytes = (2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.head_dim *
              config.compute_dtype.itemsize)
  return weight_bytes, kv_bytes


@dataclasses.dataclass(frozen=True)
class BenchArgs:
  """What every benchmark reads from the command line."""

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
  # Decode step s (1..N-1) attends to T + s slots: T + N/2 on average.
  weight_bytes, kv_bytes = decode_bytes(params, model.config, b, t + n / 2)
  bound_step_s = (weight_bytes + kv_bytes) / (args.mem_bw_gbs * 1e9)
  tokens_per_s = b * n / timing.step_s
  bound_tokens_per_s = b / bound_step_s
  return {
      "compile_s": timing.compile_s,
      "step_s": timing.step_s,
      "tokens_per_s": tokens_per_s,
      "weight_bytes": weight_bytes,
      "kv_bytes_mean": kv_bytes,
      "bound_decode_step_s": bound_step_s,
      "bound_tokens_per_s": bound_tokens_per_s,
      "bound_ratio": tokens_per_s / bound_tokens_per_s,
  }


BENCHMARKS = {"sampler": bench_sampler}


def define_flags() -> None:
  """The command line (defined only when this module runs as the program)."""
  flags.DEFINE_enum("what", "sampler", list(BENCHMARKS), "What to measure.")
  flags.DEFINE_string("model", "demo", f"demo | {QWEN_SHAPE} | a local Hugging Face checkpoint dir.")
  flags.DEFINE_integer("batch", 64, "B: sequences per call.", lower_bound=1)
  flags.DEFINE_integer("new_tokens", 512, "N: tokens generated per sequence.", lower_bound=1)
  flags.DEFINE_integer("prompt_len", 64, "T: prompt tokens per sequence.", lower_bound=1)
  flags.DEFINE_enum("dtype", "bfloat16", list(config_lib.DTYPES), "Parameter and compute dtype.")
  flags.DEFINE_integer("steps", 3, "Timed calls after the compile.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompts.")
  flags.DEFINE_float("mem_bw_gbs", 3350.0, "Memory bandwidth in GB/s for the bandwidth bound "
                     "(H100 SXM 3350, H200 4800, TPU v5e 819, TPU v4 1200).", lower_bound=1e-9)
  flags.DEFINE_string("out", None, "Also write the results as JSON to this file.")
  flags.DEFINE_bool("debug", False, "Show Python tracebacks for user errors.")


@exit_on_user_error
def run(f: flags.FlagValues) -> dict[str, Any]:
  """Runs the benchmark --what names, prints its figures, writes --out."""
  model = load_model(f.model, f.dtype, f.seed)
  args = BenchArgs(batch=f.batch, prompt_len=f.prompt_len, new_tokens=f.new_tokens,
                   steps=f.steps, mem_bw_gbs=f.mem_bw_gbs, seed=f.seed)
  results = BENCHMARKS[f.what](model, args)
  record = {"what": f.what, "model": f.model, "dtype": f.dtype,
            "device": str(jax.devices()[0]), **dataclasses.asdict(args), **results}
  print(f"{f.what} on {record['device']}: model={f.model} B={f.batch} T={f.prompt_len} "
        f"N={f.new_tokens} dtype={f.dtype}")
  print(f"compile: {results['compile_s']:.2f} s")
  print(f"steady: {results['step_s']:.4f} s per call (median of {f.steps}), "
        f"{results['tokens_per_s']:.1f} tokens/s")
  print(f"bandwidth bound: {(results['weight_bytes'] + results['kv_bytes_mean']) / 1e6:.2f} MB "
        f"per decode step (weights {results['weight_bytes'] / 1e6:.2f} MB + KV cache "
        f"{results['kv_bytes_mean'] / 1e6:.2f} MB) / {f.mem_bw_gbs:g} GB/s = "
        f"{results['bound_tokens_per_s']:.1f} tokens/s; achieved "
        f"{100 * results['bound_ratio']:.1f}% of it")
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
