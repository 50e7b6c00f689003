"""The key/value cache used by prefill and decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from grpo_jax.models.config import ModelConfig


@struct.dataclass
class KVCache:
  """Keys and values of every layer for S slots, and which slots hold a real token.

  k, v: L arrays [B, Hkv, S, K] in the compute dtype, one per layer (decoding writes and reads
  them in place; a stacked array's per-layer slices would be copies) with heads before slots
  (so attention reads them without a transpose); for a model with config.scan_layers, which
  never decodes (layer_scan.py), one stacked [L, B, Hkv, S, K] array each. valid: [B, S] bool.
  """

  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  valid: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
  """An empty cache of max_len slots: zeros, no slot valid."""
  shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  if config.scan_layers:
    zeros = lambda: jnp.zeros((config.num_layers, *shape), config.compute_dtype)
  else:
    zeros = lambda: tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
  return KVCache(
      k=zeros(),
      v=zeros(),
      valid=jnp.zeros((batch, max_len), jnp.bool_),
  )


def expand_cache(cache: KVCache, copies: int, max_len: int) -> KVCache:
  """The cache of P rows and S slots as P * copies rows (each row's copies consecutive, as
  jnp.repeat lays them out) of max_len >= S slots, the added slots empty.

  A prompt's keys and values, computed once, then serve every completion drawn from it.
  """
  extra = max_len - cache.valid.shape[1]
  grow = lambda x, slot_axis: jnp.pad(
      jnp.repeat(x, copies, axis=0),
      [(0, extra if axis == slot_axis else 0) for axis in range(x.ndim)])
  if isinstance(cache.k, tuple):
    return KVCache(k=tuple(grow(k, 2) for k in cache.k), v=tuple(grow(v, 2) for v in cache.v),
                   valid=grow(cache.valid, 1))
  stacked = lambda x: jax.vmap(lambda one: grow(one, 2))(x)  # [L, B, ...]: per layer
  return KVCache(k=stacked(cache.k), v=stacked(cache.v), valid=grow(cache.valid, 1))
