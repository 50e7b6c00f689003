"""Benchmarks: a whole GRPO step, grpo_jax next to TRL, how a step scales, the sampler.

  python -m grpo_jax.bench --what=step [--config=configs/x.py ...] [--steps=5 --warmup=1]
  python -m grpo_jax.bench --what=trl [--trl_venv=DIR | --trl_python=PYTHON]
  python -m grpo_jax.bench --what=scaling [--sweep_g=4,8,16 --sweep_n=32,64,128 --sweep_b=4,8,16]
  python -m grpo_jax.bench --what=sampler --model=demo --batch=8 --new_tokens=64 --prompt_len=16
  python -m grpo_jax.bench --what=sampler ... --lora_rank=16 --lora_base_dtype=nf4 --lora_rollout=low_rank
  python -m grpo_jax.bench --what=decode --model=demo --batch=64 --cache_len=4096 --fill=64
  python -m grpo_jax.bench --what=attention --model=qwen2.5-0.5b --batch=1 --prompt_len=8192

Without --config, step / trl / scaling use the comparison setup, made in --workdir: a tiny
Qwen2 checkpoint (hidden 128, 4 layers, vocab 512: random weights, a tokenizer trained
locally), 64 arithmetic prompts, B = 8 prompts x G = 8 completions of N = 64 tokens with no
early EOS, beta 0.04, float32, and the reward `bench_trl.letter_reward`, the same as the TRL
side gets. Making it needs PyTorch (the TRL side's Python) and a repository checkout.

Each benchmark compiles once, timed on its own, then reports the median of --steps calls
after --warmup untimed ones, results ready. `step` times the compiled train step as the
trainer runs it, and also its phases compiled as separate programs from train_step's own
functions: sampling (`sample`), old + reference log-probs (`reference_logps`) and the update
(`minibatch_update`, once per minibatch); "other" is what the whole step takes beyond the
phases and the reward callback, and the host page faults per step (on CPU, temporaries the
kernel maps in afresh: see `host_malloc.tune`). On accelerators (or given --peak_tflops /
--mem_bw_gbs) it also reports sampling against the memory-bandwidth bound and the update's
MFU. --model=qwen2.5-0.5b-shape swaps in random weights in Qwen2.5-0.5B's shape. `decode`
times one decode step of the model (a token in each of --batch rows) at --fill filled slots
of a --cache_len slot KV cache, and the step's attention alone in the "xla" form (every slot)
and the decoding one (the filled slots), "decode_ms_per_token" (bench_decode.py). The
measurements are in bench_step.py, the jax side of the TRL comparison in bench_compare.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
from absl import app
from absl import flags

from grpo_jax import bench_attention
from grpo_jax import bench_compare
from grpo_jax import bench_decode
from grpo_jax import bench_step
from grpo_jax import cli
from grpo_jax import config as config_lib
from grpo_jax import models
from grpo_jax.errors import UserError, exit_on_user_error


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
  """The step and its split, grpo_jax next to TRL, as table rows."""
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
  flags.DEFINE_enum("what", "step", ["step", "trl", "scaling", "sampler", "decode",
                                           "attention"],
                    "What to measure.")
  flags.DEFINE_string("model", None, f"demo | {bench_step.QWEN_SHAPE} | a local Hugging Face "
                      "checkpoint dir; step/scaling: replaces model.path (sampler default: demo).")
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
                      f"filled with {' '.join(bench_compare.TRL_PINS)} (CPU wheels) if need be.")
  flags.DEFINE_string("trl_python", None, "trl: the Python that runs the TRL side "
                      "(default: this one, when torch and trl import).")
  flags.DEFINE_integer("threads", len(os.sched_getaffinity(0)), "trl: torch threads of the "
                       "TRL side (XLA uses every core by default).", lower_bound=1)
  flags.DEFINE_list("sweep_g", ["4", "8", "16"], "scaling: values of G.")
  flags.DEFINE_list("sweep_n", ["32", "64", "128"], "scaling: values of N.")
  flags.DEFINE_list("sweep_b", ["4", "8", "16"], "scaling: values of B.")
  flags.DEFINE_integer("batch", 64, "sampler, decode, attention: B, sequences per call.", lower_bound=1)
  flags.DEFINE_integer("cache_len", 4096, "decode: L, slots of the KV cache.", lower_bound=1)
  flags.DEFINE_integer("fill", 64, "decode: P, filled slots of the cache (1..L).", lower_bound=1)
  flags.DEFINE_integer("new_tokens", 512, "sampler: N, tokens generated per sequence.",
                       lower_bound=1)
  flags.DEFINE_integer("prompt_len", 64, "sampler: T, prompt tokens per sequence; attention: T, "
                       "tokens per row.", lower_bound=1)
  flags.DEFINE_enum("dtype", "bfloat16", list(config_lib.DTYPES), "sampler, decode, attention: "
                    "parameter and compute dtype.")
  flags.DEFINE_integer("seed", 0, "sampler, decode: seed of the random weights and prompts.")
  flags.DEFINE_integer("lora_rank", 0, "sampler: LoRA adapters of this rank (alpha 2r) on "
                       "every projection; 0: none.", lower_bound=0)
  flags.DEFINE_enum("lora_base_dtype", "float32", list(config_lib.LORA_BASE_DTYPES),
                    "sampler: how the LoRA model's base is stored.")
  flags.DEFINE_enum("lora_rollout", "merged", ["merged", "low_rank"], "sampler: LoRA adapters "
                    "merged into the weights once per call (as training samples), or applied "
                    "at every new token.")
  flags.DEFINE_string("out", None, "Also write the results as JSON to this file.")


def _ratio_flags(f: flags.FlagValues) -> dict[str, float | None]:
  """--peak_tflops / --mem_bw_gbs where they mean something: off CPU, or given."""
  on_cpu = jax.devices()[0].platform == "cpu"
  return {name: getattr(f, name) if not on_cpu or f[name].present else None
          for name in ("peak_tflops", "mem_bw_gbs")}


def _config(f: flags.FlagValues, workdir: str,
            python: Callable[[], str]) -> ml_collections.ConfigDict:
  """--config (with --model applied), or the comparison setup."""
  if f.config is None:
    return bench_compare.comparison_config(workdir, python())
  cfg = f.config.copy_and_resolve_references()
  if f.model:
    cfg.model.path = bench_step.model_path(f.model, cfg.model.dtype, workdir)
  return cfg


def _print_header(title: str, cfg: config_lib.Config) -> None:
  print(f"{title} on {bench_step.device_name()}: model={cfg.model.path or 'demo'} "
        f"B={cfg.data.prompts_per_step} G={cfg.grpo.num_generations} "
        f"N={cfg.sampler.max_new_tokens} dtype={cfg.model.dtype} beta={cfg.grpo.beta}")


def run_sampler(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  del workdir
  spec = f.model or "demo"
  args = bench_step.BenchArgs(batch=f.batch, prompt_len=f.prompt_len, new_tokens=f.new_tokens,
                   steps=f.steps, mem_bw_gbs=f.mem_bw_gbs, seed=f.seed,
                   lora_rollout=f.lora_rollout)
  lora = None if not f.lora_rank else models.LoRASpec(
      rank=f.lora_rank, alpha=2.0 * f.lora_rank, base_dtype=f.lora_base_dtype)
  r = bench_step.bench_sampler(bench_step.load_model(spec, f.dtype, f.seed, lora), args)
  lora_text = "" if lora is None else (f" LoRA r={f.lora_rank} base={f.lora_base_dtype} "
                                       f"{f.lora_rollout}")
  print(f"sampler on {bench_step.device_name()}: model={spec} B={f.batch} T={f.prompt_len} "
        f"N={f.new_tokens} dtype={f.dtype}{lora_text}")
  print(f"compile: {r['compile_s']:.2f} s")
  print(f"steady: {r['step_s']:.4f} s per call (median of {f.steps}), "
        f"{r['tokens_per_s']:.1f} tokens/s")
  print(f"bandwidth bound: {(r['weight_bytes'] + r['kv_bytes_mean']) / 1e6:.2f} MB "
        f"per decode step (weights {r['weight_bytes'] / 1e6:.2f} MB + KV cache "
        f"{r['kv_bytes_mean'] / 1e6:.2f} MB) / {f.mem_bw_gbs:g} GB/s = "
        f"{r['bound_tokens_per_s']:.1f} tokens/s; achieved {100 * r['bound_ratio']:.1f}% of it")
  return {"model": spec, "dtype": f.dtype, "lora_rank": f.lora_rank,
          "lora_base_dtype": f.lora_base_dtype, **dataclasses.asdict(args), **r}


def run_step(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  python = lambda: bench_compare.torch_python(f.trl_venv, f.trl_python)
  cfg = config_lib.freeze(_config(f, workdir, python))
  args = bench_step.StepArgs(steps=f.steps, warmup=f.warmup, **_ratio_flags(f))
  r = bench_step.bench_step(cfg, args)
  _print_header("GRPO step", cfg)
  print(markdown_table(["what", "value"], step_rows(r)))
  return {"config": dataclasses.asdict(cfg), **r}


def run_trl(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  python = bench_compare.torch_python(f.trl_venv, f.trl_python)
  base = _config(f, workdir, lambda: python)
  cfg = config_lib.freeze(bench_compare.trl_matched(base) if f.config is not None else base)
  args = bench_step.StepArgs(steps=f.steps, warmup=f.warmup)
  ours = bench_step.bench_step(cfg, args)
  trl = bench_compare.run_trl_side(python, cfg, workdir, args, f.threads)
  _print_header("grpo_jax vs TRL", cfg)
  print(markdown_table(["", "grpo_jax", trl["trainer"], "TRL / grpo_jax"],
                       comparison_rows(ours, trl)))
  speedup = trl["step_s"] / ours["step_s"]
  print(f"grpo_jax is {speedup:.1f}x faster per step (median of {f.steps} steps after "
        f"{f.warmup} warm-up; torch threads: {trl['threads']})")
  return {"config": dataclasses.asdict(cfg), "grpo_jax": ours, "trl": trl, "speedup": speedup}


def run_scaling(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  base = _config(f, workdir, lambda: bench_compare.torch_python(f.trl_venv, f.trl_python))
  sweeps = {}
  for letter, values in (("G", f.sweep_g), ("N", f.sweep_n), ("B", f.sweep_b)):
    try:
      sweeps[letter] = [int(v) for v in values]
    except ValueError:
      raise UserError(f"--sweep_{letter.lower()}={','.join(values)} is not allowed: "
                      "comma-separated integers") from None
  table = bench_step.bench_scaling(base, bench_step.StepArgs(steps=f.steps, warmup=f.warmup),
                                   sweeps)
  _print_header("GRPO step scaling (base)", config_lib.freeze(base))
  print(markdown_table(
      ["vary", "G", "N", "B", "step (median)", "completion tokens/s", "compile"],
      [[r["vary"], r["G"], r["N"], r["B"], f"{r['step_s']:.3f} s",
        f"{r['completion_tokens_per_s']:.0f}", f"{r['compile_s']:.1f} s"] for r in table]))
  return {"config": dataclasses.asdict(config_lib.freeze(base)), "scaling": table}


def run_decode(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  del workdir
  if f.fill > f.cache_len:
    raise UserError(f"--fill={f.fill} is not allowed: at most --cache_len={f.cache_len}")
  spec = f.model or "demo"
  config = bench_step.load_model(spec, f.dtype, f.seed).config
  steps = f.steps if f["steps"].present else 32  # decode steps per timed loop
  r = bench_decode.measure(config, batch=f.batch, cache_len=f.cache_len, fill=f.fill,
                           steps=steps, seed=f.seed)
  print(f"decode step on {bench_step.device_name()}: model={spec} B={f.batch} "
        f"L={f.cache_len} P={f.fill} dtype={f.dtype} attention={config.attention}")
  forms = ", ".join(f"{k} {v:.3f} ms" for k, v in r["attention_ms_per_token"].items())
  print(f"decode_ms_per_token: {r['decode_ms_per_token']:.3f} (attention alone: {forms})")
  return {"model": spec, "dtype": f.dtype, "attention": config.attention, **r}


def run_attention(f: flags.FlagValues, workdir: str) -> dict[str, Any]:
  del workdir
  spec = f.model or "demo"
  config = bench_step.load_model(spec, f.dtype, f.seed).config
  r = bench_attention.measure(config, batch=f.batch, tokens=f.prompt_len)
  print(f"attention with its backward pass, compiled on {bench_step.device_name()}: "
        f"model={spec} B={f.batch} T={f.prompt_len} dtype={f.dtype} (compiler figures)")
  print("temporaries: " + ", ".join(f"{k} {v / 2**20:.0f} MiB"
                                    for k, v in r["attention_train_temp_bytes"].items()))
  return {"model": spec, "dtype": f.dtype, **r}


BENCHMARKS = {"step": run_step, "trl": run_trl, "scaling": run_scaling, "sampler": run_sampler,
              "decode": run_decode, "attention": run_attention}


@exit_on_user_error
def run(f: flags.FlagValues) -> dict[str, Any]:
  """Runs the benchmark --what names, prints its figures, writes --out."""
  workdir = f.workdir or tempfile.mkdtemp(prefix="grpo_jax_bench_")
  os.makedirs(workdir, exist_ok=True)
  record = {"what": f.what, "device": bench_step.device_name(), "date": time.strftime("%Y-%m-%d"),
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
