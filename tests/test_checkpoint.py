"""Orbax checkpoints: round trips, pruning, async saves, partial steps, sharded restore."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grpo_jax.checkpoint import Checkpointer
from grpo_jax.errors import UserError

META = {"data": {"epoch": 1, "index": 12}, "config_digest": "0123abcd",
        "counters": {"nan_steps": 0}, "rng": [1, 2]}


def _state(seed: int = 0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"w": jax.random.normal(k1, (8, 4), jnp.float32),
            "e": jax.random.normal(k2, (16, 8)).astype(jnp.bfloat16)}
  opt = optax.adamw(1e-3, weight_decay=0.1)
  opt_state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)
  return {"params": params, "opt_state": opt_state,
          "step": jnp.asarray(7, jnp.int32),
          "tokens": jnp.arange(12, dtype=jnp.int32).reshape(3, 4)}


def _abstract(state, sharding=None):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding),
      state)


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_and_meta(tmp_path):
  state = _state()
  ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, async_save=False)
  assert ckpt.latest_step() is None
  assert ckpt.save(5, state, META, force=True)
  assert os.path.isdir(tmp_path / "checkpoints" / "5")
  restored, meta = ckpt.restore(_abstract(state))
  ckpt.close()
  _assert_same(restored, state)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert meta == META


def test_save_when_due_and_prune_to_keep(tmp_path):
  state = _state()
  ckpt = Checkpointer(tmp_path, keep=2, every_steps=2, async_save=False)
  assert not ckpt.save(1, state, META)  # not a multiple of every_steps
  assert ckpt.save(2, state, META)
  assert not ckpt.save(2, state, META, force=True)  # already saved
  assert ckpt.save(3, state, META, force=True)
  assert ckpt.save(4, state, META)
  ckpt.close()
  assert Checkpointer(tmp_path, keep=2).all_steps() == [3, 4]
  assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["3", "4"]


def test_every_steps_zero_saves_only_when_forced(tmp_path):
  ckpt = Checkpointer(tmp_path, keep=1, every_steps=0, async_save=False)
  assert not ckpt.save(10, _state(), META)
  assert ckpt.save(10, _state(), META, force=True)
  ckpt.close()


def test_async_save_copies_before_returning(tmp_path):
  state = _state(1)
  expected = jax.tree.map(np.asarray, state)
  ckpt = Checkpointer(tmp_path, keep=2, async_save=True)
  assert ckpt.save(1, state, META, force=True)
  # The trainer donates the state to the next step right away.
  jax.tree.map(lambda x: x.delete(), state)
  ckpt.wait()
  assert ckpt.latest_step() == 1
  ckpt.close()
  again = Checkpointer(tmp_path, keep=2)
  restored, meta = again.restore(_abstract(_state(1)))
  again.close()
  _assert_same(restored, expected)
  assert meta == META


def test_partial_checkpoint_is_ignored(tmp_path):
  state = _state()
  ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
  ckpt.save(2, state, META, force=True)
  ckpt.close()
  # A save that was killed half way leaves Orbax's temporary folder behind.
  partial = tmp_path / "9.orbax-checkpoint-tmp-1700000000000000"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "half_written").write_bytes(b"\0" * 10)
  ckpt = Checkpointer(tmp_path, keep=3)
  assert ckpt.latest_step() == 2
  assert ckpt.all_steps() == [2]
  restored, _ = ckpt.restore(_abstract(state))
  _assert_same(restored, state)
  assert ckpt.save(9, _state(3), META, force=True)  # the step is free to be saved
  ckpt.close()
  assert Checkpointer(tmp_path, keep=3).all_steps() == [2, 9]


def test_restore_lands_in_the_requested_sharding(tmp_path):
  state = _state()
  ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
  ckpt.save(1, state, META, force=True)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  replicated = NamedSharding(mesh, P())
  abstract = _abstract(state, replicated)
  sharded = NamedSharding(mesh, P("fsdp", None))
  abstract["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharded)
  restored, _ = ckpt.restore(abstract)
  ckpt.close()
  _assert_same(restored, state)
  assert restored["params"]["w"].sharding == sharded
  assert len(restored["params"]["w"].addressable_shards) == 8
  assert restored["params"]["w"].addressable_shards[0].data.shape == (2, 4)
  assert restored["tokens"].sharding == replicated


def test_restore_of_a_missing_step_is_a_user_error(tmp_path):
  ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
  with pytest.raises(UserError, match="available steps: none"):
    ckpt.restore(_abstract(_state()))
  ckpt.save(3, _state(), META, force=True)
  with pytest.raises(UserError, match=r"step 4 .* available steps: \[3\]"):
    ckpt.restore(_abstract(_state()), step=4)
  ckpt.close()


@pytest.mark.parametrize("change", ["shape", "extra", "missing"])
def test_restore_into_another_layout_is_a_user_error(tmp_path, change):
  state = _state()
  ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
  ckpt.save(1, state, META, force=True)
  target = _abstract(state)
  if change == "shape":
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 5), jnp.float32)
    expected = "params/w has shape (8, 5) here and (8, 4) in the checkpoint"
  elif change == "extra":
    target["params"]["b"] = jax.ShapeDtypeStruct((4,), jnp.float32)
    expected = "params/b is not in the checkpoint"
  else:
    del target["tokens"]
    expected = "tokens is in the checkpoint but not in this config's state"
  with pytest.raises(UserError, match="another model or optimizer config") as e:
    ckpt.restore(target)
  assert expected in str(e.value)
  assert "\n" not in str(e.value)
  restored, _ = ckpt.restore(_abstract(state))  # the checkpoint itself is untouched
  _assert_same(restored, state)
