"""Frozen base weights in 8 or 4 bits (QLoRA), quantized once at load, dequantized where used.

A weight of our layout [*in, *out] is viewed as the matrix [I, O] (I = prod(in), O = prod(out);
row-major, so the view is free) and stored as integer codes with float32 scales:

  int8  per output channel: w[i, o] ~ codes[i, o] * scales[o] / 127 with codes =
        round(127 w / scales) int8 [I, O] and scales[o] = max_i |w[i, o]| (absmax) [O].
  nf4   per block of 64 consecutive inputs of one output: w[i, o] ~ NF4[c[i, o]] *
        scales[i // 64, o], c the nearest of the 16 NormalFloat4 values to w / scales (QLoRA,
        Dettmers et al. 2023), scales the blocks' absmax [I / 64, O]; two 4-bit codes per byte,
        uint8 [I / 2, O] (code 2j in the low nibble of row j, 2j + 1 in the high one).

Bytes per weight: int8 1 + 4 / I, nf4 0.5 + 4 / 64 = 0.5625. The codes and scales carry the
logical axes of the weight's first input and first output axis, so the mesh rules shard them
as they shard the weight.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax.errors import UserError

KINDS = ("int8", "nf4")
NF4_BLOCK = 64
# The NormalFloat4 code book: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (QLoRA,
# appendix E; the table bitsandbytes ships). tests/test_lora.py rebuilds it from the quantiles.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


class QuantizedArray(nnx.Variable):
  """The codes or the scales of a quantized weight: frozen, and never cast to another dtype."""


def quantize(w_io: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
  """(codes, scales) of a float matrix [I, O] (see the module docstring)."""
  w = jnp.asarray(w_io, jnp.float32)
  if kind == "int8":
    absmax = jnp.max(jnp.abs(w), axis=0)  # [O]
    safe = jnp.where(absmax > 0, absmax, 1.0)
    return jnp.round(w / safe * 127).astype(jnp.int8), absmax
  i, o = w.shape
  blocks = w.reshape(i // NF4_BLOCK, NF4_BLOCK, o)
  absmax = jnp.max(jnp.abs(blocks), axis=1)  # [I / 64, O]
  normed = (blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]).reshape(i, o)
  code = jnp.asarray(NF4_CODE)
  idx = jnp.searchsorted((code[1:] + code[:-1]) / 2, normed).astype(jnp.uint8)  # nearest value
  pairs = idx.reshape(i // 2, 2, o)
  return pairs[:, 0] | (pairs[:, 1] << 4), absmax


def dequantize(codes: jax.Array, scales: jax.Array, kind: str, dtype) -> jax.Array:
  """The float matrix [I, O] in dtype that (codes, scales) stand for."""
  if kind == "int8":
    return (codes.astype(jnp.float32) * (scales / 127)).astype(dtype)
  half, o = codes.shape
  idx = jnp.stack([codes & 0xF, codes >> 4], axis=1).reshape(2 * half, o)
  values = jnp.asarray(NF4_CODE)[idx].reshape(-1, NF4_BLOCK, o) * scales[:, None]
  return values.reshape(2 * half, o).astype(dtype)


class QuantizedWeight(nnx.Module):
  """A frozen projection weight [*in, *out] held as int8 or nf4 codes and float32 scales."""

  def __init__(self, value: jax.Array, kind: str, num_in: int, axes: tuple[str, ...]):
    """value: the float weight; axes: its logical axis names (num_in of them input axes)."""
    inputs = math.prod(value.shape[:num_in])
    if kind == "nf4" and inputs % NF4_BLOCK:
      raise UserError(f"model.lora.base_dtype=nf4 quantizes blocks of {NF4_BLOCK} inputs, and a "
                      f"projection of shape {tuple(value.shape)} has {inputs}; use int8 or a "
                      "float dtype")
    self.kind = kind
    self.shape = tuple(value.shape)
    self.num_in = num_in
    self.axes = tuple(axes)
    codes, scales = quantize(self._matrix(value), kind)
    in_axis, out_axis = axes[0], axes[num_in]
    self.codes = QuantizedArray(codes, out_sharding=(in_axis, out_axis), eager_sharding=False)
    scale_axes = (out_axis,) if kind == "int8" else (in_axis, out_axis)
    self.scales = QuantizedArray(scales, out_sharding=scale_axes, eager_sharding=False)

  def _matrix(self, value) -> jax.Array:
    inputs = math.prod(self.shape[:self.num_in])
    return jnp.asarray(value).reshape(inputs, -1)

  def set(self, value) -> None:
    """Quantizes a float weight of this shape into the codes and scales."""
    codes, scales = quantize(self._matrix(value), self.kind)
    self.codes.set_value(codes)
    self.scales.set_value(scales)

  def dequantize(self, dtype) -> jax.Array:
    """The weight [*in, *out] in dtype."""
    return dequantize(self.codes[...], self.scales[...], self.kind, dtype).reshape(self.shape)


def weight(w: nnx.Param | QuantizedWeight, dtype) -> jax.Array:
  """A projection's weight in dtype, whether it is stored as floats or quantized."""
  return w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w[...].astype(dtype)
