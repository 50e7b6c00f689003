"""Rotary position embeddings (HF rotate_half convention), with optional llama3 or linear frequency
scaling; Gemma 3's sliding layers use their own base, unscaled."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig, *, local: bool = False) -> np.ndarray:
  """inv_freq_i = theta^(-2i/K) for i < K/2, then the configured scaling.

  local: the frequencies of sliding layers with their own base (config.rope_local_theta),
  which are never scaled. linear: every frequency divided by factor. llama3: wavelengths
  2*pi/inv_freq longer than orig/low_freq_factor are divided by factor, shorter than
  orig/high_freq_factor are kept, and those in between are interpolated with
  s = (orig/wavelen - low) / (high - low): (1 - s) * f / factor + s * f.
  """
  k = config.head_dim
  theta = config.rope_local_theta if local else config.rope_theta
  exponents = np.arange(0, k, 2, dtype=np.float32) / np.float32(k)
  inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
  if local or config.rope_scaling is None:
    return inv_freq
  s = dict(config.rope_scaling)
  if s["rope_type"] == "linear":
    return (inv_freq / np.float32(s["factor"])).astype(np.float32)
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  orig = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > orig / low, inv_freq / factor, inv_freq)
  smooth = (orig / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= orig / high) & (wavelen <= orig / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(config: ModelConfig, positions: jax.Array, *,
                local: bool = False) -> tuple[jax.Array, jax.Array]:
  """cos, sin of positions [B, T] times inverse frequencies, each [B, T, K] float32."""
  inv_freq = inverse_frequencies(config, local=local)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin over the last axis; x [B, T, H, K], cos/sin [B, T, K].

  rotate_half([x1, x2]) = [-x2, x1]. Computed in float32, returned in x's dtype.
  """
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
