"""One GRPO step as one jitted, pure function: `train_step(state, batch) -> (state, metrics)`.

Inside the one compiled program:

  prompts [B, T] --G each--> sampler.generate --> completions [B*G, N], mask, sampling log-probs
    --> rewards [B*G] (Python reward functions, reached through `io_callback`)
    --> advantages [B*G] --> old (mu > 1 or several minibatches) and reference (beta > 0)
        log-probs [B*G, N]
    --> mu iterations x M minibatches (whole groups each) x A accumulated micro-batches of
        value_and_grad(grpo_loss) --> optax update
    --> iterative GRPO: pi_ref <- pi_theta every `ref_reset_every` steps

The state is donated. Randomness: `fold_in(state.key, state.step)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import io_callback

from grpo_jax import advantages as advantages_lib
from grpo_jax import logprobs as logprobs_lib
from grpo_jax import loss as loss_lib
from grpo_jax import mesh as mesh_lib
from grpo_jax import models
from grpo_jax import sampler as sampler_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], completed GRPO steps
  params: Any  # nnx.State of the policy
  opt_state: Any
  ref_params: Any  # nnx.State of pi_ref, or None when beta == 0
  key: jax.Array  # PRNG key; step keys are fold_in(key, step)


@flax.struct.dataclass
class Batch:
  prompt_tokens: jax.Array  # [B, T] int32, left padded
  prompt_mask: jax.Array  # [B, T] int32
  row_ids: jax.Array  # [B] int32, index of each prompt's row for the reward callback


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the compiled step depends on (static, hashable)."""

  num_generations: int  # G
  num_iterations: int = 1  # mu
  minibatches: int = 1  # M per iteration, whole groups each
  grad_accum_steps: int = 1  # A micro-batches per minibatch
  beta: float = 0.0
  epsilon_low: float = 0.2
  epsilon_high: float | None = None
  delta: float | None = None
  loss_type: str = "grpo"
  importance_sampling_level: str = "token"
  scale_rewards: str = "group"
  drop_zero_std_groups: bool = False
  mask_truncated_completions: bool = False
  ref_reset_every: int = 0
  sampling: sampler_lib.SampleConfig = sampler_lib.SampleConfig(max_new_tokens=64)
  reward_names: tuple[str, ...] = ()

  @property
  def needs_old_logps(self) -> bool:
    """pi_old differs from pi_theta after the first update of a sampled batch."""
    return self.num_iterations > 1 or self.minibatches > 1


# The host side of the reward callback: (row_ids [B], tokens [B*G, N], mask [B*G, N]) ->
# (total [B*G] float32, per-function [F, B*G] float32 with NaN for no score, failures int32 []).
RewardCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


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


def init_state(params, tx: optax.GradientTransformation, *, beta: float, seed: int,
               param_shardings=None) -> TrainState:
  """The train state around the policy params (`nnx.split(model)[1]`); pi_ref starts equal.

  Under jit, `param_shardings` (mesh.param_shardings) lays the optimizer state out like the
  params it mirrors; without it the compiler would replicate AdamW's moments on every device.
  """
  opt_state = tx.init(params)
  if param_shardings is not None:
    opt_state = jax.lax.with_sharding_constraint(
        opt_state, mesh_lib.opt_state_shardings(tx, opt_state, param_shardings))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=opt_state,
      ref_params=jax.tree.map(jnp.copy, params) if beta > 0 else None,
      key=jax.random.PRNGKey(seed),  # raw uint32 key: checkpoints as a plain array
  )


def completion_logps(graphdef, params, prompt_tokens, prompt_mask, completion_tokens,
                     completion_mask, temperature: float) -> jax.Array:
  """Log-probs [R, N] float32 of completion_tokens [R, N] after their prompts, under params.

  prompt_tokens / prompt_mask [P, T] (left padded) are the prompts of the R = P * S rows, S
  consecutive rows each (S = 1: one prompt per row). Each prompt runs through the model once
  and its keys and values serve its S completions: the prompt costs 1/S of a forward over the
  concatenated rows, whose log-probs these equal. Token T + n is predicted by the hidden state
  at T + n - 1; the vocab projection is chunked so that [R, N, V] float32 logits never exist.
  """
  model = nnx.merge(graphdef, params)
  num_prompts, t = prompt_tokens.shape
  r, n = completion_tokens.shape
  per_row = lambda x: jnp.repeat(x, r // num_prompts, axis=0)  # [P, ...] -> [R, ...]
  remat = model.config.remat
  cache = models.init_cache(model.config, num_prompts, t)
  h_ptd, cache = model.hidden(prompt_tokens, positions=models.positions_from_mask(prompt_mask),
                              attention_mask=prompt_mask, cache=cache, cache_index=0, remat=remat)
  h_rnd = per_row(h_ptd[:, -1:])  # the last prompt token predicts the first completion token
  if n > 1:
    # Completion token n sits at position (real prompt tokens) + (real tokens up to n) - 1.
    positions = per_row(prompt_mask.sum(-1, keepdims=True)) + jnp.cumsum(completion_mask, -1) - 1
    h_rest, _ = model.hidden(
        completion_tokens[:, :-1], positions=jnp.maximum(positions[:, :-1], 0),
        attention_mask=completion_mask[:, :-1],
        cache=models.expand_cache(cache, r // num_prompts, t + n - 1),
        cache_index=t, remat=remat)
    h_rnd = jnp.concatenate([h_rnd, h_rest], axis=1)
  return logprobs_lib.chunked_token_logprobs(h_rnd, model.unembed(), completion_tokens,
                                             temperature=temperature)


def prompt_share(num_generations: int, rows: int, row_shards: int = 1) -> int:
  """S, how many consecutive rows share a prompt forward in rows_logps: gcd(G, rows per shard).

  S divides G (a block of S rows has one prompt) and each shard's rows (so the prompts split
  over the shards like the rows); rows that do not split evenly over the shards take gcd(G, R).
  """
  return math.gcd(num_generations, rows // row_shards if rows % row_shards == 0 else rows)


def rows_logps(graphdef, params, rows: dict[str, jax.Array], num_generations: int,
               temperature: float, row_shards: int = 1) -> jax.Array:
  """completion_logps [R, N] of rows: prompt_tokens / prompt_mask [R, T] (each prompt repeated
  over its G consecutive rows, the first row at a group boundary), tokens / mask [R, N], split
  over row_shards devices; each block of prompt_share(...) rows runs its prompt once.
  """
  share = prompt_share(num_generations, rows["tokens"].shape[0], row_shards)
  return completion_logps(graphdef, params, rows["prompt_tokens"][::share],
                          rows["prompt_mask"][::share], rows["tokens"], rows["mask"], temperature)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, cfg: StepConfig,
                    reward_callback: RewardCallback, *, state_shardings=None,
                    metrics_sharding=None, donate: bool = True):
  """Builds the jitted `train_step(state, batch) -> (state, metrics)`.

  With state_shardings the new state keeps the layout of the old one (so donation reuses
  its buffers), and sampling runs in the rollout layout of mesh.py; metrics come back with
  metrics_sharding (replicated).
  """
  num_fns = len(cfg.reward_names)
  row_shards = 1
  if state_shardings is not None:
    row_sharding = mesh_lib.batch_sharding(jax.tree.leaves(state_shardings.params)[0].mesh)
    row_shards = mesh_lib.row_shards(row_sharding.mesh)

  def host_rewards(row_ids, tokens, mask):
    total, per_fn, failed = reward_callback(np.asarray(row_ids), np.asarray(tokens), np.asarray(mask))
    return (np.asarray(total, np.float32), np.asarray(per_fn, np.float32).reshape(num_fns, -1),
            np.asarray(failed, np.int32))

  def train_step(state: TrainState, batch: Batch):
    g = cfg.num_generations
    r = batch.prompt_tokens.shape[0] * g  # rows
    n = cfg.sampling.max_new_tokens
    temperature = cfg.sampling.temperature or 1.0  # greedy: log-probs at temperature 1
    key = jax.random.fold_in(state.key, state.step)

    # 1. Rollout: G completions per prompt from pi_old (the current params). Each shard's rows
    # are whole blocks of `share` rows, and a block's prompt is prefilled once.
    share = prompt_share(g, r, row_shards)
    sampler_prompts = jnp.repeat(batch.prompt_tokens, g // share, axis=0)  # [R / share, T]
    sampler_mask = jnp.repeat(batch.prompt_mask, g // share, axis=0)
    policy = nnx.merge(graphdef, state.params)
    if state_shardings is not None:  # the rollout layout of mesh.py: rows over (data, fsdp)
      sampler_prompts = jax.lax.with_sharding_constraint(sampler_prompts, row_sharding)
      sampler_mask = jax.lax.with_sharding_constraint(sampler_mask, row_sharding)
      policy = nnx.merge(graphdef, mesh_lib.rollout_params(
          state.params, state_shardings.params, policy.config.compute_dtype))
    out = sampler_lib.generate_from(policy, sampler_prompts, sampler_mask, key, cfg.sampling,
                                    samples_per_prompt=share)
    completion_mask = out.mask.astype(jnp.int32)  # [R, N]
    lengths = completion_mask.sum(-1)
    eos_ids = jnp.asarray(cfg.sampling.eos_token_ids or (-1,), jnp.int32)
    finished = jnp.any(jnp.isin(out.tokens, eos_ids) & (completion_mask > 0), axis=-1)  # [R]

    # 2. Rewards on the host, from inside the compiled step.
    result_shapes = (jax.ShapeDtypeStruct((r,), jnp.float32),
                     jax.ShapeDtypeStruct((num_fns, r), jnp.float32),
                     jax.ShapeDtypeStruct((), jnp.int32))
    rewards, per_fn_rewards, num_failed = io_callback(
        host_rewards, result_shapes, batch.row_ids, out.tokens, completion_mask, ordered=False)

    # 3. Group-relative advantages [R]; groups whose rewards are all equal carry no signal.
    advs = advantages_lib.group_advantages(rewards, g, scale=cfg.scale_rewards)
    zero_std = advantages_lib.zero_std_groups(rewards, g)  # [B]
    loss_mask = completion_mask
    if cfg.mask_truncated_completions:
      loss_mask = loss_mask * finished[:, None].astype(jnp.int32)
    keep_rows = jnp.ones((r,), jnp.float32)
    if cfg.drop_zero_std_groups:
      keep_rows = jnp.repeat(1.0 - zero_std.astype(jnp.float32), g)
      loss_mask = loss_mask * keep_rows[:, None].astype(jnp.int32)

    # 4. Old and reference log-probs of the completions (a prompt's forward serves its group).
    logps_of = lambda params, rows: rows_logps(graphdef, params, rows, g, temperature, row_shards)
    rows = dict(prompt_tokens=jnp.repeat(sampler_prompts, share, axis=0),  # [R, T]
                prompt_mask=jnp.repeat(sampler_mask, share, axis=0), tokens=out.tokens,
                mask=completion_mask)
    old_logps = ref_logps = None
    if cfg.needs_old_logps:
      old_logps = jax.lax.stop_gradient(logps_of(state.params, rows))
    if cfg.beta > 0:
      ref_logps = jax.lax.stop_gradient(logps_of(state.ref_params, rows))

    # 5. mu iterations over M minibatches of whole groups, A micro-batches each.
    m, a = cfg.minibatches, cfg.grad_accum_steps
    rows.update(advs=advs, loss_mask=loss_mask, keep=keep_rows)
    if old_logps is not None:
      rows["old_logps"] = old_logps
    if ref_logps is not None:
      rows["ref_logps"] = ref_logps
    # [M, A, R / (M A), ...], contiguous: groups stay whole as long as B % (M A) == 0.
    rows = jax.tree.map(lambda x: x.reshape((m, a, r // (m * a)) + x.shape[1:]), rows)

    def micro_loss(params, micro, minibatch_tokens, minibatch_kept_rows):
      logps = logps_of(params, micro)
      loss_type, num_items = cfg.loss_type, None
      if cfg.loss_type in ("bnpo", "dapo"):
        # Token-level normalisers are global over the minibatch: sum over micro-batches.
        loss_type, num_items = "dapo", jnp.maximum(minibatch_tokens, 1.0)
      value, aux = loss_lib.grpo_loss(
          logps, micro.get("old_logps"), micro.get("ref_logps"), micro["advs"], micro["loss_mask"],
          epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
          beta=cfg.beta, loss_type=loss_type,
          importance_sampling_level=cfg.importance_sampling_level, max_completion_length=n,
          num_items_in_batch=num_items)
      if loss_type in ("grpo", "dr_grpo"):
        # Row-level normalisers (a mean over rows): re-weight each micro-batch's mean to a
        # share of the minibatch's kept rows, so the A micro-batches sum to the minibatch loss.
        value = value * micro["keep"].shape[0] / jnp.maximum(minibatch_kept_rows, 1.0)
      return value, aux

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def minibatch_update(carry, idx):
      params, opt_state = carry
      minibatch = jax.tree.map(lambda x: x[idx % m], rows)  # [A, R/(MA), ...]
      minibatch_tokens = minibatch["loss_mask"].sum().astype(jnp.float32)
      minibatch_kept_rows = minibatch["keep"].sum() * 1.0

      def accumulate(acc, micro):
        (value, aux), grads = grad_fn(params, micro, minibatch_tokens, minibatch_kept_rows)
        acc_grads, acc_value, acc_aux = acc
        return (jax.tree.map(jnp.add, acc_grads, grads), acc_value + value,
                jax.tree.map(lambda x, y: x + y / a, acc_aux, aux)), None

      zero_aux = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], minibatch),
                                                minibatch_tokens, minibatch_kept_rows)[0][1])
      init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_aux))
      (grads, value, aux), _ = jax.lax.scan(accumulate, init, minibatch)
      grad_norm = optax.tree.norm(grads)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), dict(loss=value, grad_norm=grad_norm, **aux)

    (params, opt_state), update_metrics = jax.lax.scan(
        minibatch_update, (state.params, state.opt_state),
        jnp.arange(cfg.num_iterations * m, dtype=jnp.int32))

    # 6. Iterative GRPO: the reference becomes the current policy every K steps.
    new_step = state.step + 1
    ref_params = state.ref_params
    if ref_params is not None and cfg.ref_reset_every > 0:
      ref_params = jax.lax.cond(new_step % cfg.ref_reset_every == 0, lambda: params,
                                lambda: ref_params)

    metrics = {
        "train/loss": update_metrics["loss"].mean(),
        "train/grad_norm": update_metrics["grad_norm"].mean(),
        "train/learning_rate": lr_schedule(new_step * cfg.num_iterations * m),
        "train/nonfinite_updates": opt_state.total_notfinite,
        "train/nonfinite_consecutive": opt_state.notfinite_count,
        "rl/reward_mean": rewards.mean(),
        "rl/reward_std": rewards.std(ddof=1),
        "rl/kl": update_metrics["kl"].mean(),
        "rl/clip_ratio": update_metrics["clip_ratio/region_mean"].mean(),
        "rl/clip_ratio_low": update_metrics["clip_ratio/low_mean"].mean(),
        "rl/clip_ratio_high": update_metrics["clip_ratio/high_mean"].mean(),
        "rl/completion_length": lengths.mean(),
        "rl/frac_truncated": 1.0 - finished.mean(),
        "rl/frac_zero_std_groups": zero_std.mean(),
        "rl/advantage_abs_mean": jnp.abs(advs).mean(),
        "rl/reward_failures": num_failed,
        "perf/rollout_tokens": lengths.sum(),
    }
    for i, name in enumerate(cfg.reward_names):
      metrics[f"rewards/{name}"] = jnp.nanmean(per_fn_rewards[i])
    new_state = state.replace(step=new_step, params=params, opt_state=opt_state,
                              ref_params=ref_params)
    return new_state, metrics

  out_shardings = None if state_shardings is None else (state_shardings, metrics_sharding)
  return jax.jit(train_step, donate_argnums=(0,) if donate else (), out_shardings=out_shardings)
