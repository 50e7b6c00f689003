"""bench_attention: the compiled temporaries of attention with its backward pass, per form."""

from grpo_jax import bench_attention, models


def test_blockwise_temporaries_grow_about_linearly_where_xla_grows_quadratically():
  config = models.ModelConfig(family="llama", vocab_size=32, hidden_size=64, intermediate_size=32,
                              num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)
  small, large = (bench_attention.measure(config, batch=1, tokens=t)["attention_train_temp_bytes"]
                  for t in (512, 2048))
  assert set(small) == set(bench_attention.TRAINING_FORMS)
  assert large["xla"] > 12 * small["xla"]  # [T, T] scores: 16x the tokens squared
  assert large["blockwise"] < 6 * small["blockwise"]
  assert large["blockwise"] < large["xla"] / 8
