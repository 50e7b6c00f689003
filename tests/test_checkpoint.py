"""Orbax checkpoints: round trips, pruning, async saves, partial steps, sharded restore,
damaged checkpoints, full and read-only disks."""

import contextlib
import logging as std_logging
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grpo_jax import checkpoint as checkpoint_lib
from grpo_jax import fingerprint
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


# -- damage found on restore -------------------------------------------------------------------


def _largest_data_file(step_dir):
  """The largest file of one process's OCDBT database (where the big arrays' bytes are)."""
  return max((step_dir / "state").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)


def _damage(step_dir, how):
  """Damages one checkpoint the way a bad disk or a partial copy leaves it."""
  if how == "truncated data file":
    path = _largest_data_file(step_dir)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  elif how == "flipped bit in data":
    path = _largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
  elif how == "flipped bit in meta":
    path = step_dir / "meta" / "metadata"
    path.write_text(path.read_text().replace('"index": 12', '"index": 13'))
  elif how == "missing data file":
    _largest_data_file(step_dir).unlink()
  else:
    raise ValueError(how)


def _three_checkpoints(directory):
  ckpt = Checkpointer(directory, keep=3, async_save=False)
  states = {step: {**_state(step), "big": jax.random.normal(jax.random.key(step), (128, 64))}
            for step in (1, 2, 3)}
  for step, state in states.items():
    ckpt.save(step, state, META, force=True)
  ckpt.close()
  return states


DAMAGE = ["truncated data file", "flipped bit in data", "flipped bit in meta",
          "missing data file"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_restored(
    tmp_path, caplog, how):
  states = _three_checkpoints(tmp_path)
  _damage(tmp_path / "3", how)
  ckpt = Checkpointer(tmp_path, keep=3)
  with pytest.raises(UserError, match=f"checkpoint {tmp_path}/3 is unreadable"):
    ckpt.restore(_abstract(states[3]))
  caplog.clear()
  step, restored, meta = ckpt.restore_newest_good(_abstract(states[3]))
  assert step == 2 and meta == META
  _assert_same(restored, states[2])
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert f"checkpoint 3 in {tmp_path} does not read back" in warnings[0]
  assert "moved aside to 3.corrupt; resuming from step 2" in warnings[0]
  assert ckpt.all_steps() == [1, 2]
  assert (tmp_path / "3.corrupt" / "state").is_dir()  # kept, not deleted
  # Step 3 is free again; damaged again, its second copy goes beside the first.
  ckpt.save(3, states[3], META, force=True)
  ckpt.wait()
  _damage(tmp_path / "3", how)
  assert ckpt.restore_newest_good(_abstract(states[3]))[0] == 2
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3.corrupt", "3.corrupt.1"]


def test_when_no_checkpoint_reads_back_it_is_a_user_error_and_nothing_moves(tmp_path):
  states = _three_checkpoints(tmp_path)
  for step in (1, 2, 3):
    _damage(tmp_path / str(step), "truncated data file")
  ckpt = Checkpointer(tmp_path, keep=3)
  with pytest.raises(UserError, match=r"no checkpoint in .* reads back as written \(steps 3, 2, "
                     r"1; step 3: OUT_OF_RANGE") as e:
    ckpt.restore_newest_good(_abstract(states[3]))
  ckpt.close()
  assert "\n" not in str(e.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3"]


def test_what_a_failed_read_leaves_behind_is_not_reported_and_the_rest_is(monkeypatch):
  # The leftovers of an abandoned Orbax read reach stderr three ways (a CI run failed on each
  # in turn); other reports through the same hooks still go through.
  seen = []
  asyncio_logger = std_logging.getLogger("asyncio")
  monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(str(value)))
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
  monkeypatch.setattr(asyncio_logger, "filters", [])
  monkeypatch.setattr(asyncio_logger, "handlers", [])
  monkeypatch.setattr(asyncio_logger, "propagate", False)
  handler = std_logging.Handler()
  handler.emit = lambda record: seen.append(record.getMessage().splitlines()[0])
  asyncio_logger.addHandler(handler)
  checkpoint_lib._drop_leftover_reports()
  checkpoint_lib._drop_leftover_reports()  # once installed, not stacked

  closed = RuntimeError("Event loop is closed")
  sys.excepthook(RuntimeError, closed, None)
  sys.unraisablehook(types.SimpleNamespace(exc_value=closed, object=None))
  orbax_file = os.path.join(os.sep, "site-packages", "orbax", "serialization.py")
  asyncio_logger.error("Task exception was never retrieved\nfuture: <Task coro=<read() "
                       f"defined at {orbax_file}:272>>")
  try:  # the gathering future's message names no file; its exception's traceback does
    exec(compile("raise ValueError('OUT_OF_RANGE')", orbax_file, "exec"))
  except ValueError as e:
    asyncio_logger.error("_GatheringFuture exception was never retrieved\nfuture: "
                         "<_GatheringFuture finished>", exc_info=e)
  assert seen == []
  sys.excepthook(ValueError, ValueError("ours"), None)
  sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("other"), object=None))
  asyncio_logger.error("Task exception was never retrieved\nfuture: <Task coro=<mine()>>")
  assert seen == ["ours", "other", "Task exception was never retrieved"]


def test_no_checkpoint_restores_nothing(tmp_path):
  ckpt = Checkpointer(tmp_path, keep=1)
  assert ckpt.restore_newest_good(_abstract(_state())) is None
  ckpt.close()


def test_a_restore_that_casts_a_dtype_is_not_taken_for_damage(tmp_path):
  state = _state()
  ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
  ckpt.save(1, state, META, force=True)
  target = _abstract(state)
  target["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.bfloat16)
  step, restored, _ = ckpt.restore_newest_good(target)
  ckpt.close()
  assert step == 1 and restored["params"]["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(restored["params"]["e"]),
                                np.asarray(state["params"]["e"]))


def test_fingerprints_do_not_depend_on_the_sharding_and_see_one_flipped_bit():
  x = jax.random.normal(jax.random.key(0), (8, 6), jnp.float32)
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharded = jax.device_put(x, NamedSharding(mesh, P("b", "a")))
  tree = {"x": x, "b": x.astype(jnp.bfloat16), "k": jax.random.PRNGKey(3)}
  assert fingerprint.of_tree(tree) == fingerprint.of_tree({**tree, "x": sharded})
  saved = fingerprint.of_tree(tree)
  for index in range(x.size):  # every element, one bit each
    bits = np.asarray(x).copy().reshape(-1).view(np.uint32)
    bits[index] ^= np.uint32(1 << (index % 32))
    flipped = jnp.asarray(bits.view(np.float32).reshape(x.shape))
    assert fingerprint.mismatches(saved, {**tree, "x": flipped}) == ["x"]


# -- a full or read-only disk --------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path, size_bytes):
  """A tmpfs of `size_bytes` mounted at `path`, unmounted at the end; skips the test where
  mounting is not permitted (it needs root, as in CI)."""
  path.mkdir(parents=True, exist_ok=True)
  try:
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                             str(path)], capture_output=True, text=True, check=False)
  except FileNotFoundError:
    pytest.skip("no mount command here: cannot make a small disk to fill")
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): a full disk needs root")
  try:
    yield path
  finally:
    subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(disk, leave_free):
  """Fills `disk` but for `leave_free` bytes (a multiple of the page size)."""
  free = shutil.disk_usage(disk).free
  (disk / "filler").write_bytes(b"\xff" * (free - leave_free))
  assert shutil.disk_usage(disk).free == leave_free


def make_read_only(disk):
  subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


def _random_state(n):
  return {"w": jax.random.normal(jax.random.key(n), (10_000,), jnp.float32)}


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_save_to_a_full_or_read_only_disk_is_one_user_error_and_keeps_the_last(
    tmp_path, fault):
  with small_disk(tmp_path / "disk", 1 << 20) as disk:
    ckpt = Checkpointer(disk / "checkpoints", keep=1, async_save=True)
    ckpt.save(1, _random_state(1), META, force=True)
    ckpt.wait()
    if fault == "full":
      fill(disk, 16 << 10)
    else:
      make_read_only(disk)
    with pytest.raises(UserError) as e:
      ckpt.save(2, _random_state(2), META, force=True)
    message = str(e.value)
    assert message.startswith(f"cannot write checkpoint 2 to {disk}/checkpoints: ")
    assert ("not enough free space" if fault == "full" else "Read-only file system") in message
    assert "needs about 40000 bytes" in message and "(newest: step 1)" in message
    assert "\n" not in message
    restored, meta = ckpt.restore(_abstract(_random_state(1)))
    _assert_same(restored, _random_state(1))
    assert ckpt.all_steps() == [1] and meta == META
    ckpt.close()


@pytest.mark.parametrize("async_save", [False, True])
def test_a_disk_that_fills_during_the_write_is_one_user_error_and_keeps_the_last(
    tmp_path, async_save):
  """Room for the arrays but not for Orbax's metadata files beside them: the check before
  the save passes, the write itself fails (for an async save, seen at the next wait)."""
  with small_disk(tmp_path / "disk", 1 << 20) as disk:
    ckpt = Checkpointer(disk / "checkpoints", keep=1, async_save=async_save)
    ckpt.save(1, {"w": jnp.zeros((10_000,), jnp.float32)}, META, force=True)
    ckpt.wait()
    fill(disk, 48 << 10)
    with pytest.raises(UserError) as e:
      ckpt.save(2, _random_state(2), META, force=True)
      ckpt.wait()
    assert str(e.value).startswith(f"cannot write checkpoint 2 to {disk}/checkpoints: ")
    assert "No space left on device" in str(e.value) and "(newest: step 1)" in str(e.value)
    assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["1"]  # partial gone
    restored, _ = ckpt.restore(_abstract({"w": jnp.zeros((10_000,), jnp.float32)}))
    assert not np.asarray(restored["w"]).any()
    ckpt.close()


def test_an_unwritable_directory_is_a_user_error(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match=r"--workdir=.*/file/run is not writable \(Not a directory"):
    checkpoint_lib.check_writable(str(tmp_path / "file" / "run"), "--workdir")
  with small_disk(tmp_path / "disk", 1 << 20) as disk:
    make_read_only(disk)
    with pytest.raises(UserError, match=r"is not writable \(Read-only file system\)"):
      checkpoint_lib.check_writable(str(disk / "run"), "--workdir")
