"""The optimizer: AdamW with warmup, cosine (or constant) decay and global-norm clipping."""

from __future__ import annotations

import optax

from grpo_jax import config as config_lib


def make_optimizer(
    *,
    learning_rate: float,
    total_updates: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup then cosine decay (or constant), global-norm clipping.

  Updates whose gradients hold NaN or Inf are skipped (optax.apply_if_finite) and counted.
  Returns the transformation and its learning-rate schedule (over optimizer updates).
  """
  warmup_steps = min(warmup_steps, max(total_updates - 1, 0))
  if schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_updates, warmup_steps + 1), 0.0)
  else:
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
         optax.constant_schedule(learning_rate)], [warmup_steps])
  chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
  chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  # Non-finite updates are always skipped (never applied after a streak); the trainer stops
  # the run after train.max_nan_steps in a row.
  tx = optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=2**31 - 1)
  return tx, lr


def for_grpo(cfg: config_lib.Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The GRPO optimizer of the `train` section: one update per minibatch, mu x M per step."""
  t = cfg.train
  return make_optimizer(
      learning_rate=t.learning_rate, total_updates=t.num_steps * cfg.grpo.updates_per_step,
      warmup_steps=t.warmup_steps, schedule=t.lr_schedule, max_grad_norm=t.max_grad_norm,
      weight_decay=t.weight_decay, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps)


def for_sft(cfg: config_lib.Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The cold-start SFT optimizer: the `sft` section's rate, warmup over its first tenth."""
  s = cfg.sft
  return make_optimizer(
      learning_rate=s.learning_rate, total_updates=s.num_steps, warmup_steps=s.num_steps // 10,
      max_grad_norm=cfg.train.max_grad_norm, weight_decay=cfg.train.weight_decay)
