"""Process supervision inside the train step: the reward callback's step arrays become the
token advantages the update trains on (the host side is tested in test_step_rewards.py)."""

import jax.numpy as jnp
import numpy as np

from grpo_jax import data, loss, process_scoring, rewards, scoring
from grpo_jax import optimizer as optimizer_lib
from grpo_jax import train_step as train_step_lib
from tests.test_step_rewards import ADD, think
from tests.test_step_rewards import _batch as encode
from tests.test_train_step import B, G, N, _batch, _full_forward_logps, _model, _settings

SLOTS = 3


def char_steps(prompts, completions, **unused):
  """Test step reward: every character ends a step worth ord(char) % 3 (many steps, varied)."""
  del prompts, unused
  return [[(i + 1, float(ord(ch) % 3)) for i, ch in enumerate(c)] for c in completions]


def char_count(prompts, completions, **unused):
  """Test outcome reward: the completion's length in characters."""
  del prompts, unused
  return [float(len(c)) for c in completions]


def _scorer(tokenizer, rows, step_spec, max_steps):
  return scoring.Scorer(
      tokenizer, rows, rewards.parse_spec("tests.test_process_supervision:char_count"),
      max_new_tokens=N, steps=process_scoring.StepScorer(
          tokenizer, rewards.parse_step_spec(step_spec), max_steps=max_steps))


def _by_hand(step_rewards, step_ends, group_size, num_tokens, eps=1e-4):
  """DeepSeekMath 4.1.3 read literally: normalise the rewards of all steps of a group, then
  give token t the sum of the normalised rewards of its row's steps that end at or after t."""
  advs = np.zeros((step_rewards.shape[0], num_tokens), np.float64)
  for first in range(0, step_rewards.shape[0], group_size):
    rows = range(first, first + group_size)
    steps = [(r, end, reward) for r in rows for end, reward in zip(step_ends[r], step_rewards[r])
             if end >= 0 and not np.isnan(reward)]
    values = np.asarray([reward for _, _, reward in steps], np.float64)
    if len(values) < 2 or values.max() == values.min():
      continue
    mean, std = values.mean(), values.std(ddof=1)
    for r, end, reward in steps:
      advs[r, :end + 1] += (reward - mean) / (std + eps)
  return advs


def test_the_step_trains_on_the_process_advantages_of_the_callbacks_steps():
  graphdef, params = _model()
  tokenizer = data.demo_tokenizer()
  rows = [{"prompt": f"row {i}"} for i in range(6)]
  scorer = _scorer(tokenizer, rows, "tests.test_process_supervision:char_steps,outcome:0.5",
                   SLOTS)
  calls = []

  def reward_fn(row_ids, tokens, mask):
    out = scorer(row_ids, tokens, mask)
    calls.append((np.asarray(tokens), np.asarray(mask), out))
    return out

  settings = _settings(supervision="process", max_steps_per_completion=SLOTS)
  tx, schedule = optimizer_lib.make_optimizer(learning_rate=1e-3, total_updates=1)
  state = train_step_lib.init_state(params, tx, beta=0.0, seed=0)
  step = train_step_lib.make_train_step(graphdef, tx, schedule, settings, reward_fn,
                                        scorer.names, donate=False)
  _, metrics = step(state, _batch())
  (tokens, mask, out), = calls
  assert out.step_rewards.shape == out.step_ends.shape == (B * G, SLOTS)
  assert out.steps_truncated.sum() > 0  # more characters than slots: steps were merged
  # The outcome step (half the outcome total) ends on each row's last token.
  last = [np.flatnonzero(m)[-1] for m in mask]
  np.testing.assert_array_equal(out.step_ends.max(-1), last)
  want_advs = _by_hand(out.step_rewards, out.step_ends, G, N)
  assert np.abs(want_advs).max() > 0.5
  batch = _batch()
  rollout = train_step_lib.Rollout(
      prompt_tokens=batch.prompt_tokens, prompt_mask=batch.prompt_mask,
      tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), finished=jnp.ones(B * G, bool))
  logps = _full_forward_logps(graphdef, params, rollout)
  want_loss, _ = loss.grpo_loss(logps, None, None, want_advs, mask)
  np.testing.assert_allclose(metrics["train/loss"], want_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["rl/advantage_abs_mean"],
                             np.abs(want_advs)[mask > 0].mean(), rtol=1e-5)
  has_step = out.step_ends >= 0
  np.testing.assert_allclose(metrics["rl/step_reward_mean"], out.step_rewards[has_step].mean(),
                             rtol=1e-6)
  assert metrics["rl/steps_truncated"] == out.steps_truncated.sum()
  np.testing.assert_allclose(metrics["rl/steps_per_completion"],
                             (has_step.sum(-1) + out.steps_truncated).mean())
  np.testing.assert_allclose(metrics["rl/reward_mean"], out.total.mean(), rtol=1e-6)


def test_one_wrong_step_gives_negative_advantage_up_to_its_end_in_the_step():
  tokenizer = data.demo_tokenizer()
  right = think("7+8=15, carry 1", "5+6+1=12, carry 1", "57+68=125")
  wrong = think("7+8=15, carry 1", "5+6+1=13, carry 1", "57+68=125")
  group = [right, wrong, right, right]
  tokens, mask = encode(tokenizer, group, 96)
  scorer = scoring.Scorer(tokenizer, [{"prompt": ADD, "answer": "125", "task": "arithmetic"}],
                          rewards.parse_spec("exact_match"), max_new_tokens=96,
                          steps=process_scoring.StepScorer(
                              tokenizer, rewards.parse_step_spec("arithmetic_steps"),
                              max_steps=8))
  out = scorer(np.asarray([0]), tokens, mask)
  np.testing.assert_array_equal(out.step_rewards[1, :4], [1, 0, 1, 1])
  rollout = train_step_lib.Rollout(
      prompt_tokens=jnp.zeros((1, 4), jnp.int32), prompt_mask=jnp.ones((1, 4), jnp.int32),
      tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), finished=jnp.ones(4, bool))
  grpo = _settings(num_generations=4, supervision="process").grpo
  advs = train_step_lib.advantage(out, rollout, grpo)
  adv = np.asarray(advs.advs)
  assert adv.shape == tokens.shape and advs.zero_std.tolist() == [False]
  wrong_end, last_end = out.step_ends[1, 1], out.step_ends[1, 3]
  assert np.all(adv[1, :wrong_end + 1] < 0)  # the wrong step and every token before it
  assert np.all(adv[1, wrong_end + 1:last_end + 1] > 0)  # the right steps after it
  for row in (0, 2, 3):
    assert np.all(adv[row, :out.step_ends[row, 3] + 1] > 0)
  np.testing.assert_array_equal(adv[:, last_end + 1:], 0.0)  # EOS and pad: no step after them


def test_groups_whose_step_rewards_are_all_equal_have_no_signal():
  # Group 0: different steps of equal reward; group 1: one right and one wrong step.
  ends = jnp.asarray([[0, 2], [1, -1], [0, -1], [3, -1]], jnp.int32)
  step_rewards = jnp.asarray([[1.0, 1.0], [1.0, jnp.nan], [1.0, jnp.nan], [0.0, jnp.nan]])
  out = scoring.Rewards(total=jnp.asarray([0.0, 1.0, 0.0, 0.0]), per_fn=jnp.zeros((1, 4)),
                        failures=jnp.int32(0), seconds=jnp.float32(0.0),
                        step_rewards=step_rewards, step_ends=ends,
                        steps_truncated=jnp.zeros(4, jnp.int32))
  assert train_step_lib.zero_std_groups(out, 2).tolist() == [True, False]
  rollout = train_step_lib.Rollout(
      prompt_tokens=jnp.zeros((2, 1), jnp.int32), prompt_mask=jnp.ones((2, 1), jnp.int32),
      tokens=jnp.ones((4, 4), jnp.int32), mask=jnp.ones((4, 4), jnp.int32),
      finished=jnp.ones(4, bool))
  grpo = _settings(num_generations=2, supervision="process", drop_zero_std_groups=True).grpo
  advs = train_step_lib.advantage(out, rollout, grpo)
  np.testing.assert_array_equal(advs.advs[:2], 0.0)  # the outcome rewards differ: not used
  assert advs.kept.tolist() == [0.0, 0.0, 1.0, 1.0]
  np.testing.assert_array_equal(advs.loss_mask[:2], 0)
