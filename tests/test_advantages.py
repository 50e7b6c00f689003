"""Group-relative and process-supervision advantages."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

from grpo_jax import advantages
from grpo_jax.errors import UserError


@pytest.mark.parametrize("scale", advantages.SCALES)
def test_matches_torch_reference(scale):
  torch = pytest.importorskip("torch")
  rewards = np.random.default_rng(0).normal(size=12).astype(np.float32)
  r = torch.tensor(rewards).view(-1, 4)
  centred = (r - r.mean(1, keepdim=True)).flatten()
  expected = {
      "group": centred / (r.std(1, keepdim=True).expand(-1, 4).flatten() + 1e-4),
      "batch": centred / (r.std() + 1e-4),
      "none": centred,
  }[scale]
  got = advantages.group_advantages(rewards, 4, scale=scale)
  np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_missing_rewards_match_trl_nanstd():
  pytest.importorskip("trl")
  import torch
  from trl.trainer.utils import nanstd
  rewards = np.array([1.0, np.nan, 0.0, 0.5, np.nan, np.nan, 2.0, 3.0], np.float32)
  r = torch.tensor(rewards).view(-1, 4)
  expected = (r - r.nanmean(1, keepdim=True)) / (nanstd(r, dim=1).unsqueeze(1) + 1e-4)
  expected = torch.nan_to_num(expected, nan=0.0).flatten()
  got = advantages.group_advantages(rewards, 4)
  np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", advantages.SCALES)
def test_equal_rewards_give_exactly_zero(scale):
  rewards = np.array([0.1, 0.1, 0.1, 1, 0, 1, 7, 7, 7, np.nan, np.nan, np.nan], np.float32)
  adv = np.asarray(advantages.group_advantages(rewards, 3, scale=scale))
  assert np.all(np.isfinite(adv))
  np.testing.assert_array_equal(adv[[0, 1, 2, 6, 7, 8, 9, 10, 11]], 0.0)
  assert np.all(adv[3:6] != 0.0)


def test_zero_std_groups():
  rewards = np.array([1, 1, 0, 1, 2, 2, np.nan, 3, np.nan, np.nan], np.float32)
  got = advantages.zero_std_groups(rewards, 2)
  np.testing.assert_array_equal(got, [True, False, True, True, True])


def test_unknown_scale_lists_the_allowed_ones():
  with pytest.raises(UserError, match="group, batch, none"):
    advantages.group_advantages(np.zeros(4), 2, scale="global")


def test_jittable():
  fn = jax.jit(advantages.group_advantages, static_argnums=1, static_argnames="scale")
  rewards = np.arange(6, dtype=np.float32) ** 2
  np.testing.assert_allclose(fn(rewards, 3, scale="batch"),
                             advantages.group_advantages(rewards, 3, scale="batch"))


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(rewards=hnp.arrays(np.float32, 8, elements=st.sampled_from([0.0, 0.5, 1.0])),
                  perm=st.permutations(range(4)))
def test_groups_centre_and_permute(rewards, perm):
  adv = np.asarray(advantages.group_advantages(rewards, 4))
  np.testing.assert_allclose(adv.reshape(2, 4).sum(1), 0.0, atol=1e-4)
  permuted = rewards.reshape(2, 4)[:, perm].reshape(-1)
  np.testing.assert_allclose(advantages.group_advantages(permuted, 4),
                             adv.reshape(2, 4)[:, perm].reshape(-1), rtol=1e-6, atol=1e-6)


def _process_reference(step_rewards, step_ends, num_tokens, group_size, eps=1e-4):
  """DeepSeekMath 4.1.3 written as loops."""
  out = np.zeros((len(step_rewards), num_tokens), np.float64)
  for b in range(0, len(step_rewards), group_size):
    rows = range(b, b + group_size)
    steps = [(i, s) for i in rows for s in range(step_rewards.shape[1]) if step_ends[i, s] >= 0]
    values = np.array([step_rewards[i, s] for i, s in steps], np.float64)
    mean = values.mean()
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    for (i, s), v in zip(steps, values):
      norm = 0.0 if np.all(values == values[0]) else (v - mean) / (std + eps)
      out[i, :step_ends[i, s] + 1] += norm
  return out


def test_process_advantages_match_loop_reference():
  rng = np.random.default_rng(1)
  rows, steps, tokens = 6, 4, 12
  num_steps = rng.integers(0, steps + 1, rows)
  step_ends = np.full((rows, steps), -1)
  step_rewards = np.full((rows, steps), np.nan, np.float32)
  for i, n in enumerate(num_steps):
    step_ends[i, :n] = np.sort(rng.choice(tokens + 2, n, replace=False))  # some end past T
    step_rewards[i, :n] = rng.normal(size=n)
  got = advantages.process_advantages(step_rewards, step_ends, tokens, 3)
  expected = _process_reference(step_rewards, np.minimum(step_ends, tokens - 1), tokens, 3)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_process_advantages_sum_later_steps():
  # One group of two rows; steps end at tokens 2 and 5 of row 0 and token 3 of row 1.
  step_rewards = np.array([[1.0, 0.0], [0.5, np.nan]], np.float32)
  step_ends = np.array([[2, 5], [3, -1]])
  got = np.asarray(advantages.process_advantages(step_rewards, step_ends, 7, 2))
  norm = (np.array([1.0, 0.0, 0.5]) - 0.5) / (0.5 + 1e-4)
  np.testing.assert_allclose(got[0], [norm[0] + norm[1]] * 3 + [norm[1]] * 3 + [0.0], rtol=1e-6)
  np.testing.assert_allclose(got[1], [norm[2]] * 4 + [0.0] * 3, atol=1e-6)


def test_process_advantages_equal_rewards_are_zero():
  step_rewards = np.array([[1.0, 1.0], [1.0, np.nan]], np.float32)
  step_ends = np.array([[1, 3], [2, -1]])
  got = advantages.process_advantages(step_rewards, step_ends, 5, 2)
  np.testing.assert_array_equal(got, 0.0)
