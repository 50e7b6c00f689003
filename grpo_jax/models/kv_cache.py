"""The key/value cache used by prefill and decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from grpo_jax.models.config import ModelConfig


@struct.dataclass
class KVCache:
  """Keys and values of every layer for S slots, and which slots hold a real token.

  k, v: [L, B, S, Hkv, K] in the compute dtype; valid: [B, S] bool.
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
  """An empty cache of max_len slots: zeros, no slot valid."""
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  return KVCache(
      k=jnp.zeros(shape, config.compute_dtype),
      v=jnp.zeros(shape, config.compute_dtype),
      valid=jnp.zeros((batch, max_len), jnp.bool_),
  )
