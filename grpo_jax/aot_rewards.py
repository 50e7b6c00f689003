"""The reward callback's stand-ins when a config's step is compiled ahead of time
(`python -m grpo_jax.aot`): no reward function runs, but the step must compile with the
callback's shapes, as a run's does."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from grpo_jax import scoring


@dataclasses.dataclass(frozen=True)
class StandInReward:
  """The reward callback's compile-only stand-in, traced into the step (train_step.score):
  each completion scores the share of its tokens that are even, so that the rewards depend
  on the sampled tokens as the real ones do and nothing after them folds away."""

  num_rewards: int  # F
  step_slots: int  # S, process supervision (0: none)
  traceable = True

  def __call__(self, row_ids, tokens, mask):

    del row_ids
    mask_rn = mask.astype(jnp.float32)
    total_r = ((tokens % 2 == 0) * mask_rn).sum(-1) / jnp.maximum(mask_rn.sum(-1), 1.0)
    r = total_r.shape[0]
    rewards = scoring.Rewards(total=total_r,
                              per_fn=jnp.broadcast_to(total_r, (self.num_rewards, r)),
                              failures=jnp.zeros((), jnp.int32), seconds=jnp.zeros((), jnp.float32))
    if self.step_slots:
      last_r1 = mask.sum(-1, keepdims=True).astype(jnp.int32) - 1
      rewards = rewards.replace(
          step_rewards=jnp.broadcast_to(total_r[:, None], (r, self.step_slots)),
          step_ends=jnp.broadcast_to(last_r1, (r, self.step_slots)),
          steps_truncated=jnp.zeros((r,), jnp.int32))
    return rewards


@dataclasses.dataclass(frozen=True)
class HostReward:
  """A host callback of the reward callback's shapes, for targets that lower host callbacks
  (TPU): the step compiles with its io_callback as a run's does; never called."""

  num_rewards: int
  step_slots: int

  def __call__(self, row_ids, tokens, mask):

    del row_ids, mask
    r, slots = tokens.shape[0], self.step_slots
    steps = {} if not slots else dict(
        step_rewards=np.zeros((r, slots), np.float32), step_ends=np.zeros((r, slots), np.int32),
        steps_truncated=np.zeros((r,), np.int32))
    return scoring.Rewards(total=np.zeros((r,), np.float32),
                           per_fn=np.zeros((self.num_rewards, r), np.float32),
                           failures=np.int32(0), seconds=np.float32(0), **steps)
