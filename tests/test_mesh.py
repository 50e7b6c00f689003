"""Sharded GRPO steps on 8 fake CPU devices give the numbers of one device; layouts and memory."""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from grpo_jax import advantages
from grpo_jax import builder
from grpo_jax import completion_logps
from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import evaluate
from grpo_jax import loss
from grpo_jax import main as main_lib
from grpo_jax import mesh as mesh_lib
from grpo_jax import models
from grpo_jax import optimizer as optimizer_lib
from grpo_jax import sampler
from grpo_jax import scoring
from grpo_jax import train_step as train_step_lib
from tests.test_train import tiny_config, train_records

MESHES = ((2, 2, 2), (1, 8, 1))
# The token-count (dapo) normaliser, the batch-level reward std and a KL term: the numbers
# that would change if any of them were taken per shard instead of over the whole batch.
OVERRIDES = {"grpo.loss_type": "dapo", "grpo.scale_rewards": "batch", "grpo.beta": 0.04,
             "rewards": "tests.test_mesh:digit_share", "train.learning_rate": 1e-2,
             "train.num_steps": 3, "eval.num_prompts": 0}
# LoRA adapters on every projection, pi_ref's own adapters reset after step 2.
LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "grpo.ref_reset_every": 2}


def digit_share(prompts, completions, **unused):
  """Test reward: the share of digits in the completion (varies within most groups)."""
  return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def sharded_config(shape, **overrides):
  """The comparison config frozen for a mesh of prod(shape) of the 8 devices."""
  cfg = tiny_config(**OVERRIDES, **overrides, **{"mesh.shape": shape})
  return config_lib.freeze(cfg, num_devices=math.prod(shape))


def relative_error(params, reference) -> float:
  """|params - reference| / |reference| over all parameters together (L2)."""
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
  a, b = flat(params), flat(reference)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def train_on_meshes(tmp_path_factory, **overrides):
  """{mesh shape: (trainer, train records)} after 3 steps on one device and on each mesh."""
  out = {}
  for shape in ((1, 1, 1),) + MESHES:
    workdir = str(tmp_path_factory.mktemp("mesh"))
    trainer = main_lib.Trainer(sharded_config(shape, **overrides), workdir)
    trainer.run()
    out[shape] = trainer, train_records(workdir)
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return train_on_meshes(tmp_path_factory)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
  return train_on_meshes(tmp_path_factory, **LORA)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_steps_match_one_device(runs, shape):
  assert_runs_match(runs, shape)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_lora_steps_match_one_device(lora_runs, shape):
  assert_runs_match(lora_runs, shape)
  trainer, _ = lora_runs[shape]
  adapter = trainer.state.params["layers"][0]["attn"]["q_lora"]
  # A [D, r] follows q's input axis (embed: fsdp), B [r, H, K] its heads; the rank is whole.
  assert adapter["a"].get_value().sharding.spec == P("fsdp", None)
  assert adapter["b"].get_value().sharding.spec == P(None, "tensor" if shape[2] > 1 else None, None)
  assert trainer.state.ref_params is not None


def assert_runs_match(runs, shape):
  ref_trainer, ref_records = runs[(1, 1, 1)]
  trainer, records = runs[shape]
  assert trainer.setup.mesh.devices.size == 8 and ref_trainer.setup.mesh.devices.size == 1
  specs = {x.sharding.spec for x in jax.tree.leaves(trainer.state.params)}
  assert any("fsdp" in spec for spec in specs), specs  # the params really are sharded
  assert relative_error(trainer.state.params, ref_trainer.state.params) < 1e-5
  assert [r["step"] for r in records] == [1, 2, 3]
  for got, want in zip(records, ref_records):
    assert want["rl/reward_std"] > 0  # the rewards vary, so the loss is not only KL
    for key, value in want.items():
      if not key.startswith("perf/"):
        # abs: with mu = 1 the loss is a mean of zero-mean advantages (plus KL), near 0.
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (got["step"], key)


@pytest.mark.parametrize("shape", ((1, 1, 1),) + MESHES)
def test_the_train_step_compiles_once_over_three_steps(runs, shape):
  trainer, _ = runs[shape]
  assert trainer.train_step._cache_size() == 1


def test_normalisers_are_global_over_a_sharded_batch():
  """Token counts, group/batch reward statistics and means under jit with the rows over 8
  devices equal those of unsharded inputs."""
  mesh = mesh_lib.make_mesh((2, 4, 1))
  rows = mesh_lib.batch_sharding(mesh)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  r, n, g = 16, 6, 4
  logps = -jax.random.uniform(k1, (r, n))
  old = logps + 0.1 * jax.random.normal(k2, (r, n))
  ref = logps + 0.1 * jax.random.normal(k3, (r, n))
  mask = (jnp.arange(n)[None] < jnp.arange(r)[:, None] % n + 1).astype(jnp.int32)
  rewards = jax.random.uniform(k4, (r,))

  def stats(logps, old, ref, mask, rewards):
    out = {"reward_std": rewards.std(ddof=1)}
    for scale in ("group", "batch"):
      advs = advantages.group_advantages(rewards, g, scale=scale)
      out[f"advs_{scale}"] = advs
      for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        out[f"{loss_type}_{scale}"], _ = loss.grpo_loss(logps, old, ref, advs, mask, beta=0.04,
                                                        loss_type=loss_type)
    return out

  args = (logps, old, ref, mask, rewards)
  sharded_args = jax.device_put(args, rows)
  assert sharded_args[0].addressable_shards[0].data.shape == (r // 8, n)
  sharded = jax.jit(stats)(*sharded_args)
  single = jax.jit(stats)(*args)
  for key, value in single.items():
    np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(value), rtol=1e-5,
                               err_msg=key)


def demo_params(hidden_size: int = 64):
  """(graphdef, params) of the demo model with width D = hidden_size."""
  cfg = config_lib.freeze(tiny_config(**{"model.demo.hidden_size": hidden_size,
                                         "model.demo.intermediate_size": 2 * hidden_size}),
                          num_devices=8)
  tokenizer = data_lib.demo_tokenizer()
  return nnx.split(models.init(builder.demo_model_config(cfg, tokenizer))), tokenizer


def test_fsdp_holds_an_eighth_of_params_and_optimizer_state_per_device():
  (_, params), _ = demo_params()
  tx, _ = optimizer_lib.make_optimizer(learning_rate=1e-3, total_updates=10)

  def per_device_state_bytes(shape) -> int:
    mesh = mesh_lib.make_mesh(shape)
    shardings = mesh_lib.param_shardings(params, mesh)
    opt_shardings = mesh_lib.opt_state_shardings(tx, jax.eval_shape(tx.init, params), shardings)
    replicated = mesh_lib.replicated(mesh)
    state_shardings = train_step_lib.TrainState(step=replicated, params=shardings,
                                                opt_state=opt_shardings, ref_params=shardings,
                                                key=replicated)
    init = jax.jit(functools.partial(train_step_lib.init_state, tx=tx, beta=0.04, seed=0),
                   out_shardings=state_shardings)
    return init.lower(jax.device_put(params, shardings)).compile().memory_analysis(
    ).output_size_in_bytes

  state = jax.eval_shape(functools.partial(train_step_lib.init_state, tx=tx, beta=0.04, seed=0),
                         params)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  # One device holds everything (give or take the output tuple's few hundred bytes).
  assert per_device_state_bytes((1, 1, 1)) == pytest.approx(total, rel=1e-2)
  fsdp = per_device_state_bytes((1, 8, 1))
  # Params, AdamW's two moments and the reference params: all but the norm scales and the
  # qkv biases (no model-width dimension to shard) split 8 ways.
  assert total / 8 <= fsdp <= 1.1 * total / 8, fsdp / total


def test_optimizer_state_follows_the_param_layout():
  (_, params), _ = demo_params()
  mesh = mesh_lib.make_mesh((2, 2, 2))
  tx, _ = optimizer_lib.make_optimizer(learning_rate=1e-3, total_updates=10)
  shardings = mesh_lib.param_shardings(params, mesh)
  opt = mesh_lib.opt_state_shardings(tx, jax.eval_shape(tx.init, params), shardings)
  adam = opt.inner_state[1][0]
  assert jax.tree.leaves(adam.mu) == jax.tree.leaves(shardings)
  assert jax.tree.leaves(adam.nu) == jax.tree.leaves(shardings)
  assert adam.count.spec == P() and opt.notfinite_count.spec == P()


def test_logical_rules_shard_what_divides_and_use_each_axis_once():
  mesh = mesh_lib.make_mesh((1, 4, 2))
  assert mesh_lib.spec_for(("vocab", "embed"), (106, 64), mesh) == P("tensor", "fsdp")
  assert mesh_lib.spec_for(("vocab", "embed"), (105, 66), mesh) == P(None, None)
  assert mesh_lib.spec_for(("heads", "mlp"), (4, 8), mesh) == P("tensor", None)
  assert mesh_lib.spec_for(("norm",), (64,), mesh) == P(None)
  assert mesh_lib.make_mesh((1, -1, 2)).shape == {"data": 1, "fsdp": 4, "tensor": 2}
  assert list(mesh_lib.make_mesh((1, 2, 1)).devices.flat) == jax.devices()[:2]


def test_rollout_layout_gathers_batch_axes_in_the_compute_dtype():
  (_, params), _ = demo_params()
  mesh = mesh_lib.make_mesh((1, 4, 2))
  shardings = mesh_lib.param_shardings(params, mesh)
  assert mesh_lib.rollout_sharding(NamedSharding(mesh, P("tensor", "fsdp"))).spec == P("tensor", None)
  out = jax.jit(lambda p: mesh_lib.rollout_params(p, shardings, jnp.bfloat16))(
      jax.device_put(params, shardings))
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(params)):
    norm = "norm" in jax.tree_util.keystr(path)
    assert got.dtype == (want.dtype if norm else jnp.bfloat16), path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(got.dtype)))
    assert "fsdp" not in got.sharding.spec, path


def test_rollout_layout_decodes_without_collectives():
  """Rows over (data, fsdp) and weights gathered once: no all-reduce or all-gather runs per
  new token, unlike in the FSDP training layout."""
  (graphdef, params), tokenizer = demo_params()
  mesh = mesh_lib.make_mesh((1, 8, 1))
  shardings = mesh_lib.param_shardings(params, mesh)
  settings = sampler.SamplingSettings(max_new_tokens=4, eos_token_ids=(), pad_token_id=0)
  tokens, mask = jnp.ones((8, 4), jnp.int32), jnp.ones((8, 4), jnp.int32)

  def generate(params, tokens, mask):
    tokens, mask = (jax.lax.with_sharding_constraint(x, mesh_lib.batch_sharding(mesh))
                    for x in (tokens, mask))
    policy = nnx.merge(graphdef, mesh_lib.rollout_params(params, shardings, jnp.float32))
    return sampler.generate_from(policy, tokens, mask, jax.random.key(0), settings).tokens

  hlo = jax.jit(generate).lower(jax.device_put(params, shardings), tokens, mask).compile().as_text()
  # The one all-reduce left is the loop condition's "every row has hit EOS" flag.
  assert set(re.findall(r"= (\S+) all-reduce\(", hlo)) == {"pred[]"}
  bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
  loops = [c for c in hlo.split("\n\n") if c.split(" ", 1)[0].lstrip("%") in bodies]
  assert loops and not any("all-gather" in c or "all-reduce" in c for c in loops)


def test_dynamic_sampling_gathers_groups_across_shards_and_lays_them_out_again():
  """select_groups under jit with the sampled rows over 8 devices: the groups of one device,
  and the kept rows split over the batch axes again."""
  from tests import test_dynamic_sampling as ds  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh((1, 8, 1))
  rows = mesh_lib.batch_sharding(mesh)
  sampled, kept, g = 8, 4, ds.G
  rng = np.random.RandomState(0)
  prompts = jnp.asarray(rng.randint(0, 50, (sampled, 3)), jnp.int32)
  batch = train_step_lib.Batch(prompt_tokens=prompts, prompt_mask=jnp.ones_like(prompts),
                               row_ids=jnp.arange(sampled, dtype=jnp.int32))
  rollout = train_step_lib.Rollout(
      prompt_tokens=prompts, prompt_mask=batch.prompt_mask,
      tokens=jnp.asarray(rng.randint(0, 50, (sampled * g, 5)), jnp.int32),
      mask=jnp.ones((sampled * g, 5), jnp.int32), finished=jnp.ones(sampled * g, bool))
  total = jnp.asarray(rng.randint(0, 2, sampled * g), jnp.float32)
  rewards = scoring.Rewards(total=total, per_fn=total[None], failures=jnp.int32(0),
                            seconds=jnp.float32(0.0))
  settings = dataclasses.replace(ds._kept_settings(), kept_groups=kept, row_shards=8)
  layout = train_step_lib.Layout(params=None, rows=rows)
  select = lambda *a: train_step_lib.select_groups(*a, settings, layout)
  single = jax.jit(lambda *a: train_step_lib.select_groups(*a, settings))(batch, rollout, rewards)
  sharded = jax.jit(select)(*jax.device_put((batch, rollout), rows), rewards)
  assert sharded.rollout.tokens.sharding.spec == rows.spec
  assert sharded.rollout.tokens.addressable_shards[0].data.shape == (kept * g // 8, 5)
  jax.tree.map(np.testing.assert_array_equal, sharded, single)
  assert 0 < int(single.with_signal.sum()) < sampled  # some groups moved, some did not


def test_log_prob_forward_splits_the_rows_not_the_model_width():
  """Under FSDP each device runs the log-prob forward on its own rows: MLP activations of
  [rows / 8 * tokens, F]. Left to follow the embedding table's layout (model width over
  fsdp), every device computed all rows' [rows * tokens, F] as partial sums (the ~9 GiB of
  the 1.5B TPU step)."""
  (graphdef, params), _ = demo_params()
  d, f = (getattr(nnx.merge(graphdef, params).config, k) for k in ("hidden_size",
                                                                    "intermediate_size"))
  mesh = mesh_lib.make_mesh((1, 8, 1))
  shardings = mesh_lib.param_shardings(params, mesh)
  rows = mesh_lib.batch_sharding(mesh)
  r, t, n = 48, 4, 5
  prompts, completions = jnp.ones((r, t), jnp.int32), jnp.ones((r, n), jnp.int32)

  def mlp_rows(row_sharding):
    logps = functools.partial(completion_logps.completion_logps, graphdef, temperature=1.0,
                              row_sharding=row_sharding)
    hlo = jax.jit(logps).lower(
        jax.device_put(params, shardings), *jax.device_put((prompts, prompts, completions,
                                                            completions), rows)
    ).compile().as_text()
    return {int(m) for m in re.findall(rf"\w+\[(\d+),{f}\]", hlo)} - {d}  # d: the weights

  assert max(mlp_rows(rows)) == r // 8 * max(t, n - 1)
  assert r * (n - 1) in mlp_rows(None)


def test_evaluation_samples_each_devices_own_rows():
  """Under FSDP the evaluation sampler splits its rows (and their KV cache) over the devices,
  as the rollout does; unsplit, every device sampled every row (7 GiB of KV cache per chip on
  the v5e-8 1.5B config). The samples are the same either way."""
  (graphdef, params), _ = demo_params()
  mesh = mesh_lib.make_mesh((1, 8, 1))
  shardings = mesh_lib.param_shardings(params, mesh)
  params = jax.device_put(params, shardings)
  settings = sampler.SamplingSettings(max_new_tokens=6, stop_at_eos=False)
  prompts = jnp.asarray(np.random.RandomState(0).randint(3, 20, (16, 5)), jnp.int32)
  args = (params, prompts, jnp.ones_like(prompts), jax.random.key(0))
  split = evaluate.make_sample_fn(graphdef, settings, train_step_lib.Layout(
      params=shardings, rows=mesh_lib.batch_sharding(mesh)))
  whole = evaluate.make_sample_fn(graphdef, settings)
  tokens, _ = split(*args, samples_per_prompt=2)
  assert tokens.sharding.shard_shape(tokens.shape)[0] == 16 * 2 // 8
  np.testing.assert_array_equal(tokens, whole(*args, samples_per_prompt=2)[0])

  def per_row_bytes(fn):  # what 48 more prompts add to the temporaries (the weights do not)
    temp = lambda p: fn.lower(params, jnp.ones((p, 5), jnp.int32), jnp.ones((p, 5), jnp.int32),
                              args[3], samples_per_prompt=2).compile().memory_analysis(
                              ).temp_size_in_bytes
    return temp(64) - temp(16)

  assert per_row_bytes(split) < per_row_bytes(whole) / 4
