"""bench_decode: the decode-step measure runs on a tiny model and reports its keys."""

import math

from grpo_jax import bench_decode, models


def test_measure_reports_the_model_and_attention_figures():
  config = models.ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                              num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
  got = bench_decode.measure(config, batch=2, cache_len=40, fill=5, steps=2, repeats=1)
  assert set(got["attention_ms_per_token"]) == set(bench_decode.ATTENTION_FORMS)
  figures = [got["decode_ms_per_token"], *got["attention_ms_per_token"].values()]
  assert all(isinstance(x, float) and math.isfinite(x) for x in figures)
  assert (got["batch"], got["cache_len"], got["fill"]) == (2, 40, 5)
