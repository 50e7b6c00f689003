"""The GRPO step's phases, each on its own, and the whole step against a frozen copy of its
outputs (tests/make_step_golden.py)."""

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax import completion_logps as logps_lib
from grpo_jax import config as config_lib
from grpo_jax import logprobs as logprobs_lib
from grpo_jax import loss as loss_lib
from grpo_jax import main as main_lib
from grpo_jax import metrics as metrics_lib
from grpo_jax import models
from grpo_jax import optimizer as optimizer_lib
from grpo_jax import sampler as sampler_lib
from grpo_jax import scoring
from grpo_jax import train_step as train_step_lib

B, G, T, N = 2, 3, 5, 6
TEMPERATURE = 0.7
EOS = 7
GOLDEN = pathlib.Path(__file__).parent / "data" / "step_golden.json"


def _model(remat=False):
  config = models.ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              attention_bias=True, remat=remat)
  return nnx.split(models.init(config, seed=1), nnx.Param)


def _settings(**grpo) -> train_step_lib.StepSettings:
  accum = grpo.pop("grad_accum_steps", 1)
  grpo = config_lib.GrpoCfg(**{"num_generations": G, "epsilon_high": 0.2, **grpo})
  sampling = sampler_lib.SamplingSettings(max_new_tokens=N, temperature=TEMPERATURE,
                                          eos_token_ids=(EOS,), pad_token_id=0)
  return train_step_lib.StepSettings(grpo=grpo, grad_accum_steps=accum, sampling=sampling)


def _batch() -> train_step_lib.Batch:
  """B left-padded prompts (2 and 0 pad tokens)."""
  rng = np.random.RandomState(0)
  mask = (np.arange(T)[None] >= np.array([[2], [0]])).astype(np.int32)
  return train_step_lib.Batch(prompt_tokens=jnp.asarray(rng.randint(8, 64, (B, T)) * mask),
                              prompt_mask=jnp.asarray(mask), row_ids=jnp.asarray([5, 3]))


def _rollout(share=G) -> train_step_lib.Rollout:
  """The B prompts of _batch, one per block of `share` rows; completions [B*G, N] whose masks
  end at different lengths (1 to N tokens)."""
  batch = _batch()
  rng = np.random.RandomState(1)
  lengths = np.array([N, 3, 1, N, 4, 2])
  mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
  return train_step_lib.Rollout(
      prompt_tokens=jnp.repeat(batch.prompt_tokens, G // share, axis=0),
      prompt_mask=jnp.repeat(batch.prompt_mask, G // share, axis=0),
      tokens=jnp.asarray(rng.randint(8, 64, (B * G, N)) * mask, jnp.int32),
      mask=jnp.asarray(mask), finished=jnp.asarray(lengths < N))


def _rewards(total, **steps) -> scoring.Rewards:
  """Rewards [B*G] with one reward function (the total), and step arrays when given."""
  total = jnp.asarray(total, jnp.float32)
  return scoring.Rewards(total=total, per_fn=total[None], failures=jnp.int32(0),
                         seconds=jnp.float32(0.0), **steps)


def _full_forward_logits(graphdef, params, rollout):
  """[R, N, V] the logits that predict the completion tokens, from one forward over prompt +
  completion, row by row."""
  per_row = lambda x: jnp.repeat(x, rollout.tokens.shape[0] // x.shape[0], axis=0)
  tokens = jnp.concatenate([per_row(rollout.prompt_tokens), rollout.tokens], axis=1)
  mask = jnp.concatenate([per_row(rollout.prompt_mask), rollout.mask], axis=1)
  return nnx.merge(graphdef, params)(tokens, mask)[:, T - 1:-1]


def _full_forward_logps(graphdef, params, rollout):
  """The definition: log softmax(logits / temperature) over prompt + completion, row by row."""
  return logprobs_lib.token_logprobs(_full_forward_logits(graphdef, params, rollout),
                                     rollout.tokens, temperature=TEMPERATURE)


def _full_forward_entropy(graphdef, params, rollout):
  """The definition: -sum_v p log p of p = softmax(logits / temperature), [R, N]."""
  log_p = jax.nn.log_softmax(_full_forward_logits(graphdef, params, rollout) / TEMPERATURE, -1)
  return -jnp.sum(jnp.exp(log_p) * log_p, -1)


# -- log-probs with a prompt shared by a block of rows -----------------------------------------


@pytest.mark.parametrize("share", [G, 1])
def test_shared_prompt_logps_equal_a_full_forward(share):
  graphdef, params = _model()
  r = _rollout(share)
  got = logps_lib.completion_logps(graphdef, params, r.prompt_tokens, r.prompt_mask,
                                        r.tokens, r.mask, TEMPERATURE)
  want = _full_forward_logps(graphdef, params, r)
  valid = np.asarray(r.mask) == 1
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_shared_prompt_gradients_equal_a_full_forward(remat):
  graphdef, params = _model(remat)
  r = _rollout()
  weights = jax.random.normal(jax.random.key(0), r.mask.shape) * r.mask
  shared = lambda p: jnp.sum(weights * logps_lib.completion_logps(
      graphdef, p, r.prompt_tokens, r.prompt_mask, r.tokens, r.mask, TEMPERATURE))
  full = lambda p: jnp.sum(weights * _full_forward_logps(graphdef, p, r))
  got, want = jax.jit(jax.grad(shared))(params), jax.jit(jax.grad(full))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


@pytest.mark.parametrize("rows, shards, share", [(6, 1, 3), (6, 2, 3), (4, 1, 1), (12, 2, 3),
                                                 (3, 1, 3), (2, 2, 1), (3, 2, 3)])
def test_prompt_share_divides_groups_and_each_shards_rows(rows, shards, share):
  assert logps_lib.prompt_share(G, rows, shards) == share


# -- the phases --------------------------------------------------------------------------------


def test_sample_draws_g_rows_per_prompt_as_the_sampler_does():
  graphdef, params = _model()
  settings, batch, key = _settings(), _batch(), jax.random.key(3)
  rollout = train_step_lib.sample(graphdef, params, batch, key, settings)
  assert rollout.prompt_tokens.shape == (B, T)  # one block of G rows per prompt
  want = sampler_lib.generate_from(nnx.merge(graphdef, params),
                                   jnp.repeat(batch.prompt_tokens, G, 0),
                                   jnp.repeat(batch.prompt_mask, G, 0), key, settings.sampling)
  np.testing.assert_array_equal(rollout.tokens, want.tokens)
  np.testing.assert_array_equal(rollout.mask, want.mask)
  has_eos = ((np.asarray(want.tokens) == EOS) & (np.asarray(want.mask) == 1)).any(-1)
  np.testing.assert_array_equal(rollout.finished, has_eos)


def test_score_calls_the_reward_callback_with_the_batch_row_ids():
  calls = []

  def reward_fn(row_ids, tokens, mask):
    calls.append((np.asarray(row_ids), np.asarray(tokens), np.asarray(mask)))
    total = np.asarray(tokens, np.float32).sum(-1) * np.repeat(row_ids, G)
    return scoring.Rewards(total=total, per_fn=np.stack([total, -total]),
                           failures=np.int32(2), seconds=np.float32(0.5))

  rollout = _rollout()
  rewards = jax.jit(lambda ids, r: train_step_lib.score(reward_fn, 2, ids, r))(
      _batch().row_ids, rollout)
  (row_ids, tokens, mask), = calls
  assert row_ids.tolist() == [5, 3]
  np.testing.assert_array_equal(tokens, rollout.tokens)
  np.testing.assert_array_equal(mask, rollout.mask)
  want = np.asarray(rollout.tokens).sum(-1) * np.array([5.0] * G + [3.0] * G)
  np.testing.assert_allclose(rewards.total, want)
  np.testing.assert_allclose(rewards.per_fn[1], -want)
  assert int(rewards.failures) == 2 and float(rewards.seconds) == 0.5


def test_advantage_masks_truncated_rows_and_drops_groups_without_signal():
  rollout = _rollout()
  rewards = jnp.asarray([1.0, 0.0, 1.0, 2.0, 2.0, 2.0])  # the second group: all equal
  plain = train_step_lib.advantage(_rewards(rewards), rollout, _settings().grpo)
  np.testing.assert_array_equal(plain.loss_mask, rollout.mask)
  assert plain.zero_std.tolist() == [False, True] and plain.kept.tolist() == [1.0] * 6
  np.testing.assert_allclose(plain.advs[3:], 0.0)
  assert plain.advs[0] > 0 > plain.advs[1]
  masked = train_step_lib.advantage(_rewards(rewards), rollout, _settings(
      mask_truncated_completions=True, drop_zero_std_groups=True).grpo)
  keep = np.array([0, 1, 1, 0, 0, 0])  # rows 0 and 3 never reached EOS; the second group goes
  np.testing.assert_array_equal(masked.loss_mask, np.asarray(rollout.mask) * keep[:, None])
  assert masked.kept.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("grpo, passes", [
    (dict(), (False, False)), (dict(beta=0.04), (False, True)),
    (dict(num_iterations=2), (True, False)), (dict(minibatches_per_iteration=2), (True, False)),
    (dict(num_iterations=2, beta=0.04, grad_accum_steps=2), (True, True))])
def test_reference_logps_computes_only_the_passes_the_loss_needs(grpo, passes):
  """Only the passes the loss reads, each equal to a full forward row by row, micro-batched
  or not."""
  graphdef, params = _model()
  state = train_step_lib.init_state(params, optimizer_lib.make_optimizer(
      learning_rate=1e-3, total_updates=2)[0], beta=grpo.get("beta", 0.0), seed=0)
  rollout = _rollout()
  old, ref = train_step_lib.reference_logps(graphdef, state, rollout, _settings(**grpo))
  assert (old is not None, ref is not None) == passes
  want = _full_forward_logps(graphdef, params, rollout)
  valid = np.asarray(rollout.mask) == 1
  for got in (x for x in (old, ref) if x is not None):
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)


def test_reference_logps_hold_one_micro_batch_at_a_time():
  """The passes run over the update's micro-batches in turn: with A = 4 the compiled pass
  needs well under half the temporary memory of the same pass over all rows (CPU compiler)."""
  graphdef, params = _model()
  state = train_step_lib.init_state(params, optimizer_lib.make_optimizer(
      learning_rate=1e-3, total_updates=2)[0], beta=0.04, seed=0)
  b, g, n = 8, 2, 64
  rollout = train_step_lib.Rollout(
      prompt_tokens=jnp.ones((b, T), jnp.int32), prompt_mask=jnp.ones((b, T), jnp.int32),
      tokens=jnp.ones((b * g, n), jnp.int32), mask=jnp.ones((b * g, n), jnp.int32),
      finished=jnp.ones((b * g,), bool))

  def temp_bytes(accum):
    settings = _settings(beta=0.04, num_generations=g, grad_accum_steps=accum)
    passes = jax.jit(functools.partial(train_step_lib.reference_logps, graphdef,
                                       settings=settings))
    return passes.lower(state, rollout).compile().memory_analysis().temp_size_in_bytes

  whole, quarter = temp_bytes(1), temp_bytes(4)
  assert quarter < 0.45 * whole, (quarter, whole)


def test_loss_batches_split_whole_groups_and_share_prompts_within_micro_batches():
  rollout = _rollout()
  advs = train_step_lib.advantage(_rewards(jnp.arange(6.0)), rollout, _settings().grpo)
  settings = _settings(minibatches_per_iteration=2)
  batches = train_step_lib.loss_batches(rollout, advs, None, None, settings)
  assert batches.tokens.shape == (2, 1, 3, N) and batches.prompt_tokens.shape == (2, 1, 1, T)
  np.testing.assert_array_equal(batches.prompt_tokens[1, 0, 0], rollout.prompt_tokens[1])
  # Micro-batches of one row each (A = 3, M = 2): each row carries its own prompt.
  settings = dataclasses.replace(settings, grad_accum_steps=3)
  batches = train_step_lib.loss_batches(rollout, advs, None, None, settings)
  assert batches.tokens.shape == (2, 3, 1, N) and batches.prompt_tokens.shape == (2, 3, 1, T)
  np.testing.assert_array_equal(batches.prompt_tokens[1, 2, 0], rollout.prompt_tokens[1])
  assert batches.old_logps is None


def _update(settings, rollout, advs, old=None, ref=None):
  """train_step.update with plain SGD at rate 1: the parameters move by minus the gradient."""
  graphdef, params = _model()
  tx = optax.sgd(1.0)
  batches = train_step_lib.loss_batches(rollout, advs, old, ref, settings)
  return train_step_lib.update(graphdef, tx, params, tx.init(params), batches, settings)


@pytest.mark.parametrize("loss_type", config_lib.LOSS_TYPES)
def test_accumulated_micro_batches_give_the_minibatch_gradient(loss_type):
  rollout = _rollout()
  grpo = dict(loss_type=loss_type, beta=0.04, drop_zero_std_groups=True)
  rewards = jnp.asarray([1.0, 0.0, 3.0, 2.0, 2.0, 2.0])
  advs = train_step_lib.advantage(_rewards(rewards), rollout, _settings(**grpo).grpo)
  graphdef, params = _model()
  ref = _full_forward_logps(graphdef, jax.tree.map(lambda x: x * 1.01, params), rollout)
  whole = _update(_settings(**grpo), rollout, advs, ref=ref)
  split = _update(_settings(grad_accum_steps=3, **grpo), rollout, advs, ref=ref)
  # The loss of an on-policy step is near 0 (zero-mean advantages): compare it absolutely.
  np.testing.assert_allclose(split[2]["loss"], whole[2]["loss"], rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               split[0], whole[0])


def test_update_loss_is_the_grpo_loss_of_the_minibatch():
  graphdef, params = _model()
  rollout = _rollout()
  advs = train_step_lib.advantage(_rewards([1.0, 0.0, 3.0, 2.0, 5.0, 2.0]), rollout,
                                  _settings().grpo)
  _, _, metrics = _update(_settings(loss_type="dr_grpo"), rollout, advs)
  logps = _full_forward_logps(graphdef, params, rollout)
  want, aux = loss_lib.grpo_loss(logps, None, None, advs.advs, advs.loss_mask,
                                 loss_type="dr_grpo", max_completion_length=N)
  np.testing.assert_allclose(metrics["loss"][0], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["clip_ratio/region_mean"][0], aux["clip_ratio/region_mean"])


def test_update_measures_the_policys_entropy_over_the_completion_tokens():
  graphdef, params = _model()
  rollout = _rollout()
  advs = train_step_lib.advantage(_rewards([1.0, 0.0, 3.0, 2.0, 5.0, 2.0]), rollout,
                                  _settings(mask_truncated_completions=True).grpo)
  _, _, metrics = _update(_settings(grad_accum_steps=3), rollout, advs)
  entropy = np.asarray(_full_forward_entropy(graphdef, params, rollout))
  valid = np.asarray(rollout.mask) == 1  # every sampled token, truncated rows too
  np.testing.assert_allclose(metrics["entropy_sum"][0] / metrics["entropy_tokens"][0],
                             entropy[valid].mean(), rtol=1e-5)


@pytest.mark.parametrize("accum", [1, 3])
def test_top_entropy_quantile_keeps_the_policy_term_of_each_micro_batchs_top_tokens(accum):
  graphdef, params = _model()
  rollout = _rollout()
  grpo = dict(loss_type="dapo", beta=0.04, grad_accum_steps=accum)
  advs = train_step_lib.advantage(_rewards([1.0, 0.0, 3.0, 2.0, 5.0, 2.0]), rollout,
                                  _settings(**grpo).grpo)
  ref = _full_forward_logps(graphdef, jax.tree.map(lambda x: x * 1.01, params), rollout)
  _, _, masked = _update(_settings(top_entropy_quantile=0.5, **grpo), rollout, advs, ref=ref)
  _, _, plain = _update(_settings(**grpo), rollout, advs, ref=ref)
  logps = _full_forward_logps(graphdef, params, rollout)
  entropy = _full_forward_entropy(graphdef, params, rollout)
  want = 0.0
  for rows in np.split(np.arange(B * G), accum):  # each micro-batch takes its own quantile
    policy_mask = loss_lib.high_entropy_mask(entropy[rows], advs.loss_mask[rows], 0.5)
    want += loss_lib.grpo_loss(
        logps[rows], None, ref[rows], advs.advs[rows], advs.loss_mask[rows], beta=0.04,
        loss_type="dapo", num_items_in_batch=advs.loss_mask.sum(), policy_mask=policy_mask)[0]
  np.testing.assert_allclose(masked["loss"][0], want, rtol=1e-5, atol=1e-7)
  assert abs(float(masked["loss"][0] - plain["loss"][0])) > 1e-4
  np.testing.assert_allclose(masked["kl"][0], plain["kl"][0], rtol=1e-6)  # KL: every token


def test_minibatches_update_one_after_another_and_iterations_repeat_them():
  rollout = _rollout()
  advs = train_step_lib.advantage(_rewards([1.0, 0.0, 3.0, 2.0, 5.0, 2.0]), rollout,
                                  _settings().grpo)
  graphdef, params = _model()
  old = _full_forward_logps(graphdef, params, rollout)
  _, _, metrics = _update(_settings(minibatches_per_iteration=2, num_iterations=2), rollout,
                          advs, old=old)
  assert metrics["loss"].shape == (4,)
  # The first update is on-policy (ratio 1); the ones after it see moved parameters.
  assert metrics["clip_ratio/region_mean"][0] == 0
  assert not np.allclose(metrics["grad_norm"][0], metrics["grad_norm"][2])


def test_reset_reference_copies_the_policy_every_k_steps():
  ref, params = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  assert train_step_lib.reset_reference(None, params, jnp.int32(2), 2) is None
  assert train_step_lib.reset_reference(ref, params, jnp.int32(2), 0) is ref
  reset = lambda step: train_step_lib.reset_reference(ref, params, jnp.int32(step), 2)["w"]
  np.testing.assert_array_equal(reset(4), 1)
  np.testing.assert_array_equal(reset(3), 0)


# -- the whole step against a frozen copy of its outputs ---------------------------------------


@pytest.mark.parametrize("name", ["plain", "options"])
def test_step_metrics_equal_the_frozen_golden_run(tmp_path, name):
  from tests import make_step_golden
  golden = json.loads(GOLDEN.read_text())[name]
  main_lib.run(make_step_golden.config(name), str(tmp_path))
  records = [r for r in metrics_lib.read_metrics(str(tmp_path)) if "train/loss" in r]
  assert len(records) == len(golden)
  for got, want in zip(records, golden):
    for key, value in want.items():
      assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (got["step"], key)
