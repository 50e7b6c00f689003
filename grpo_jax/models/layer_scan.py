"""The decoder's blocks stored stacked and run by lax.scan, so the compiler sees each kind of
block once instead of L times (model.scan_layers).

A scanned model's `layers` is one Block whose every variable has a leading axis of L layers
(logical axis "layers", never sharded). The layers run as `runs`: a run repeats a pattern of
layer kinds (full or sliding attention) `reps` times and is one lax.scan whose body holds the
pattern's blocks; the runs are chosen to compile the fewest blocks. Llama and Qwen are one
run of L full layers; Gemma 2 is L / 2 repetitions of
(sliding, full); Gemma 3 with 26 layers is 4 x (5 sliding, full), then 2 x (sliding).

Decoding does not scan: the sampler runs `unscanned(model)`, L blocks over slices of the
stacked arrays, made once per rollout before the decode loop (a scan over layers would read
each layer's cache through a copy at every new token). Hugging Face and PEFT files are read
and written through the unscanned layout, so they are the same files either way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS = "layers"  # the logical name of the stacked axis


def _variables(state: Any) -> list[nnx.Variable]:
  return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _retag(state: Any, tag) -> Any:
  """The state with each variable's logical axes passed through tag (stacked <-> per layer)."""
  for var in _variables(state):
    axes = var.get_metadata().get("out_sharding")
    if axes:
      var.set_metadata(out_sharding=tag(tuple(axes)))
  return state


def stack(blocks: Sequence[nnx.Module]) -> nnx.Module:
  """One block whose variables are those of `blocks` (alike) stacked on a leading axis."""
  graphdef, _ = nnx.split(blocks[0])
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in blocks))
  return nnx.merge(graphdef, _retag(state, lambda axes: (LAYERS,) + axes))


def unstack(block: nnx.Module, num_layers: int) -> list[nnx.Module]:
  """The inverse of stack: num_layers blocks over slices of the stacked variables."""
  graphdef, state = nnx.split(block)
  return [nnx.merge(graphdef, _retag(jax.tree.map(lambda x, i=i: x[i], state),
                                     lambda axes: axes[1:]))
          for i in range(num_layers)]


def runs(kinds: Sequence[str]) -> list[tuple[int, int, int]]:
  """(start, period, reps) of the runs that cover the layer kinds in order, each the
  repetition of a pattern of `period` kinds, chosen so that the blocks compiled (the sum of
  the periods) are fewest, then the runs, then the first run is longest."""
  kinds = tuple(kinds)
  best: dict[int, tuple[tuple[int, int], list[tuple[int, int, int]]]] = {len(kinds): ((0, 0), [])}
  for start in reversed(range(len(kinds))):
    options = []
    for period in range(1, len(kinds) - start + 1):
      pattern, reps = kinds[start:start + period], 0
      while kinds[start + reps * period:start + (reps + 1) * period] == pattern:
        reps += 1
        (blocks, count), rest = best[start + reps * period]
        options.append(((blocks + period, count + 1), [(start, period, reps)] + rest))
    best[start] = min(options, key=lambda option: (*option[0], -option[1][0][2] * option[1][0][1]))
  return best[0][1]


def run_slices(tree: Any, start: int, period: int, reps: int) -> Any:
  """Layers [start, start + period * reps) of stacked leaves, as [reps, period, ...]."""
  n = period * reps
  return jax.tree.map(lambda x: x[start:start + n].reshape(reps, period, *x.shape[1:]), tree)


def unscanned(model: Any) -> Any:
  """A model (a Transformer) with config.scan_layers as L separate blocks over slices of its
  stacked arrays, config.scan_layers off; any other model as it is."""
  if not model.config.scan_layers:
    return model
  model = nnx.merge(*nnx.split(model))  # a new object over the same arrays
  model.layers = nnx.List(unstack(model.layers, model.config.num_layers))
  model.config = dataclasses.replace(model.config, scan_layers=False)
  return model


def scanned(model: Any) -> Any:
  """The inverse of unscanned: the model's L blocks stacked, config.scan_layers on."""
  if model.config.scan_layers:
    return model
  model = nnx.merge(*nnx.split(model))
  model.layers = stack(list(model.layers))
  model.config = dataclasses.replace(model.config, scan_layers=True)
  return model
