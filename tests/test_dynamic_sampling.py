"""Dynamic sampling inside the train step (grpo.oversample): B' groups sampled, the B the
update trains on chosen with those that have signal first."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import config as config_lib
from grpo_jax import main as main_lib
from grpo_jax import scoring
from grpo_jax import train_step as train_step_lib
from tests.test_train import tiny_config, train_records
from tests.test_train_step import _settings

G, SAMPLED, KEPT, T, N = 2, 4, 3, 3, 4


def _inputs(total, **steps):
  """A batch of SAMPLED prompts, their rollout (every value tells its row) and rewards."""
  r = SAMPLED * G
  prompts = jnp.arange(SAMPLED * T, dtype=jnp.int32).reshape(SAMPLED, T) + 100
  batch = train_step_lib.Batch(prompt_tokens=prompts, prompt_mask=jnp.ones_like(prompts),
                               row_ids=jnp.arange(SAMPLED, dtype=jnp.int32))
  tokens = jnp.arange(r * N, dtype=jnp.int32).reshape(r, N)
  rollout = train_step_lib.Rollout(
      prompt_tokens=prompts, prompt_mask=batch.prompt_mask, tokens=tokens,
      mask=(jnp.arange(N)[None] <= jnp.arange(r)[:, None] % N).astype(jnp.int32),
      finished=jnp.arange(r) % 3 == 0)
  total = jnp.asarray(total, jnp.float32)
  rewards = scoring.Rewards(total=total, per_fn=jnp.stack([total, -total]),
                            failures=jnp.int32(0), seconds=jnp.float32(0.0), **steps)
  return batch, rollout, rewards


def _kept_settings(**grpo):
  return dataclasses.replace(_settings(num_generations=G, **grpo), kept_groups=KEPT)


def _check_rows_follow_their_groups(batch, rollout, rewards, kept, groups):
  rows = [group * G + i for group in groups for i in range(G)]
  np.testing.assert_array_equal(kept.rollout.tokens, rollout.tokens[np.asarray(rows)])
  np.testing.assert_array_equal(kept.rollout.mask, rollout.mask[np.asarray(rows)])
  np.testing.assert_array_equal(kept.rollout.finished, rollout.finished[np.asarray(rows)])
  # One prompt a group (S = G rows share it), the kept group's own.
  np.testing.assert_array_equal(kept.rollout.prompt_tokens,
                                batch.prompt_tokens[np.asarray(groups)])
  np.testing.assert_array_equal(kept.rewards.total, rewards.total[np.asarray(rows)])
  np.testing.assert_array_equal(kept.rewards.per_fn, rewards.per_fn[:, np.asarray(rows)])
  return rows


def test_groups_with_signal_come_first_and_their_rows_follow_them():
  # Groups 1 and 3 have signal; group 0 then fills the third place (sampled order).
  batch, rollout, rewards = _inputs([1, 1, 0, 1, 2, 2, 3, 0])
  settings = _kept_settings()
  kept = train_step_lib.select_groups(batch, rollout, rewards, settings)
  assert kept.with_signal.tolist() == [False, True, False, True]
  rows = _check_rows_follow_their_groups(batch, rollout, rewards, kept, [1, 3, 0])
  assert kept.rewards.step_rewards is None
  # Advantages and loss masks are those of the same rows had every group been trained on.
  grpo = _settings(num_generations=G, mask_truncated_completions=True,
                   drop_zero_std_groups=True).grpo
  want = train_step_lib.advantage(rewards, rollout, grpo)
  got = train_step_lib.advantage(kept.rewards, kept.rollout, grpo)
  for field in ("advs", "loss_mask", "kept"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field)[np.asarray(rows)])
  assert got.zero_std.tolist() == [False, False, True]


def test_too_few_groups_with_signal_leave_groups_without_in_sampled_order():
  batch, rollout, rewards = _inputs([1, 1, 0, 0, 2, 5, 3, 3])
  kept = train_step_lib.select_groups(batch, rollout, rewards, _kept_settings())
  assert kept.with_signal.tolist() == [False, False, True, False]
  _check_rows_follow_their_groups(batch, rollout, rewards, kept, [2, 0, 1])


def test_process_supervision_selects_by_step_rewards_and_moves_the_steps():
  r = SAMPLED * G
  ends = jnp.tile(jnp.asarray([[0, 2]], jnp.int32), (r, 1))
  step_rewards = jnp.ones((r, 2)).at[6, 1].set(0.0)  # only group 3's steps differ
  truncated = jnp.arange(r, dtype=jnp.int32)
  batch, rollout, rewards = _inputs([0, 1, 0, 1, 0, 1, 0, 0], step_rewards=step_rewards,
                                    step_ends=ends, steps_truncated=truncated)
  kept = train_step_lib.select_groups(batch, rollout, rewards,
                                      _kept_settings(supervision="process"))
  assert kept.with_signal.tolist() == [False, False, False, True]  # not the outcome's 0/1
  rows = np.asarray(_check_rows_follow_their_groups(batch, rollout, rewards, kept, [3, 0, 1]))
  np.testing.assert_array_equal(kept.rewards.step_rewards, step_rewards[rows])
  np.testing.assert_array_equal(kept.rewards.step_ends, ends[rows])
  np.testing.assert_array_equal(kept.rewards.steps_truncated, truncated[rows])


def test_without_oversampling_every_group_stays_where_it_is():
  batch, rollout, rewards = _inputs([1, 1, 0, 1, 2, 2, 3, 0])
  settings = dataclasses.replace(_kept_settings(), kept_groups=SAMPLED)
  kept = train_step_lib.select_groups(batch, rollout, rewards, settings)
  assert kept.rollout is rollout and kept.rewards is rewards


@pytest.mark.parametrize("supervision", ["outcome", "process"])
def test_training_with_oversampling_draws_and_counts_the_sampled_groups(tmp_path, supervision):
  process = {"grpo.supervision": "process", "step_rewards": "tests.test_reliability:digit_steps"}
  process = process if supervision == "process" else {}
  cfg = config_lib.freeze(tiny_config(**{
      "grpo.oversample": 2.0, "rewards": "tests.test_reliability:digit_reward",
      "grpo.drop_zero_std_groups": True, "eval.num_prompts": 0, **process}))
  assert (cfg.data.prompts_per_step, cfg.sampled_prompts_per_step) == (2, 4)
  trainer = main_lib.Trainer(cfg, str(tmp_path))
  trainer.run()
  records = train_records(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert r["rl/groups_sampled"] == 4
    assert r["rl/groups_short"] == max(2 - r["rl/groups_with_signal"], 0)
    # The kept groups without signal are exactly the short ones.
    assert r["rl/frac_zero_std_groups"] * 2 == r["rl/groups_short"]
    assert np.isfinite(r["train/loss"])
  assert any(r["rl/groups_with_signal"] > 0 for r in records)
  # The stream moved by B' prompts a step, and the checkpoint holds that position.
  position = trainer.stream.state()
  assert (position["epoch"], position["index"]) == (0, 8)
  _, meta = trainer.ckpt.restore(trainer.state, step=2)
  assert meta["data"] == position
