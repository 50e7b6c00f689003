"""Fingerprints of the bits of arrays, the same whatever their sharding or device count.

A checkpoint stores the fingerprint of every array it saved; restoring recomputes it, so a
flipped bit on disk that the storage format does not catch is found. The fingerprint of an
array x (its bits as unsigned ints u_i, in row-major order i) is two uint32 sums,

  h1 = sum_i u_i * (2i + 1)        h2 = sum_i (u_i ^ (u_i >> 7)) * (2 * mix(i) + 1)  (mod 2^32)

Integer sums do not depend on the order of reduction, so any mesh gives the same numbers.
One flipped bit always changes h1 (2^b times an odd number is not 0 mod 2^32 for b < 32);
other damage goes unnoticed with odds of about 2^-64.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _bits(x: jax.Array) -> jax.Array:
  """x's bits as uint32, one per element (8- and 16-bit types zero-extended)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)


def _one(x: jax.Array) -> jax.Array:
  """[2] uint32: (h1, h2) of the module docstring."""
  u = _bits(x)
  index = jnp.zeros(x.shape, jnp.uint32)
  for axis, size in enumerate(x.shape):
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
  mix = (index ^ (index >> 16)) * jnp.uint32(0x9E3779B1)
  h1 = jnp.sum(u * (2 * index + 1), dtype=jnp.uint32)
  h2 = jnp.sum((u ^ (u >> 7)) * (2 * mix + 1), dtype=jnp.uint32)
  return jnp.stack([h1, h2])


def _all(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_one(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def of_tree(tree: Any) -> dict[str, str]:
  """{path: "dtype:hex"} for every array leaf of `tree` (paths like "params/embed/value").

  Every process of a multi-process run must call it (it is one computation over the mesh).
  """
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = [x for _, x in paths_and_leaves]
  sharding = next((x.sharding for x in leaves if isinstance(x.sharding, NamedSharding)), None)
  fn = jax.jit(_all, out_shardings=NamedSharding(sharding.mesh, P()) if sharding else None)
  sums = np.asarray(jax.device_get(fn(leaves)))
  return {jax.tree_util.keystr(path, simple=True, separator="/"): f"{x.dtype}:{int(h1):08x}{int(h2):08x}"
          for (path, x), (h1, h2) in zip(paths_and_leaves, sums)}


def mismatches(saved: dict[str, str], tree: Any) -> list[str]:
  """The paths whose fingerprint in `tree` differs from `saved` (paths whose dtype changed,
  which a restore casts, and paths `saved` lacks are not compared)."""
  now = of_tree(tree)
  return [path for path, value in now.items()
          if path in saved and saved[path].split(":")[0] == value.split(":")[0]
          and saved[path] != value]
