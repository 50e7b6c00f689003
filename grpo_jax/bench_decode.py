"""What one decode step costs at a fill of the KV cache, for caches of any size.

`measure(config, batch=B, cache_len=L, fill=P)` times the sampler's decode step (one new
token in each of the B rows, read against the P filled slots of an L-slot cache) as the
model runs it, and its attention alone in the "xla" form (all L slots) and the blockwise
form of `attention.decode_attend` (the filled slots only), each in a compiled
`lax.fori_loop` of decode steps like the sampler's (seconds_per_step). The slot is a traced
value, as in the sampler, so the program is the same for every fill.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax import models
from grpo_jax.models import attention

ATTENTION_FORMS = ("xla", "blockwise")


def seconds_per_step(step: Callable[[Any], Any], carry: Any, steps: int, repeats: int) -> float:
  """Seconds per call of step (carry -> carry) in a compiled fori_loop: the median time of a
  run of 2 * steps calls less that of a run of `steps` calls, over steps, so that what a run
  costs once (taking the cache in and handing it back, dispatch) cancels out. Each run
  donates a fresh copy of carry, so that the loop updates it in place as the sampler's does."""

  def run_seconds(n: int) -> float:
    loop = jax.jit(lambda c: jax.lax.fori_loop(0, n, lambda _, c: step(c), c), donate_argnums=0)
    compiled = loop.lower(carry).compile()
    times = []
    for _ in range(repeats + 1):  # the first run is not timed
      fresh = jax.block_until_ready(jax.tree.map(jnp.copy, carry))
      start = time.perf_counter()
      jax.block_until_ready(compiled(fresh))
      times.append(time.perf_counter() - start)
    return statistics.median(times[1:])

  return (run_seconds(2 * steps) - run_seconds(steps)) / steps


def _filled_cache(config: models.ModelConfig, batch: int, cache_len: int,
                  fill: int) -> models.KVCache:
  """A cache of cache_len slots whose first fill slots hold random keys and values."""
  cache = models.init_cache(config, batch, cache_len)
  keys = jax.random.split(jax.random.key(0), 2 * config.num_layers)
  draw = lambda key, x: jax.random.normal(key, x.shape, x.dtype)
  return cache.replace(
      k=tuple(draw(key, x) for key, x in zip(keys[::2], cache.k)),
      v=tuple(draw(key, x) for key, x in zip(keys[1::2], cache.v)),
      valid=jnp.broadcast_to(jnp.arange(cache_len) < fill, (batch, cache_len)))


def model_step(model: models.Transformer, batch: int, cache_len: int, fill: int):
  """(step, carry) of the model's decode step: the greedy token of each row is written to
  slot fill - 1 and read against the cache (the step repeats at that slot)."""
  graphdef, params = nnx.split(model)

  def step(carry):
    params, cache, tokens_b1, slot = carry
    model = nnx.merge(graphdef, params)
    h_b1d, cache = model.hidden(tokens_b1, positions=jnp.full_like(tokens_b1, slot),
                                attention_mask=jnp.ones_like(tokens_b1), cache=cache,
                                cache_index=slot)
    tokens_b1 = jnp.argmax(model.logits(h_b1d), axis=-1).astype(jnp.int32)
    return params, cache, tokens_b1, slot

  carry = (params, _filled_cache(model.config, batch, cache_len, fill),
           jnp.zeros((batch, 1), jnp.int32), jnp.int32(fill - 1))
  return step, carry


def attention_step(config: models.ModelConfig, batch: int, cache_len: int, fill: int, form: str):
  """(step, carry) of a decode step's attention alone: in each of the L layers a new key and
  value are written to slot fill - 1 and one query per row attends over the cache, in the
  "xla" form (all cache_len slots) or the "blockwise" one (decode_attend: the filled slots)."""
  h, k_dim = config.num_heads, config.head_dim

  def attend(q, k, v, valid, slot):
    if form == "xla":
      return attention.attend(q, k, v, key_valid_bs=valid, query_offset=slot, impl="xla")
    return attention.decode_attend(q, k, v, key_valid_bs=valid, query_offset=slot)

  def step(carry):
    cache, q_b1hk, slot = carry
    ks, vs = list(cache.k), list(cache.v)
    for layer in range(config.num_layers):
      new_bh1k = q_b1hk[:, :, :config.num_kv_heads].transpose(0, 2, 1, 3).astype(ks[layer].dtype)
      ks[layer] = jax.lax.dynamic_update_slice(ks[layer], new_bh1k, (0, 0, slot, 0))
      vs[layer] = jax.lax.dynamic_update_slice(vs[layer], new_bh1k, (0, 0, slot, 0))
      q_b1hk = attend(q_b1hk, ks[layer], vs[layer], cache.valid, slot)
    return cache.replace(k=tuple(ks), v=tuple(vs)), q_b1hk, slot

  q = jax.random.normal(jax.random.key(1), (batch, 1, h, k_dim), config.compute_dtype)
  return step, (_filled_cache(config, batch, cache_len, fill), q, jnp.int32(fill - 1))


def measure(config: models.ModelConfig, *, batch: int, cache_len: int, fill: int,
            steps: int = 32, repeats: int = 5, seed: int = 0) -> dict[str, Any]:
  """{"decode_ms_per_token": ms of one decode step of the model (one token in each of the
  batch rows), "attention_ms_per_token": {form: ms of that step's attention alone}, and the
  settings}. fill: the filled slots, 1..cache_len."""
  model = models.init(config, seed=seed)
  ms = lambda step_carry: 1e3 * seconds_per_step(*step_carry, steps, repeats)
  return {
      "decode_ms_per_token": ms(model_step(model, batch, cache_len, fill)),
      "attention_ms_per_token": {form: ms(attention_step(config, batch, cache_len, fill, form))
                                 for form in ATTENTION_FORMS},
      "batch": batch, "cache_len": cache_len, "fill": fill, "steps": steps,
      "platform": jax.default_backend(),
  }
