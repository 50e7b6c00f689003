"""The GRPO policy loss (DeepSeekMath / DeepSeek-R1), as TRL 1.16 computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.config import IS_LEVELS, LOSS_TYPES
from grpo_jax.errors import UserError


def check_loss_options(loss_type: str, importance_sampling_level: str) -> None:
  """Raises UserError when a name is not one grpo_loss knows."""
  if loss_type not in LOSS_TYPES:
    raise UserError(
        f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
  if importance_sampling_level not in IS_LEVELS:
    raise UserError(
        f"importance_sampling_level {importance_sampling_level!r} is not one of"
        f" {', '.join(IS_LEVELS)}")


def _masked_mean(x: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """Mean of x over the tokens where mask is 1 (0 when there are none)."""
  return jnp.sum(x * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def _masked_mean_rows(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """[B, 1] mean of each row over its masked tokens (0 for an empty row)."""
  return (jnp.sum(x_bt * mask_bt, axis=-1, keepdims=True)
          / jnp.maximum(jnp.sum(mask_bt, axis=-1, keepdims=True), 1.0))


def _flag_mean(flag: jax.Array, mask_bt: jax.Array, per_row: bool) -> jax.Array:
  """Fraction of flagged tokens, or of rows when the flags are per row ([B, 1])."""
  flag = flag.astype(jnp.float32)
  return jnp.mean(flag) if per_row else _masked_mean(flag, mask_bt)


def high_entropy_mask(entropy_bt: jax.Array, mask_bt: jax.Array, quantile: float) -> jax.Array:
  """[B, T] bool: the tokens under mask whose entropy is at least the (1 - quantile)-quantile
  (linear interpolation, as torch.quantile) of the entropies of all the tokens under mask:
  the top `quantile` of them by entropy, as TRL's GRPOTrainer.get_high_entropy_mask keeps for
  top_entropy_quantile = quantile. No token when the mask is empty."""
  valid_bt = jnp.asarray(mask_bt) > 0
  values = jnp.where(valid_bt, entropy_bt, jnp.nan).reshape(-1)
  threshold = jnp.nanquantile(values, 1.0 - quantile)  # NaN (no token) without valid ones
  return valid_bt & (entropy_bt >= threshold)


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advs: jax.Array,
    mask: jax.Array,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: jax.Array | float | None = None,
    num_rows: jax.Array | float | None = None,
    policy_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO loss of one batch of completions and its metrics.

  With w the importance weight (token level: pi_theta/pi_old per token; sequence
  level, GSPO: exp of the masked mean over the row of log(pi_theta/pi_old)),

    l_bt = -p_bt * min(min(w, delta) * A, clip(w, 1 - eps_low, 1 + eps_high) * A)
           + beta * (exp(ref - logp) - (ref - logp) - 1)

  with p = policy_mask (default 1; high_entropy_mask's for TRL's top_entropy_quantile, which
  leaves the KL term and the normalisers as they are), reduced over the mask m by loss_type,
  with the normalisers R = num_rows (default B), I = num_items_in_batch (default sum m) and
  N = max_completion_length (default T):

    "grpo"     sum_b (sum_t l m / max(sum_t m, 1)) / max(R, 1)
    "bnpo"     sum(l m) / max(I, 1)
    "dr_grpo"  sum(l m) / (max(R, 1) * N)
    "dapo"     sum(l m) / max(I, 1)

  With the defaults this is TRL's loss of one batch (where bnpo and dapo differ only in
  that TRL counts dapo's I over every process and accumulated micro-batch). A batch that is
  a micro-batch of a larger one passes the larger one's R and I: the micro-batches' losses
  then sum to the larger batch's loss, which is how the train step accumulates gradients.

  Args:
    logps: [B, T] log-probs of the completion tokens under the policy being trained.
    old_logps: [B, T] log-probs under the sampling policy; None means
      stop_gradient(logps) (ratio 1 in value, not in gradient).
    ref_logps: [B, T] log-probs under the reference policy; needed when beta != 0.
    advs: [B] (one advantage per row) or [B, T].
    mask: [B, T] 0/1 of any numeric or bool dtype; 1 marks completion tokens.
    epsilon_low, epsilon_high: clip range; epsilon_high None means epsilon_low.
    delta: optional cap on the unclipped ratio (two-sided clipping, INTELLECT-2).
    beta: weight of the k3 KL estimator to the reference policy (a Python float).
    loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo".
    importance_sampling_level: "token" | "sequence".
    max_completion_length: N, the dr_grpo normaliser; None means T.
    num_items_in_batch: I, the bnpo / dapo normaliser (a scalar); None means mask.sum().
    num_rows: R, the grpo / dr_grpo normaliser (a scalar); None means B.
    policy_mask: [B, T] 0/1 (any numeric or bool dtype) or None (every token).

  Returns:
    (loss, aux): aux holds float32 scalars "kl" (masked mean of the k3 term, 0
    without ref_logps), "clip_ratio/low_mean", "clip_ratio/high_mean" and
    "clip_ratio/region_mean" (fractions of tokens, or of rows for per-row
    ratios, where clipping removed the gradient), as TRL logs them.
  """
  check_loss_options(loss_type, importance_sampling_level)
  if beta != 0.0 and ref_logps is None:
    raise ValueError(f"beta={beta} needs ref_logps; pass them or set beta=0")
  if epsilon_high is None:
    epsilon_high = epsilon_low

  mask_bt = jnp.asarray(mask).astype(jnp.float32)
  keep_bt = mask_bt > 0
  # Masked positions are zeroed so that padding garbage (even inf) cannot leak
  # NaN into the value or the gradient.
  zero = lambda x: jnp.where(keep_bt, jnp.asarray(x, jnp.float32), 0.0)
  logps_bt = zero(logps)
  old_bt = jax.lax.stop_gradient(logps_bt) if old_logps is None else zero(old_logps)
  advs = jnp.asarray(advs, jnp.float32)
  advs = advs[:, None] if advs.ndim == 1 else zero(advs)  # [B, 1] or [B, T]

  log_ratio_bt = logps_bt - old_bt
  if importance_sampling_level == "token":
    log_w = log_ratio_bt  # [B, T]
  else:
    log_w = _masked_mean_rows(log_ratio_bt, mask_bt)  # [B, 1]
  ratio = jnp.exp(log_w)
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  if delta is not None:
    ratio = jnp.minimum(ratio, delta)
  per_token = -jnp.minimum(ratio * advs, clipped * advs)
  if policy_mask is not None:
    per_token = per_token * jnp.asarray(policy_mask).astype(jnp.float32)

  kl_bt = None
  if ref_logps is not None:
    ref_diff_bt = zero(ref_logps) - logps_bt
    kl_bt = jnp.exp(ref_diff_bt) - ref_diff_bt - 1.0
  if beta != 0.0:
    per_token = per_token + beta * kl_bt
  per_token_bt = jnp.broadcast_to(per_token, mask_bt.shape)

  total = jnp.sum(per_token_bt * mask_bt)
  rows = mask_bt.shape[0] if num_rows is None else num_rows
  rows = jnp.maximum(jnp.asarray(rows, jnp.float32), 1.0)
  items = jnp.sum(mask_bt) if num_items_in_batch is None else num_items_in_batch
  items = jnp.maximum(jnp.asarray(items, jnp.float32), 1.0)
  if loss_type == "grpo":
    value = jnp.sum(_masked_mean_rows(per_token_bt, mask_bt)) / rows
  elif loss_type == "dr_grpo":
    length = mask_bt.shape[1] if max_completion_length is None else max_completion_length
    value = total / (rows * length)
  else:  # bnpo, dapo
    value = total / items

  is_low = (ratio < 1.0 - epsilon_low) & (advs < 0)
  is_high = (ratio > 1.0 + epsilon_high) & (advs > 0)
  per_row = importance_sampling_level == "sequence" and advs.shape[1] == 1
  aux = {
      "kl": jnp.float32(0.0) if kl_bt is None else _masked_mean(kl_bt, mask_bt),
      "clip_ratio/low_mean": _flag_mean(is_low, mask_bt, per_row),
      "clip_ratio/high_mean": _flag_mean(is_high, mask_bt, per_row),
      "clip_ratio/region_mean": _flag_mean(is_low | is_high, mask_bt, per_row),
  }
  return value, aux
