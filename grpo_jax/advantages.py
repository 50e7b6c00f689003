"""Group-relative advantages: outcome (one reward per completion) and process
(one reward per reasoning step) supervision, DeepSeekMath 4.1.2 / 4.1.3.

Rewards of one prompt's G completions lie next to each other: row b*G + g.
NaN marks a missing reward (a reward function that returned None); it takes no
part in the group statistics and gets advantage 0, as in TRL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.errors import UserError

SCALES = ("group", "batch", "none")


def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, unbiased std and "all equal" over the last axis, ignoring NaN.

  Fewer than two valid values count as all equal (std 0).
  """
  valid = ~jnp.isnan(x)
  count = jnp.sum(valid, axis=-1, keepdims=True)
  mean = jnp.sum(jnp.where(valid, x, 0.0), axis=-1, keepdims=True) / jnp.maximum(count, 1)
  sq = jnp.sum(jnp.where(valid, (x - mean) ** 2, 0.0), axis=-1, keepdims=True)
  std = jnp.sqrt(sq / jnp.maximum(count - 1, 1))
  high = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
  low = jnp.min(jnp.where(valid, x, jnp.inf), axis=-1, keepdims=True)
  return mean, std, ~(high > low)


def zero_std_groups(rewards: jax.Array, group_size: int) -> jax.Array:
  """[B] True where every (non-NaN) reward of the group is the same."""
  _, _, equal = _stats(jnp.asarray(rewards, jnp.float32).reshape(-1, group_size))
  return equal[:, 0]


def group_advantages(rewards: jax.Array, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> jax.Array:
  """A = (r - mean_group(r)) / (std(r) + eps) for rewards [B*G]; returns [B*G].

  std is torch.std's unbiased one, taken over the group ("group"), over the
  whole batch ("batch", TRL's scale_rewards="batch"), or not at all ("none":
  A = r - mean). A group whose rewards are all equal gets exactly 0.
  """
  if scale not in SCALES:
    raise UserError(f"scale_rewards {scale!r} is not one of {', '.join(SCALES)}")
  r_bg = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
  mean_b1, std_b1, equal_b1 = _stats(r_bg)
  adv_bg = r_bg - mean_b1
  if scale == "group":
    adv_bg = adv_bg / (std_b1 + eps)
  elif scale == "batch":
    adv_bg = adv_bg / (_stats(r_bg.reshape(1, -1))[1] + eps)
  adv_bg = jnp.where(equal_b1 | jnp.isnan(r_bg), 0.0, adv_bg)
  return adv_bg.reshape(-1)


def _group_steps(step_rewards: jax.Array, step_ends: jax.Array, group_size: int) -> jax.Array:
  """[B, G*S] the step rewards [B*G, S] of each group's rows together, NaN where there is no
  step (end -1)."""
  r_ns = jnp.where(jnp.asarray(step_ends) >= 0, jnp.asarray(step_rewards, jnp.float32), jnp.nan)
  return r_ns.reshape(-1, group_size * r_ns.shape[1])


def zero_std_step_groups(step_rewards: jax.Array, step_ends: jax.Array,
                         group_size: int) -> jax.Array:
  """[B] True where every (non-NaN) step reward of the group's G rows is the same (or
  fewer than two are given): the groups whose process advantages are all 0."""
  return _stats(_group_steps(step_rewards, step_ends, group_size))[2][:, 0]


def process_advantages(step_rewards: jax.Array, step_ends: jax.Array, num_tokens: int,
                       group_size: int, *, eps: float = 1e-4) -> jax.Array:
  """Process-supervision advantages [B*G, T] (T = num_tokens).

  Every valid step reward of a group (all G rows together) is normalised,
  r~ = (r - mean) / (std + eps), and token t gets A_t = sum of r~ over the
  steps of its row with end index >= t.

  Args:
    step_rewards: [B*G, S] reward of each step; NaN where a row has fewer steps.
    step_ends: [B*G, S] int token index where each step ends; -1 for no step.
    num_tokens: T, the completion length of the result.
    group_size: G.
    eps: added to the std.
  """
  step_ends = jnp.asarray(step_ends)
  rows, steps = step_ends.shape
  r_bk = _group_steps(step_rewards, step_ends, group_size)
  mean_b1, std_b1, equal_b1 = _stats(r_bk)
  norm_bk = jnp.where(equal_b1 | jnp.isnan(r_bk), 0.0, (r_bk - mean_b1) / (std_b1 + eps))
  # Put each step's normalised reward on its last token, then sum from the right.
  ends_ns = jnp.clip(step_ends, 0, num_tokens - 1)
  at_end_nt = jnp.zeros((rows, num_tokens), jnp.float32).at[
      jnp.arange(rows)[:, None], ends_ns].add(norm_bk.reshape(rows, steps))
  return jnp.flip(jnp.cumsum(jnp.flip(at_end_nt, -1), axis=-1), -1)
