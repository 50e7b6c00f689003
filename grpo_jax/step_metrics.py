"""The GRPO step's metrics (names as in DESIGN.md), from what its phases computed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from grpo_jax import scoring

if TYPE_CHECKING:
  from grpo_jax import train_step


def step_metrics(rollout: train_step.Rollout, rewards: scoring.Rewards,
                 selection: train_step.Selection, advs: train_step.Advantages, update_metrics: dict[str, jax.Array], opt_state,
                 learning_rate: jax.Array, reward_names: tuple[str, ...],
                 ref_logps: jax.Array | None) -> dict[str, jax.Array]:
  """The step's metrics (names as in DESIGN.md), update metrics averaged over the updates.

  What was sampled and its rewards are measured over the B' sampled groups (rollout,
  rewards); the advantages and the update over the B kept ones (selection, advs).
  "train/nonfinite_ref_logps" counts the kept completion tokens whose reference log-prob is
  NaN or infinite: a broken reference makes the loss, hence the update, non-finite.
  """
  lengths = rollout.mask.sum(-1)
  kept_rows = selection.rollout.mask
  kept_groups = kept_rows.shape[0] // (lengths.shape[0] // selection.with_signal.shape[0])
  with_signal = selection.with_signal.sum()
  nonfinite_ref = jnp.int32(0)
  if ref_logps is not None:
    nonfinite_ref = jnp.sum(~jnp.isfinite(ref_logps) & (kept_rows > 0), dtype=jnp.int32)
  metrics = {
      "train/loss": update_metrics["loss"].mean(),
      "train/grad_norm": update_metrics["grad_norm"].mean(),
      "train/learning_rate": learning_rate,
      "train/nonfinite_updates": opt_state.total_notfinite,
      "train/nonfinite_consecutive": opt_state.notfinite_count,
      "train/nonfinite_ref_logps": nonfinite_ref,
      "rl/reward_mean": rewards.total.mean(),
      "rl/reward_std": rewards.total.std(ddof=1),
      "rl/kl": update_metrics["kl"].mean(),
      "rl/entropy": (update_metrics["entropy_sum"].sum()
                     / jnp.maximum(update_metrics["entropy_tokens"].sum(), 1.0)),
      "rl/clip_ratio": update_metrics["clip_ratio/region_mean"].mean(),
      "rl/clip_ratio_low": update_metrics["clip_ratio/low_mean"].mean(),
      "rl/clip_ratio_high": update_metrics["clip_ratio/high_mean"].mean(),
      "rl/completion_length": lengths.mean(),
      "rl/frac_truncated": 1.0 - rollout.finished.mean(),
      "rl/frac_zero_std_groups": advs.zero_std.mean(),
      "rl/advantage_abs_mean": _token_mean(jnp.abs(advs.advs), kept_rows),
      "rl/groups_sampled": jnp.float32(selection.with_signal.shape[0]),
      "rl/groups_with_signal": with_signal,
      "rl/groups_short": jnp.maximum(kept_groups - with_signal, 0),
      "rl/reward_failures": rewards.failures,
      "perf/rollout_tokens": lengths.sum(),
      "perf/reward_s": rewards.seconds,
  }
  for i, name in enumerate(reward_names):
    metrics[f"rewards/{name}"] = jnp.nanmean(rewards.per_fn[i])
  if rewards.step_rewards is not None:
    metrics.update(step_reward_metrics(rewards))
  return metrics


def _token_mean(x: jax.Array, mask_rn: jax.Array) -> jax.Array:
  """The mean of x [R] over rows, or of x [R, N] over the completion tokens mask_rn [R, N]."""
  if x.ndim == 1:
    return x.mean()
  return jnp.sum(x * mask_rn) / jnp.maximum(jnp.sum(mask_rn), 1)


def step_reward_metrics(rewards: scoring.Rewards) -> dict[str, jax.Array]:
  """Process supervision's metrics: the mean step reward (NaN without any scored step), the
  steps a completion (merged ones included) and the steps merged away, of the batch."""
  has_step = rewards.step_ends >= 0
  return {
      "rl/step_reward_mean": jnp.nanmean(jnp.where(has_step, rewards.step_rewards, jnp.nan)),
      "rl/steps_per_completion": jnp.mean(has_step.sum(-1) + rewards.steps_truncated),
      "rl/steps_truncated": rewards.steps_truncated.sum(),
  }
