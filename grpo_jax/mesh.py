"""The device mesh (data, fsdp, tensor) and the one table mapping logical axes to it.

Parameters carry logical axis names (models/transformer.py). FSDP shards the model width
("embed") over `fsdp`; tensor parallelism shards heads, MLP width and vocab over `tensor`;
the batch goes over (data, fsdp). A dimension that a mesh axis does not divide, or a mesh
axis already used by another dimension of the same array, stays unsharded.

Rollout uses another layout: the weights gathered over (data, fsdp) in the compute dtype,
still sharded over `tensor`, with the rows over (data, fsdp). The decode loop then needs no
collective but the tensor-parallel ones, instead of gathering every row's activations for
every new token; each device holds the compute-dtype weights divided by the tensor size.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (None: replicated).
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "lora_rank": None,
    "layers": None,  # the stacked axis of model.scan_layers
}


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 with what fills num_devices."""
  shape = tuple(int(s) for s in shape)
  known = math.prod(s for s in shape if s != -1)
  return tuple(num_devices // known if s == -1 else s for s in shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over the first prod(shape) devices, with Auto axes."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_shape(shape, len(devices))
  used = math.prod(shape)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices[:used])


def spec_for(logical_axes: Sequence[str | None] | None, dims: Sequence[int], mesh: Mesh) -> P:
  """The PartitionSpec of one array from its logical axis names."""
  if not logical_axes:
    return P()
  out, used = [], set()
  for name, dim in zip(logical_axes, dims):
    axis = LOGICAL_RULES.get(name) if name else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      out.append(None)
    else:
      out.append(axis)
      used.add(axis)
  return P(*out)


def param_shardings(params: Any, mesh: Mesh) -> Any:
  """NamedShardings for an nnx.State (same structure), from each Variable's logical axes."""

  def one(x):
    if isinstance(x, nnx.Variable):
      axes = x.get_metadata().get("out_sharding")
      return x.replace(NamedSharding(mesh, spec_for(axes, x.shape, mesh)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def opt_state_shardings(tx: optax.GradientTransformation, opt_state: Any,
                        param_shardings: Any) -> Any:
  """Shardings for tx's state: leaves that mirror a parameter (AdamW's moments) take that
  parameter's sharding; the rest (step counts, flags) are replicated."""
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  return optax.tree_map_params(tx, lambda _, sharding: sharding, opt_state, param_shardings,
                               transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over (data, fsdp); everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def row_shards(mesh: Mesh) -> int:
  """How many ways batch_sharding splits the rows: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def rollout_sharding(sharding: NamedSharding) -> NamedSharding:
  """A parameter's training sharding with the batch axes (data, fsdp) gathered."""
  spec = [None if axis in BATCH_AXES else axis for axis in sharding.spec]
  return NamedSharding(sharding.mesh, P(*spec))


def rollout_params(params: Any, shardings: Any, dtype: Any) -> Any:
  """The policy's params laid out for sampling (see the module docstring); traceable.

  `shardings` is the params' training layout (param_shardings). Every float parameter but the
  norm scales is cast to `dtype` before the gather: the model casts them to its compute dtype
  where it uses them, so sampling sees the same values; float32 master weights move and
  take half the bytes as bfloat16. Quantized weights (LoRA's int8 / nf4 base) move as they are.
  """

  def one(x: nnx.Variable, sharding: nnx.Variable) -> nnx.Variable:
    value = x.get_value()
    if isinstance(x, nnx.Param) and "norm" not in (x.get_metadata().get("out_sharding") or ()):
      value = value.astype(dtype)
    target = rollout_sharding(sharding.get_value())
    return x.replace(jax.lax.with_sharding_constraint(value, target))

  return jax.tree.map(one, params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def to_rollout_layout(params: Any, shardings: Any, dtype: Any, row_sharding: NamedSharding,
                      *rows: jax.Array) -> tuple[Any, ...]:
  """(rollout_params(params, shardings, dtype), *rows split by row_sharding): what sampling
  runs on in the rollout layout; traceable."""
  rows = tuple(jax.lax.with_sharding_constraint(x, row_sharding) for x in rows)
  return (rollout_params(params, shardings, dtype), *rows)
