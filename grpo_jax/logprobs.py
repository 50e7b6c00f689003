"""Per-token log-probabilities log softmax(cap(h W) / temperature)[target], in float32, and
the entropy of that softmax.

cap is the identity, or Gemma's final soft cap l -> c * tanh(l / c).

`chunked_token_logprobs` (and `chunked_token_logprobs_and_entropy`) never hold more than
C x V logits (C tokens per chunk), in the forward pass or the backward one: with V around
150k the full [B, T, V] float32 logits would be the largest buffer of the whole train step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 512


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap), elementwise (a smooth clip to (-cap, cap)); x itself when cap is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def token_logprobs(logits: jax.Array, targets: jax.Array, *,
                   temperature: float = 1.0) -> jax.Array:
  """log_softmax(logits / temperature) at targets: [B, T, V], [B, T] -> [B, T] float32."""
  scaled_btv = logits.astype(jnp.float32) / temperature
  picked_bt = jnp.take_along_axis(scaled_btv, targets[..., None], axis=-1)[..., 0]
  return picked_bt - jax.nn.logsumexp(scaled_btv, axis=-1)


def _chunk_logits(h_cd: jax.Array, w_dv: jax.Array, temperature: float,
                  cap: float | None) -> jax.Array:
  """[C, V] float32 logits cap(h W) / temperature of one chunk: matmul in the input dtype, f32
  accumulation."""
  return soft_cap(jnp.dot(h_cd, w_dv, preferred_element_type=jnp.float32), cap) / temperature


def _forward(h_chunks, w_dv, targets_chunks, temperature, cap, with_entropy):
  """(log-probs, logsumexp, entropy or None), each [num_chunks, C], from h_chunks
  [num_chunks, C, D]; entropy = logsumexp - sum_v softmax_v * logit_v."""

  def one_chunk(xs):
    h_cd, targets_c = xs
    logits_cv = _chunk_logits(h_cd, w_dv, temperature, cap)
    lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
    picked_c = jnp.take_along_axis(logits_cv, targets_c[:, None], axis=-1)[:, 0]
    if not with_entropy:
      return picked_c - lse_c, lse_c
    probs_cv = jnp.exp(logits_cv - lse_c[:, None])
    return picked_c - lse_c, lse_c, lse_c - jnp.sum(probs_cv * logits_cv, axis=-1)

  out = jax.lax.map(one_chunk, (h_chunks, targets_chunks))
  return out if with_entropy else (*out, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(h_chunks, w_dv, targets_chunks, temperature, cap, with_entropy):
  """(log-probs, entropy or None), [num_chunks, C]; the entropy has no gradient."""
  logps_chunks, _, entropy_chunks = _forward(h_chunks, w_dv, targets_chunks, temperature, cap,
                                             with_entropy)
  return logps_chunks, entropy_chunks


def _chunked_fwd(h_chunks, w_dv, targets_chunks, temperature, cap, with_entropy):
  logps_chunks, lse_chunks, entropy_chunks = _forward(h_chunks, w_dv, targets_chunks,
                                                      temperature, cap, with_entropy)
  return (logps_chunks, entropy_chunks), (h_chunks, w_dv, targets_chunks, lse_chunks)


def _chunked_bwd(temperature, cap, with_entropy, residuals, g):
  """d logp_c / d (h W)_cv = (onehot(target_c) - softmax_cv) / temperature * cap'_cv, per chunk,
  where cap' = 1 - (cap(h W) / cap)^2 (1 without a cap). The entropy's cotangent is dropped
  (the public functions return it under stop_gradient).

  The logits are recomputed chunk by chunk; d W is accumulated in float32.
  """
  del with_entropy
  g_chunks = g[0]
  h_chunks, w_dv, targets_chunks, lse_chunks = residuals
  vocab = w_dv.shape[1]

  def one_chunk(dw_dv, xs):
    h_cd, targets_c, lse_c, g_c = xs
    logits_cv = _chunk_logits(h_cd, w_dv, temperature, cap)
    probs_cv = jnp.exp(logits_cv - lse_c[:, None])
    onehot_cv = jax.nn.one_hot(targets_c, vocab, dtype=jnp.float32)
    dlogits_cv = (onehot_cv - probs_cv) * (g_c / temperature)[:, None]
    if cap is not None:
      dlogits_cv = dlogits_cv * (1 - jnp.square(logits_cv * (temperature / cap)))
    dh_cd = jnp.dot(dlogits_cv.astype(w_dv.dtype), w_dv.T, preferred_element_type=jnp.float32)
    dw_dv = dw_dv + jnp.dot(h_cd.T, dlogits_cv.astype(h_cd.dtype),
                            preferred_element_type=jnp.float32)
    return dw_dv, dh_cd.astype(h_cd.dtype)

  dw_dv, dh_chunks = jax.lax.scan(
      one_chunk, jnp.zeros(w_dv.shape, jnp.float32), (h_chunks, targets_chunks, lse_chunks, g_chunks))
  return dh_chunks, dw_dv.astype(w_dv.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _chunked_over_tokens(hidden, w_unembed, targets, temperature, soft_cap, chunk_size,
                         with_entropy):
  """(log-probs, entropy or None) [B, T] of hidden [B, T, D], B*T split into chunks of C."""
  lead = targets.shape
  h_flat = hidden.reshape(-1, hidden.shape[-1])  # [B*T, D]
  total = h_flat.shape[0]
  chunk = max(1, min(chunk_size, total))
  pad = -total % chunk
  h_chunks = jnp.pad(h_flat, ((0, pad), (0, 0))).reshape(-1, chunk, h_flat.shape[1])
  targets_chunks = jnp.pad(targets.reshape(-1), (0, pad)).reshape(-1, chunk)
  cap = None if soft_cap is None else float(soft_cap)
  out = _chunked(h_chunks, w_unembed, targets_chunks, float(temperature), cap, with_entropy)
  unchunk = lambda x: None if x is None else x.reshape(-1)[:total].reshape(lead)
  return unchunk(out[0]), unchunk(out[1])


def chunked_token_logprobs(hidden: jax.Array, w_unembed: jax.Array, targets: jax.Array, *,
                           temperature: float = 1.0, soft_cap: float | None = None,
                           chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """token_logprobs(cap(hidden @ w_unembed), targets) without [B, T, V] logits.

  Args:
    hidden: [B, T, D] final-norm hidden states, any float dtype.
    w_unembed: [D, V] output projection (a tied model passes embedding.T).
    targets: [B, T] int token ids.
    temperature: a Python float (static).
    soft_cap: None, or c of the final soft cap l -> c * tanh(l / c) (a static Python float).
    chunk_size: C, tokens per chunk; B*T is padded up to a multiple of it.

  Returns:
    [B, T] float32 log-probs. Differentiable in hidden and w_unembed; the
    backward pass is chunked the same way.
  """
  return _chunked_over_tokens(hidden, w_unembed, targets, temperature, soft_cap, chunk_size,
                              with_entropy=False)[0]


def chunked_token_logprobs_and_entropy(
    hidden: jax.Array, w_unembed: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
    soft_cap: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[jax.Array, jax.Array]:
  """chunked_token_logprobs, and the entropy -sum_v p_v log p_v [B, T] float32 of
  p = softmax(cap(hidden @ w_unembed) / temperature) at each position, from the same C x V
  logit chunks. The entropy is under stop_gradient: the log-probs' gradients are those of
  chunked_token_logprobs."""
  logps, entropy = _chunked_over_tokens(hidden, w_unembed, targets, temperature, soft_cap,
                                        chunk_size, with_entropy=True)
  return logps, jax.lax.stop_gradient(entropy)
