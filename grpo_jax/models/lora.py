"""LoRA: low-rank adapters on the attention and MLP projections, and what the trainer does
with them.

A projection W [*in, *out] with an adapter computes x W + scale * (dropout(x) A) B, A [*in, r]
and B [r, *out] (PEFT's lora_A / lora_B weights, transposed into our input-first layout), scale =
alpha / r. A starts uniform in +-1/sqrt(prod(in)) and B at zero, as PEFT initialises them, so a
fresh adapter leaves the model's outputs unchanged. The adapter of the module attribute `q` is
the submodule `q_lora` (None where there is none), its weights `nnx.LoRAParam`s with logical
axes (the projection's, and "lora_rank", which no mesh axis shards).

The trainer's view: the adapters are the trainable parameters and everything else (the base)
is frozen; without adapters every parameter is trainable (`split_trainable`). pi_ref is the
base with the adapters off (`without_adapters`), or, with iterative resets, the base with a
copy of the adapters (`reference`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.models import layer_scan
from grpo_jax.models import quantize
from grpo_jax.models.config import LoRASpec

# PEFT target name -> (the block's submodule, our weight attribute).
PROJECTIONS = {
    "q_proj": ("attn", "q"), "k_proj": ("attn", "k"), "v_proj": ("attn", "v"),
    "o_proj": ("attn", "o"), "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"),
    "down_proj": ("mlp", "down"),
}
SUFFIX = "_lora"


class LoRA(nnx.Module):
  """The adapter of one projection [*in] -> [*out]: x -> scale * (dropout(x) A) B."""

  def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
               axes: tuple[str, ...], spec: LoRASpec, dtype, *, rngs: nnx.Rngs):
    """axes: the projection weight's logical axes, input axes first."""
    r, n_in = spec.rank, len(in_shape)
    bound = 1 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), in_shape + (r,), dtype, -bound, bound)
    self.a = nnx.LoRAParam(a, out_sharding=axes[:n_in] + ("lora_rank",), eager_sharding=False)
    self.b = nnx.LoRAParam(jnp.zeros((r,) + out_shape, dtype),
                           out_sharding=("lora_rank",) + axes[n_in:], eager_sharding=False)
    self.scale = spec.scale
    self.dropout = spec.dropout

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """[..., *in] -> [..., *out] in x's dtype; dropout on x only when given a key."""
    cd = x.dtype
    if dropout_key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(dropout_key, 1 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1 - self.dropout), 0).astype(cd)
    h = jnp.tensordot(x, self.a[...].astype(cd), self.a.ndim - 1)  # [..., r]
    return jnp.tensordot(h, self.b[...].astype(cd), 1) * jnp.asarray(self.scale, cd)

  def delta(self) -> jax.Array:
    """scale * A B [*in, *out] in float32: what merging adds to the weight."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    return jnp.tensordot(a, b, 1) * self.scale


def fold(key: jax.Array | None, i: int) -> jax.Array | None:
  """fold_in(key, i), or None without a key (no dropout)."""
  return None if key is None else jax.random.fold_in(key, i)


def adapted(model: nnx.Module) -> Iterator[tuple[tuple[Any, ...], nnx.Module, str]]:
  """(the module's path, the module, weight attribute) of every projection weight of the model."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      for _, name in PROJECTIONS.values():
        if hasattr(node, name + SUFFIX):
          yield tuple(path), node, name


def without_adapters(model: nnx.Module) -> nnx.Module:
  """A new model object without the adapters: the base model, over the same arrays (its
  config keeps the LoRA spec, which says how the base is stored)."""
  model = nnx.merge(*nnx.split(model))
  for _, module, name in list(adapted(model)):
    setattr(module, name + SUFFIX, None)
  return model


def merged(model: nnx.Module, dtype) -> nnx.Module:
  """A new model without adapters whose projection weights are W + scale A B in dtype
  (dequantized when quantized); its other parameters are the model's."""
  model = nnx.merge(*nnx.split(model))  # a new object over the same arrays
  for _, module, name in list(adapted(model)):
    w, adapter = getattr(module, name), getattr(module, name + SUFFIX)
    value = quantize.weight(w, jnp.float32)
    if adapter is not None:
      value = value + adapter.delta()
    axes = w.axes if isinstance(w, quantize.QuantizedWeight) else w.get_metadata()["out_sharding"]
    setattr(module, name, nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False))
    setattr(module, name + SUFFIX, None)
  model.config = dataclasses.replace(model.config, lora=None, param_dtype=jnp.dtype(dtype).name)
  return model


def for_rollout(model: nnx.Module) -> nnx.Module:
  """The model sampling runs: its blocks unstacked (layer_scan.unscanned), and with adapters,
  merged once into compute-dtype weights (faster than applying them at every new token,
  BENCHMARKS.md); without, the model itself."""
  model = layer_scan.unscanned(model)
  if model.config.lora is None:
    return model
  return merged(model, model.config.compute_dtype)


# -- the trainer's view of the parameters ------------------------------------------------------


def has_adapters(params) -> bool:
  """Whether a state (of arrays, shapes or shardings) holds LoRA adapters."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return any(isinstance(x, nnx.LoRAParam) for x in leaves)


def split_trainable(params) -> tuple[Any, Any]:
  """(trainable, frozen) parts of a state: (adapters, base) with LoRA, else (all, {})."""
  if not has_adapters(params):
    return params, nnx.State({})
  return nnx.split_state(params, nnx.LoRAParam, ...)


def join(trainable, frozen):
  """The inverse of split_trainable and split_base."""
  return nnx.merge_state(trainable, frozen) if frozen else trainable


def split_base(params) -> tuple[Any, Any]:
  """(base, adapters) of a state: the other way to train a LoRA model, its base weights."""
  return nnx.split_state(params, nnx.Not(nnx.LoRAParam), ...)


def reference_part(params, *, beta: float, ref_reset_every: int):
  """What of `params` (any nnx.State) the train state keeps for pi_ref: nothing without a KL
  term; all of it for a full fine-tune; with LoRA nothing (pi_ref is the base with the
  adapters off) or, with iterative resets, the adapters (pi_ref's own adapters)."""
  if beta <= 0 or (has_adapters(params) and ref_reset_every <= 0):
    return None
  return split_trainable(params)[0]


def initial_reference(params, *, beta: float, ref_reset_every: int):
  """pi_ref's parameters at the start: a copy of the params, or with LoRA zero adapters
  (the adapters off, until the first reset copies the policy's)."""
  part = reference_part(params, beta=beta, ref_reset_every=ref_reset_every)
  if part is None:
    return None
  return jax.tree.map(jnp.zeros_like if has_adapters(params) else jnp.copy, part)


def reference(graphdef, params, ref_params) -> tuple[Any, Any]:
  """(graphdef, params) of pi_ref given the policy's params and the state's ref_params."""
  if not has_adapters(params):
    return graphdef, ref_params
  if ref_params is None:
    return nnx.split(without_adapters(nnx.merge(graphdef, params)))
  return graphdef, join(ref_params, split_trainable(params)[1])
