"""Completion log-probs with a prompt forward shared by its group equal a forward per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import logprobs as logprobs_lib
from grpo_jax import models
from grpo_jax import train_step as train_step_lib

B, G, T, N = 2, 3, 5, 6
TEMPERATURE = 0.7


def _model(remat=False):
  config = models.ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              attention_bias=True, remat=remat)
  return nnx.split(models.init(config, seed=1), nnx.Param)


def _rows():
  """B left-padded prompts (2 and 0 pad tokens), each repeated over its G rows; completions
  [B*G, N] whose masks end at different lengths (1 to N tokens)."""
  rng = np.random.RandomState(0)
  prompt_mask = (np.arange(T)[None] >= np.array([[2], [0]])).astype(np.int32)
  prompt_tokens = rng.randint(1, 64, (B, T)) * prompt_mask
  lengths = np.array([N, 3, 1, N, 4, 2])
  mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
  return dict(prompt_tokens=jnp.asarray(np.repeat(prompt_tokens, G, 0), jnp.int32),
              prompt_mask=jnp.asarray(np.repeat(prompt_mask, G, 0)),
              tokens=jnp.asarray(rng.randint(1, 64, (B * G, N)) * mask, jnp.int32),
              mask=jnp.asarray(mask))


def _full_forward_logps(graphdef, params, rows):
  """The definition: log softmax(logits / temperature) over prompt + completion, row by row."""
  tokens = jnp.concatenate([rows["prompt_tokens"], rows["tokens"]], axis=1)
  mask = jnp.concatenate([rows["prompt_mask"], rows["mask"]], axis=1)
  logits = nnx.merge(graphdef, params)(tokens, mask)[:, T - 1:-1]
  return logprobs_lib.token_logprobs(logits, rows["tokens"], temperature=TEMPERATURE)


@pytest.mark.parametrize("share", [G, 1])
def test_shared_prompt_logps_equal_a_full_forward(share):
  graphdef, params = _model()
  rows = _rows()
  got = train_step_lib.completion_logps(
      graphdef, params, rows["prompt_tokens"][::share], rows["prompt_mask"][::share],
      rows["tokens"], rows["mask"], TEMPERATURE)
  want = _full_forward_logps(graphdef, params, rows)
  valid = np.asarray(rows["mask"]) == 1
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_shared_prompt_gradients_equal_a_full_forward(remat):
  graphdef, params = _model(remat)
  rows = _rows()
  weights = jax.random.normal(jax.random.key(0), rows["mask"].shape) * rows["mask"]
  shared = lambda p: jnp.sum(weights * train_step_lib.rows_logps(graphdef, p, rows, G, TEMPERATURE))
  full = lambda p: jnp.sum(weights * _full_forward_logps(graphdef, p, rows))
  got, want = jax.jit(jax.grad(shared))(params), jax.jit(jax.grad(full))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


@pytest.mark.parametrize("rows, shards, share", [(6, 1, 3), (6, 2, 3), (4, 1, 1), (12, 2, 3),
                                                 (3, 1, 3), (2, 2, 1), (3, 2, 3)])
def test_rows_share_a_prompt_in_blocks_that_divide_groups_and_shards(rows, shards, share,
                                                                      monkeypatch):
  """rows_logps passes every S-th row's prompt: S = gcd(G, rows per shard), or gcd(G, rows)
  when the rows do not split evenly over the shards."""
  seen = []
  monkeypatch.setattr(train_step_lib, "completion_logps",
                      lambda graphdef, params, prompt_tokens, *rest: seen.append(prompt_tokens.shape[0]))
  tokens = jnp.zeros((rows, N), jnp.int32)
  train_step_lib.rows_logps(None, None, dict(prompt_tokens=tokens, prompt_mask=tokens,
                                             tokens=tokens, mask=tokens), G, 1.0, shards)
  assert seen == [rows // share]
