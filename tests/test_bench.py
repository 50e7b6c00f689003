"""Benchmark entry point: the sampler benchmark's figures, the Qwen2.5-0.5B shape, errors."""

import subprocess
import sys

import jax
import pytest
from flax import nnx

from grpo_jax import bench
from grpo_jax import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_sampler_bench_counts_bytes_and_times_steady_calls():
  config = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  model = models.init(config)
  args = bench.BenchArgs(batch=2, prompt_len=4, new_tokens=6, steps=2, mem_bw_gbs=10.0, seed=0)
  r = bench.bench_sampler(model, args)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert r["weight_bytes"] == 4 * num_params
  assert r["kv_bytes_mean"] == 2 * 2 * 2 * (4 + 6 / 2) * 2 * 8 * 4  # k,v x L x B x slots x Hkv x K x f32
  assert r["compile_s"] > 0 and r["step_s"] > 0
  assert r["bound_ratio"] == pytest.approx(r["tokens_per_s"] / r["bound_tokens_per_s"])


def test_qwen_shape_has_transformers_parameter_count():
  config = bench.qwen25_05b_shape("bfloat16")
  ours = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: models.init(config)))))
  with torch.device("meta"):
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config.to_hf()))
  assert ours == sum(p.numel() for p in hf.parameters())


def test_bad_model_flag_is_one_error_line():
  proc = subprocess.run([sys.executable, "-m", "grpo_jax.bench", "--model=/no/such/dir"],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: --model='/no/such/dir' is not allowed: demo | qwen2.5-0.5b-shape | "
                    "a local Hugging Face checkpoint dir"], proc.stderr
  assert "Traceback" not in proc.stderr
