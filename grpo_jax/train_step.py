"""One GRPO step as one jitted, pure function: `train_step(state, batch) -> (state, metrics)`.

The step calls one function per phase, in the algorithm's order:

  prompts [B', T] --sample--> G completions each                   Rollout, B' * G rows
    --score--> rewards of the completions (host callback)            scoring.Rewards [B' G]
               (process supervision: and of their steps)                  [B' G, S]
    --select_groups--> dynamic sampling: B of the B' groups, those with signal first
                                                                    Selection, R = B * G rows
    --advantage--> group-relative advantages, the loss mask          Advantages [R] or [R, N]
    --reference_logps--> pi_old (mu x M > 1) and pi_ref (beta > 0)  [R, N] each
    --update--> mu iterations x M minibatches (whole groups) x A micro-batches of
                value_and_grad(grpo_loss), one optimizer update per minibatch; the log-prob
                pass also gives token entropies (rl/entropy, grpo.top_entropy_quantile)
    --reset_reference--> iterative GRPO: pi_ref <- pi_theta every `ref_reset_every` steps

B' = B without dynamic sampling (grpo.oversample = 1). Prompts stay prompts ([B, T], or
[R / S, T]): S consecutive rows of a group share one prompt, which runs through the model
once for them in sampling, the log-prob passes and the update (completion_logps.py); S is
`prompt_share` of the rows of the pass. The state is donated. Randomness:
`fold_in(state.key, state.step)`.

With LoRA (models/lora.py) the params hold the frozen base and the adapters; the update
differentiates and the optimizer moves the adapters only, and pi_ref is the base with the
adapters off (or, with iterative resets, with a copy of the adapters in ref_params).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental import io_callback

from grpo_jax import advantages as advantages_lib
from grpo_jax import completion_logps as logps_lib
from grpo_jax import config as config_lib
from grpo_jax import loss as loss_lib
from grpo_jax import mesh as mesh_lib
from grpo_jax import sampler as sampler_lib
from grpo_jax import scoring
from grpo_jax import step_metrics as step_metrics_lib
from grpo_jax.models import lora as lora_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], completed GRPO steps
  params: Any  # nnx.State of the policy (with LoRA: the frozen base and the adapters)
  opt_state: Any  # of the trainable params: all, or the LoRA adapters
  ref_params: Any  # of pi_ref (lora_lib.reference_part), or None
  key: jax.Array  # PRNG key; step keys are fold_in(key, step)


@flax.struct.dataclass
class Batch:
  """The prompts a step samples: B' = B, or round(B * grpo.oversample) for dynamic sampling."""

  prompt_tokens: jax.Array  # [B', T] int32, left padded
  prompt_mask: jax.Array  # [B', T] int32
  row_ids: jax.Array  # [B'] int32: each prompt's row in the reward callback's dataset rows


@flax.struct.dataclass
class Rollout:
  """G sampled completions of each prompt, a group's rows consecutive."""

  prompt_tokens: jax.Array  # [R / S, T] int32: the prompt of each block of S rows
  prompt_mask: jax.Array  # [R / S, T] int32
  tokens: jax.Array  # [R, N] int32, pad after EOS
  mask: jax.Array  # [R, N] int32: 1 up to and including EOS
  finished: jax.Array  # [R] bool: the completion reached an EOS


@flax.struct.dataclass
class Advantages:
  # [R] float32: (r - group mean) / group std (grpo.scale_rewards); process supervision:
  # [R, N], each token's sum of the group-normalised rewards of its row's steps from it on
  advs: jax.Array
  loss_mask: jax.Array  # [R, N] int32: the tokens the loss counts
  kept: jax.Array  # [R] float32: 1 for the rows the update uses, 0 for dropped groups
  zero_std: jax.Array  # [B] bool: the group has no signal (zero_std_groups)


@flax.struct.dataclass
class Selection:
  """The B groups a step trains on, of the B' it sampled (dynamic sampling)."""

  rollout: Rollout  # the kept groups' rows, R = B * G
  rewards: scoring.Rewards  # their rewards ([R], [F, R], [R, S])
  with_signal: jax.Array  # [B'] bool: the sampled groups that have signal (not zero_std_groups)


@flax.struct.dataclass
class LossBatch:
  """What the loss reads, for R rows: [R, ...], or [M, A, R / (M A), ...] split into
  minibatches of micro-batches (prompts then [M, A, R / (M A S), T])."""

  prompt_tokens: jax.Array  # [R / S, T]
  prompt_mask: jax.Array  # [R / S, T]
  tokens: jax.Array  # [R, N]
  mask: jax.Array  # [R, N]: the completion tokens the model runs on
  loss_mask: jax.Array  # [R, N]
  advs: jax.Array  # [R] or [R, N]
  kept: jax.Array  # [R]
  old_logps: jax.Array | None  # [R, N], None when pi_old is the current policy
  ref_logps: jax.Array | None  # [R, N], None when beta == 0


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the compiled step depends on besides the state and the batch (static)."""

  grpo: config_lib.GrpoCfg
  grad_accum_steps: int  # A, train.grad_accum_steps
  sampling: sampler_lib.SamplingSettings
  row_shards: int = 1  # how many ways the mesh splits the rows (mesh.row_shards)
  kept_groups: int = 0  # B, the groups the update trains on (of B' sampled); 0 = all sampled

  @property
  def micro_batches(self) -> int:
    """M x A, the micro-batches a sampled batch's rows split into (loss_batches)."""
    return self.grpo.minibatches_per_iteration * self.grad_accum_steps


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the step's arrays live on the mesh: the params' training shardings, and the rows'
  sharding (sampling gathers the weights over the batch axes, see mesh.py)."""

  params: Any  # nnx.State of NamedSharding, like TrainState.params
  rows: jax.sharding.NamedSharding


RewardFn = Callable[[Any, Any, Any], scoring.Rewards]  # the Scorer's contract


def init_state(params, tx: optax.GradientTransformation, *, beta: float, seed: int,
               ref_reset_every: int = 0, param_shardings=None) -> TrainState:
  """The train state around the policy params (`nnx.split(model)[1]`); pi_ref starts as the
  policy (with LoRA: as the base, lora_lib.initial_reference).

  Under jit, `param_shardings` (mesh.param_shardings) lays the optimizer state out like the
  params it mirrors; without it the compiler would replicate AdamW's moments on every device.
  """
  opt_state = tx.init(lora_lib.split_trainable(params)[0])
  if param_shardings is not None:
    opt_state = jax.lax.with_sharding_constraint(opt_state, mesh_lib.opt_state_shardings(
        tx, opt_state, lora_lib.split_trainable(param_shardings)[0]))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=opt_state,
      ref_params=lora_lib.initial_reference(params, beta=beta, ref_reset_every=ref_reset_every),
      key=jax.random.PRNGKey(seed),  # raw uint32 key: checkpoints as a plain array
  )


def checkpointed(state: TrainState, *, with_base: bool = False) -> TrainState:
  """What a checkpoint holds of the state: all of it but a LoRA run's frozen base, which is
  read again from model.path (with_base: all of it, the base included)."""
  if with_base:
    return state
  return state.replace(params=lora_lib.split_trainable(state.params)[0])


def restore_checkpointed(state: TrainState, saved: TrainState) -> TrainState:
  """`saved` (a restored `checkpointed` state) completed with the frozen base of `state`
  where it holds none."""
  frozen = lora_lib.split_trainable(state.params)[1]
  # Merged in this order, the checkpoint's arrays win (a base it holds included).
  return saved.replace(params=nnx.merge_state(frozen, saved.params) if frozen else saved.params)


# -- the phases, in the order the step runs them ------------------------------------------------


def sample(graphdef, params, batch: Batch, key: jax.Array, settings: StepSettings,
           layout: Layout | None = None) -> Rollout:
  """G completions of each of the B prompts from the current params (pi_old).

  Each shard's rows are whole blocks of S rows, and a block's prompt is prefilled once. With
  a layout, sampling runs in the rollout layout of mesh.py (rows over the batch axes, the
  weights gathered over them in the compute dtype). LoRA adapters are merged into the
  weights once (lora_lib.for_rollout).
  """
  g = settings.grpo.num_generations
  share = logps_lib.prompt_share(g, batch.prompt_tokens.shape[0] * g, settings.row_shards)
  prompt_tokens = jnp.repeat(batch.prompt_tokens, g // share, axis=0)  # [R / S, T]
  prompt_mask = jnp.repeat(batch.prompt_mask, g // share, axis=0)
  if layout is not None:
    params, prompt_tokens, prompt_mask = mesh_lib.to_rollout_layout(
        params, layout.params, nnx.merge(graphdef, params).config.compute_dtype, layout.rows,
        prompt_tokens, prompt_mask)
  policy = lora_lib.for_rollout(nnx.merge(graphdef, params))
  out = sampler_lib.generate_from(policy, prompt_tokens, prompt_mask, key, settings.sampling,
                                  samples_per_prompt=share)
  mask = out.mask.astype(jnp.int32)
  eos_ids = jnp.asarray(settings.sampling.eos_token_ids or (-1,), jnp.int32)
  finished = jnp.any(jnp.isin(out.tokens, eos_ids) & (mask > 0), axis=-1)
  return Rollout(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=out.tokens,
                 mask=mask, finished=finished)


def score(reward_fn: RewardFn, num_rewards: int, row_ids: jax.Array, rollout: Rollout,
          step_slots: int = 0) -> scoring.Rewards:
  """The rewards of the R completions from the host callback `reward_fn` (scoring.Scorer's
  contract), reached from inside the compiled step; F = num_rewards reward functions, and
  S = step_slots steps a completion under process supervision (0: none). A reward_fn whose
  `traceable` attribute is true is written in jnp and traced into the step instead (the
  compile-only stand-in of grpo_jax.aot, for targets that cannot lower host callbacks)."""
  r = rollout.tokens.shape[0]
  shape = jax.ShapeDtypeStruct
  shapes = scoring.Rewards(total=shape((r,), jnp.float32),
                           per_fn=shape((num_rewards, r), jnp.float32),
                           failures=shape((), jnp.int32), seconds=shape((), jnp.float32))
  if step_slots:
    shapes = shapes.replace(step_rewards=shape((r, step_slots), jnp.float32),
                            step_ends=shape((r, step_slots), jnp.int32),
                            steps_truncated=shape((r,), jnp.int32))
  if getattr(reward_fn, "traceable", False):
    return reward_fn(row_ids, rollout.tokens, rollout.mask)
  return io_callback(reward_fn, shapes, row_ids, rollout.tokens, rollout.mask, ordered=False)


def zero_std_groups(rewards: scoring.Rewards, group_size: int) -> jax.Array:
  """[B] True for the groups without signal, whose advantages are all 0: every reward of the
  group is the same, or, under process supervision, every reward of all its rows' steps."""
  if rewards.step_rewards is None:
    return advantages_lib.zero_std_groups(rewards.total, group_size)
  return advantages_lib.zero_std_step_groups(rewards.step_rewards, rewards.step_ends,
                                             group_size)


def select_groups(batch: Batch, rollout: Rollout, rewards: scoring.Rewards,
                  settings: StepSettings, layout: Layout | None = None) -> Selection:
  """Dynamic sampling (DAPO): the B = settings.kept_groups groups to train on, of the B'
  sampled. Groups with signal come first, then those without (advantages 0), each in the
  order they were sampled: fewer than B with signal fills the rest with groups without.
  A group's rows, prompt and rewards go with it; with a layout the kept rows are laid out
  over the mesh's batch axes again. B = B' keeps every group where it is.
  """
  g = settings.grpo.num_generations
  with_signal = ~zero_std_groups(rewards, g)  # [B']
  sampled, kept = with_signal.shape[0], settings.kept_groups or with_signal.shape[0]
  if kept == sampled:
    return Selection(rollout=rollout, rewards=rewards, with_signal=with_signal)
  groups = jnp.argsort(~with_signal, stable=True)[:kept]  # [B]
  rows = (groups[:, None] * g + jnp.arange(g)).reshape(-1)  # [R]
  share = logps_lib.prompt_share(g, kept * g, settings.row_shards)
  prompts = lambda x: jnp.repeat(x[groups], g // share, axis=0)  # [R / S, T]
  kept_rollout = Rollout(
      prompt_tokens=prompts(batch.prompt_tokens), prompt_mask=prompts(batch.prompt_mask),
      tokens=rollout.tokens[rows], mask=rollout.mask[rows], finished=rollout.finished[rows])
  if layout is not None:
    kept_rollout = jax.lax.with_sharding_constraint(kept_rollout, layout.rows)
  steps = lambda x: None if x is None else x[rows]
  kept_rewards = rewards.replace(
      total=rewards.total[rows], per_fn=rewards.per_fn[:, rows],
      step_rewards=steps(rewards.step_rewards), step_ends=steps(rewards.step_ends),
      steps_truncated=steps(rewards.steps_truncated))
  return Selection(rollout=kept_rollout, rewards=kept_rewards, with_signal=with_signal)


def advantage(rewards: scoring.Rewards, rollout: Rollout, grpo: config_lib.GrpoCfg
              ) -> Advantages:
  """Group-relative advantages and the loss mask: truncated completions masked out with
  grpo.mask_truncated_completions, groups without signal dropped with
  grpo.drop_zero_std_groups. Outcome supervision: one advantage a row, from rewards.total;
  process supervision: one a token (advantages.process_advantages of the steps)."""
  g = grpo.num_generations
  zero_std = zero_std_groups(rewards, g)
  loss_mask = rollout.mask
  if grpo.mask_truncated_completions:
    loss_mask = loss_mask * rollout.finished[:, None].astype(jnp.int32)
  kept = jnp.ones(rewards.total.shape, jnp.float32)
  if grpo.drop_zero_std_groups:
    kept = jnp.repeat(1.0 - zero_std.astype(jnp.float32), g)
    loss_mask = loss_mask * kept[:, None].astype(jnp.int32)
  if grpo.supervision == "process":
    advs = advantages_lib.process_advantages(rewards.step_rewards, rewards.step_ends,
                                             rollout.tokens.shape[1], g)
  else:
    advs = advantages_lib.group_advantages(rewards.total, g, scale=grpo.scale_rewards)
  return Advantages(advs=advs, loss_mask=loss_mask, kept=kept, zero_std=zero_std)


def reference_logps(graphdef, state: TrainState, rollout: Rollout, settings: StepSettings,
                    layout: Layout | None = None) -> tuple[jax.Array | None, jax.Array | None]:
  """(pi_old, pi_ref) log-probs [R, N] of the completions before any update: pi_old only when
  some update of this batch is not the first (mu x M > 1), pi_ref only when beta > 0.

  Each pass runs over the update's M x A micro-batches one after another (loss_batches'
  split, as TRL computes them per micro-batch), so it holds one micro-batch's activations and
  KV cache, not those of all R rows. With a layout the forward keeps each device's rows
  (Transformer.hidden's activation_sharding)."""
  chunks = settings.micro_batches
  prompt_tokens, prompt_mask = _micro_batch_prompts(rollout, settings)
  micro = jax.tree.map(lambda x: x.reshape((chunks, -1) + x.shape[1:]),
                       (prompt_tokens, prompt_mask, rollout.tokens, rollout.mask))

  def logps(graphdef, params):
    one = lambda inputs: logps_lib.completion_logps(
        graphdef, params, *inputs, settings.sampling.logprob_temperature, _rows(layout))
    out = jax.lax.map(one, micro) if chunks > 1 else one(jax.tree.map(lambda x: x[0], micro))
    return jax.lax.stop_gradient(out).reshape(rollout.tokens.shape)

  old = logps(graphdef, state.params) if settings.grpo.needs_old_logps else None
  ref = (logps(*lora_lib.reference(graphdef, state.params, state.ref_params))
         if settings.grpo.beta > 0 else None)
  return old, ref


def _micro_batch_prompts(rollout: Rollout, settings: StepSettings) -> tuple[jax.Array, jax.Array]:
  """The rollout's prompts and masks [R / S, T] for micro-batches of R / (M A) rows, each
  prompt shared by S = prompt_share(...) consecutive rows of a micro-batch."""
  r = rollout.tokens.shape[0]
  share = logps_lib.prompt_share(settings.grpo.num_generations, r // settings.micro_batches,
                                 settings.row_shards)
  copies = r // rollout.prompt_tokens.shape[0] // share  # rollout's S / this S
  return (jnp.repeat(rollout.prompt_tokens, copies, axis=0),
          jnp.repeat(rollout.prompt_mask, copies, axis=0))


def loss_batches(rollout: Rollout, advs: Advantages, old_logps, ref_logps,
                 settings: StepSettings) -> LossBatch:
  """The loss's inputs split into M minibatches of A micro-batches, [M, A, R / (M A), ...].

  Contiguous splits keep groups whole as long as B % (M A) == 0 (config validation). Each
  micro-batch's prompts are shared by prompt_share(...) of its rows.
  """
  m, a = settings.grpo.minibatches_per_iteration, settings.grad_accum_steps
  prompt_tokens, prompt_mask = _micro_batch_prompts(rollout, settings)
  batch = LossBatch(
      prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
      tokens=rollout.tokens, mask=rollout.mask, loss_mask=advs.loss_mask, advs=advs.advs,
      kept=advs.kept, old_logps=old_logps, ref_logps=ref_logps)
  return jax.tree.map(lambda x: x.reshape((m, a, -1) + x.shape[1:]), batch)


def _rows(layout: Layout | None):
  """The rows' sharding of a layout (None: no constraint)."""
  return None if layout is None else layout.rows


def micro_loss(params, micro: LossBatch, minibatch_tokens: jax.Array,
               minibatch_rows: jax.Array, *, graphdef, settings: StepSettings,
               layout: Layout | None = None, dropout_key: jax.Array | None = None):
  """grpo_loss of one micro-batch, normalised by its minibatch's token and kept-row counts, so
  that the A micro-batch losses sum to the minibatch's loss. Returns (loss, aux).

  The log-prob pass also gives each token's entropy: with grpo.top_entropy_quantile = q < 1
  the policy term counts only the micro-batch's top q of loss tokens by entropy
  (loss.high_entropy_mask, as TRL takes it over each micro-batch); aux adds the entropy's
  sum and token count over the completion tokens (micro.mask), for rl/entropy.
  """
  g = settings.grpo
  logps, entropy = logps_lib.completion_logps_and_entropy(
      graphdef, params, micro.prompt_tokens, micro.prompt_mask, micro.tokens, micro.mask,
      settings.sampling.logprob_temperature, _rows(layout), dropout_key)
  policy_mask = None
  if g.top_entropy_quantile < 1:
    policy_mask = loss_lib.high_entropy_mask(entropy, micro.loss_mask, g.top_entropy_quantile)
  value, aux = loss_lib.grpo_loss(
      logps, micro.old_logps, micro.ref_logps, micro.advs, micro.loss_mask,
      epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, delta=g.delta, beta=g.beta,
      loss_type=g.loss_type, importance_sampling_level=g.importance_sampling_level,
      max_completion_length=settings.sampling.max_new_tokens,
      num_items_in_batch=minibatch_tokens, num_rows=minibatch_rows, policy_mask=policy_mask)
  mask = micro.mask.astype(jnp.float32)
  return value, dict(aux, entropy_sum=jnp.sum(entropy * mask), entropy_tokens=jnp.sum(mask))


def minibatch_update(graphdef, tx: optax.GradientTransformation, params, opt_state,
                     minibatch: LossBatch, settings: StepSettings, layout: Layout | None = None,
                     dropout_key: jax.Array | None = None):
  """One optimizer update of the trainable params (all, or the LoRA adapters) from a minibatch
  of A micro-batches [A, ...], whose gradients are accumulated (summed: their losses share the
  minibatch's normalisers). Returns (params, opt_state, {"loss", "grad_norm", and grpo_loss's
  aux averaged})."""
  trainable, frozen = lora_lib.split_trainable(params)
  loss = lambda trainable, *args, **kwargs: micro_loss(
      lora_lib.join(trainable, frozen), *args, graphdef=graphdef, settings=settings,
      layout=layout, **kwargs)
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  tokens = minibatch.loss_mask.sum().astype(jnp.float32)
  rows = minibatch.kept.sum()
  a = settings.grad_accum_steps

  def accumulate(acc, micro_and_index):
    micro, i = micro_and_index
    (value, aux), grads = grad_fn(trainable, micro, tokens, rows,
                                  dropout_key=lora_lib.fold(dropout_key, i))
    acc_grads, acc_value, acc_aux = acc
    return (jax.tree.map(jnp.add, acc_grads, grads), acc_value + value,
            jax.tree.map(lambda x, y: x + y / a, acc_aux, aux)), None

  first = jax.tree.map(lambda x: x[0], minibatch)
  aux_shapes = jax.eval_shape(lambda: grad_fn(trainable, first, tokens, rows)[0][1])
  init = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes))
  (grads, value, aux), _ = jax.lax.scan(accumulate, init,
                                        (minibatch, jnp.arange(a, dtype=jnp.int32)))
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  params = lora_lib.join(optax.apply_updates(trainable, updates), frozen)
  return params, opt_state, dict(loss=value, grad_norm=grad_norm, **aux)


def update(graphdef, tx: optax.GradientTransformation, params, opt_state, batches: LossBatch,
           settings: StepSettings, layout: Layout | None = None,
           dropout_key: jax.Array | None = None):
  """mu iterations over the M minibatches of `batches` [M, A, ...], one optimizer update each.
  Returns (params, opt_state, metrics stacked over the mu x M updates)."""
  m = settings.grpo.minibatches_per_iteration

  def one(carry, idx):
    minibatch = jax.tree.map(lambda x: x[idx % m], batches)
    params, opt_state, metrics = minibatch_update(graphdef, tx, *carry, minibatch, settings,
                                                  layout, lora_lib.fold(dropout_key, idx))
    return (params, opt_state), metrics

  indices = jnp.arange(settings.grpo.updates_per_step, dtype=jnp.int32)
  (params, opt_state), metrics = jax.lax.scan(one, (params, opt_state), indices)
  return params, opt_state, metrics


def reset_reference(ref_params, params, step: jax.Array, every: int):
  """Iterative GRPO: pi_ref becomes the current policy after every `every`-th step (with LoRA:
  pi_ref's adapters become a copy of the policy's; the base is shared)."""
  if ref_params is None or every <= 0:
    return ref_params
  return jax.lax.cond(step % every == 0, lambda: lora_lib.split_trainable(params)[0],
                      lambda: ref_params)


# -- the step -----------------------------------------------------------------------------------


def train_step(state: TrainState, batch: Batch, *, graphdef, tx, lr_schedule,
               settings: StepSettings, reward_fn: RewardFn, reward_names: tuple[str, ...],
               layout: Layout | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One GRPO step: the phases above, in order."""
  key = jax.random.fold_in(state.key, state.step)
  rollout = sample(graphdef, state.params, batch, key, settings, layout)
  rewards = score(reward_fn, len(reward_names), batch.row_ids, rollout,
                  settings.grpo.step_slots)
  selection = select_groups(batch, rollout, rewards, settings, layout)
  advs = advantage(selection.rewards, selection.rollout, settings.grpo)
  old_logps, ref_logps = reference_logps(graphdef, state, selection.rollout, settings, layout)
  batches = loss_batches(selection.rollout, advs, old_logps, ref_logps, settings)
  dropout_key = jax.random.fold_in(jax.random.split(state.key)[1], state.step)  # LoRA dropout
  params, opt_state, update_metrics = update(graphdef, tx, state.params, state.opt_state,
                                             batches, settings, layout, dropout_key)
  step = state.step + 1
  ref_params = reset_reference(state.ref_params, params, step, settings.grpo.ref_reset_every)
  learning_rate = lr_schedule(step * settings.grpo.updates_per_step)
  metrics = step_metrics_lib.step_metrics(rollout, rewards, selection, advs, update_metrics,
                                          opt_state, learning_rate, reward_names, ref_logps)
  state = state.replace(step=step, params=params, opt_state=opt_state, ref_params=ref_params)
  return state, metrics


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, settings: StepSettings, reward_fn: RewardFn,
                    reward_names: tuple[str, ...], *, layout: Layout | None = None,
                    state_shardings=None, metrics_sharding=None, donate: bool = True):
  """`train_step` jitted over (state, batch), the rest bound.

  With state_shardings the new state keeps the layout of the old one (so donation reuses
  its buffers); metrics come back with metrics_sharding (replicated).
  """
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, lr_schedule=lr_schedule,
                           settings=settings, reward_fn=reward_fn, reward_names=reward_names,
                           layout=layout)
  out_shardings = None if state_shardings is None else (state_shardings, metrics_sharding)
  return jax.jit(step, donate_argnums=(0,) if donate else (), out_shardings=out_shardings)
