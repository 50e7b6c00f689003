"""Token log-probs: full and chunked forms, values, gradients and memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import logprobs

B, T, D, V = 2, 7, 16, 53


def _inputs(dtype=jnp.float32, seed=0):
  k_h, k_w, k_t = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(k_h, (B, T, D), dtype)
  w = (jax.random.normal(k_w, (D, V)) / 2).astype(dtype)
  targets = jax.random.randint(k_t, (B, T), 0, V)
  return hidden, w, targets


def _full(hidden, w, targets, temperature):
  logits_btv = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
  return logprobs.token_logprobs(logits_btv, targets, temperature=temperature)


def test_token_logprobs_match_torch():
  torch = pytest.importorskip("torch")
  hidden, w, targets = _inputs()
  logits = np.asarray(jnp.einsum("btd,dv->btv", hidden, w))
  expected = torch.log_softmax(torch.tensor(logits) / 0.7, -1).gather(
      -1, torch.tensor(np.asarray(targets))[..., None])[..., 0]
  got = logprobs.token_logprobs(jnp.asarray(logits), targets, temperature=0.7)
  np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_token_logprobs_are_float32_from_bfloat16():
  hidden, w, targets = _inputs()
  logits = jnp.einsum("btd,dv->btv", hidden, w).astype(jnp.bfloat16)
  got = logprobs.token_logprobs(logits, targets)
  assert got.dtype == jnp.float32
  expected = logprobs.token_logprobs(logits.astype(jnp.float32), targets)
  np.testing.assert_array_equal(got, expected)
  # Probabilities over the whole vocabulary sum to one.
  every_bv = logprobs.token_logprobs(logits[:, :1].repeat(V, 1), jnp.arange(V)[None].repeat(B, 0))
  np.testing.assert_allclose(jnp.exp(every_bv).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, B * T, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_full_values_and_gradients(chunk_size, temperature):
  hidden, w, targets = _inputs()
  g_bt = jax.random.normal(jax.random.key(9), (B, T))
  full = lambda h, w: jnp.sum(g_bt * _full(h, w, targets, temperature))
  chunked = lambda h, w: jnp.sum(g_bt * logprobs.chunked_token_logprobs(
      h, w, targets, temperature=temperature, chunk_size=chunk_size))
  np.testing.assert_allclose(
      logprobs.chunked_token_logprobs(hidden, w, targets, temperature=temperature,
                                      chunk_size=chunk_size),
      _full(hidden, w, targets, temperature), atol=1e-5, rtol=0)
  expected = jax.grad(full, (0, 1))(hidden, w)
  got = jax.jit(jax.grad(chunked, (0, 1)))(hidden, w)
  for e, g in zip(expected, got):
    assert g.shape == e.shape and g.dtype == e.dtype
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size, temperature, cap", [(1, 1.0, None), (5, 0.7, None),
                                                         (4, 1.0, 2.0), (100, 0.7, 2.0)])
def test_chunked_entropy_matches_the_full_softmax(chunk_size, temperature, cap):
  hidden, w, targets = _inputs()
  logps, entropy = logprobs.chunked_token_logprobs_and_entropy(
      hidden, w, targets, temperature=temperature, soft_cap=cap, chunk_size=chunk_size)
  logits_btv = logprobs.soft_cap(jnp.einsum("btd,dv->btv", hidden, w), cap) / temperature
  log_p = jax.nn.log_softmax(logits_btv, axis=-1)
  assert entropy.dtype == jnp.float32 and entropy.shape == (B, T)
  np.testing.assert_allclose(entropy, -jnp.sum(jnp.exp(log_p) * log_p, -1), atol=1e-5, rtol=0)
  np.testing.assert_allclose(logps, logprobs.chunked_token_logprobs(
      hidden, w, targets, temperature=temperature, soft_cap=cap, chunk_size=chunk_size),
                             atol=1e-6, rtol=0)


def test_chunked_entropy_carries_no_gradient():
  hidden, w, targets = _inputs()
  g_bt = jax.random.normal(jax.random.key(9), (B, T))
  both = lambda h, w: sum(jnp.sum(g_bt * x) for x in logprobs.chunked_token_logprobs_and_entropy(
      h, w, targets, chunk_size=4))
  alone = lambda h, w: jnp.sum(g_bt * logprobs.chunked_token_logprobs(h, w, targets,
                                                                      chunk_size=4))
  want = jax.grad(alone, (0, 1))(hidden, w)
  for got, expected in zip(jax.jit(jax.grad(both, (0, 1)))(hidden, w), want):
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_chunked_bfloat16_inputs():
  hidden, w, targets = _inputs(jnp.bfloat16)
  got = logprobs.chunked_token_logprobs(hidden, w, targets, chunk_size=3)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _full(hidden, w, targets, 1.0), atol=1e-5, rtol=0)
  grads = jax.grad(lambda h, w: logprobs.chunked_token_logprobs(h, w, targets).sum(),
                   (0, 1))(hidden, w)
  expected = jax.grad(lambda h, w: _full(h.astype(jnp.float32), w.astype(jnp.float32),
                                         targets, 1.0).sum(), (0, 1))(hidden, w)
  for e, g in zip(expected, grads):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), e, atol=2e-2, rtol=2e-2)


def test_chunked_memory_stays_below_a_quarter_of_the_logits():
  """Qwen2-0.5B-sized unembedding, B*T = 8192: compiled only, nothing allocated."""
  b, t, d, v = 8, 1024, 896, 151936
  full_logits_bytes = b * t * v * 4
  args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.int32))

  def temp_bytes(fn):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

  chunked = lambda h, w, tg: logprobs.chunked_token_logprobs(h, w, tg)
  chunked_sum = lambda h, w, tg: chunked(h, w, tg).sum()
  assert temp_bytes(chunked) <= full_logits_bytes / 4
  assert temp_bytes(jax.value_and_grad(chunked_sum, (0, 1))) <= full_logits_bytes / 4
  with_entropy = lambda h, w, tg: sum(
      x.sum() for x in logprobs.chunked_token_logprobs_and_entropy(h, w, tg))
  assert temp_bytes(jax.value_and_grad(with_entropy, (0, 1))) <= full_logits_bytes / 4
  # The measure sees the logits when they do exist.
  full_sum = lambda h, w, tg: _full(h, w, tg, 1.0).sum()
  assert temp_bytes(jax.value_and_grad(full_sum, (0, 1))) >= full_logits_bytes
