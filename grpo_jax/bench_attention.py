"""What attention costs in memory where it has a backward pass: the compiled temporaries of
value_and_grad of one layer's causal attention over T tokens, for each implementation.

The "xla" form builds float32 scores [B, H, T, T] (and their gradient); the blockwise form
keeps one block of them at a time, so its temporaries grow about linearly in T. These are
the CPU compiler's figures (memory_analysis of the compiled program): nothing runs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from grpo_jax import models
from grpo_jax.models import attention

TRAINING_FORMS = ("xla", "blockwise")


def training_temp_bytes(config: models.ModelConfig, *, batch: int, tokens: int,
                        impl: str) -> int:
  """Temporary bytes of the compiled value_and_grad (with respect to q, k, v) of one layer's
  causal attention of batch rows of `tokens` tokens, in the model's head shape and dtype."""
  h, hkv, k_dim = config.num_heads, config.num_kv_heads, config.head_dim
  dtype = jnp.dtype(config.compute_dtype)
  q = jax.ShapeDtypeStruct((batch, tokens, h, k_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, hkv, tokens, k_dim), dtype)
  valid = jax.ShapeDtypeStruct((batch, tokens), jnp.bool_)

  def loss(q, k, v, valid):
    out = attention.attend(q, k, v, key_valid_bs=valid, impl=impl)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return int(grad.lower(q, kv, kv, valid).compile().memory_analysis().temp_size_in_bytes)


def measure(config: models.ModelConfig, *, batch: int, tokens: int) -> dict[str, Any]:
  """{"attention_train_temp_bytes": {form: bytes}, and the settings}."""
  return {
      "attention_train_temp_bytes": {form: training_temp_bytes(config, batch=batch,
                                                               tokens=tokens, impl=form)
                                     for form in TRAINING_FORMS},
      "batch": batch, "tokens": tokens, "heads": config.num_heads,
      "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
      "platform": jax.default_backend(),
  }
