"""The policy's log-probs (and entropies) of sampled completions after their prompts, each
prompt run through the model once for the block of rows that share it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax import models
from grpo_jax.models import lora as lora_lib


def prompt_share(num_generations: int, rows: int, row_shards: int = 1) -> int:
  """S, how many consecutive rows share a prompt forward: gcd(G, rows per shard).

  S divides G (a block of S rows has one prompt) and each shard's rows (so the prompts split
  over the shards like the rows); rows that do not split evenly over the shards take gcd(G, R).
  """
  return math.gcd(num_generations, rows // row_shards if rows % row_shards == 0 else rows)


def _completion_hidden(model, prompt_tokens, prompt_mask, completion_tokens,
                       completion_mask, row_sharding, dropout_key) -> jax.Array:
  """[R, N, D] the final hidden states that predict completion_tokens [R, N] (see
  completion_logps for the prompts, the row sharding and the dropout key)."""
  num_prompts, t = prompt_tokens.shape
  r, n = completion_tokens.shape
  per_row = lambda x: jnp.repeat(x, r // num_prompts, axis=0)  # [P, ...] -> [R, ...]
  remat = model.config.remat
  cache = models.init_cache(model.config, num_prompts, t)
  h_ptd, cache = model.hidden(prompt_tokens, positions=models.positions_from_mask(prompt_mask),
                              attention_mask=prompt_mask, cache=cache, cache_index=0, remat=remat,
                              activation_sharding=row_sharding,
                              dropout_key=lora_lib.fold(dropout_key, 0))
  h_rnd = per_row(h_ptd[:, -1:])  # the last prompt token predicts the first completion token
  if n > 1:
    # Completion token n sits at position (real prompt tokens) + (real tokens up to n) - 1.
    positions = per_row(prompt_mask.sum(-1, keepdims=True)) + jnp.cumsum(completion_mask, -1) - 1
    h_rest, _ = model.hidden(
        completion_tokens[:, :-1], positions=jnp.maximum(positions[:, :-1], 0),
        attention_mask=completion_mask[:, :-1],
        cache=models.expand_cache(cache, r // num_prompts, t + n - 1),
        cache_index=t, remat=remat, activation_sharding=row_sharding,
        dropout_key=lora_lib.fold(dropout_key, 1))
    h_rnd = jnp.concatenate([h_rnd, h_rest], axis=1)
  return h_rnd


def completion_logps(graphdef, params, prompt_tokens, prompt_mask, completion_tokens,
                     completion_mask, temperature: float, row_sharding=None,
                     dropout_key: jax.Array | None = None) -> jax.Array:
  """Log-probs [R, N] float32 of completion_tokens [R, N] after their prompts, under params.

  prompt_tokens / prompt_mask [P, T] (left padded) are the prompts of the R = P * S rows, S
  consecutive rows each (S = 1: one prompt per row). Each prompt runs through the model once
  and its keys and values serve its S completions: the prompt costs 1/S of a forward over the
  concatenated rows, whose log-probs these equal. Token T + n is predicted by the hidden state
  at T + n - 1; the vocab projection is chunked so that [R, N, V] float32 logits never exist.
  row_sharding (mesh.batch_sharding, rows over the batch axes) keeps the activations split
  by rows over the devices (Transformer.hidden's activation_sharding). dropout_key: LoRA
  dropout in the forward (the update's); None: none.
  """
  model = nnx.merge(graphdef, params)
  h_rnd = _completion_hidden(model, prompt_tokens, prompt_mask, completion_tokens,
                             completion_mask, row_sharding, dropout_key)
  return model.token_logprobs(h_rnd, completion_tokens, temperature=temperature)


def completion_logps_and_entropy(graphdef, params, prompt_tokens, prompt_mask,
                                 completion_tokens, completion_mask, temperature: float,
                                 row_sharding=None, dropout_key: jax.Array | None = None
                                 ) -> tuple[jax.Array, jax.Array]:
  """completion_logps, and the entropy [R, N] float32 (under stop_gradient) of the policy's
  softmax(logits / temperature) at each completion position, from the same chunked pass."""
  model = nnx.merge(graphdef, params)
  h_rnd = _completion_hidden(model, prompt_tokens, prompt_mask, completion_tokens,
                             completion_mask, row_sharding, dropout_key)
  return model.token_logprobs_and_entropy(h_rnd, completion_tokens, temperature=temperature)
