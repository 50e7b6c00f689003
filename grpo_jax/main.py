"""GRPO training from the command line.

  python -m grpo_jax.main --config=configs/demo.py --workdir=runs/demo [--config.a.b=value ...]

Starting again on the same workdir resumes from the newest complete checkpoint. SIGTERM or
SIGINT finishes the current step, checkpoints it and exits 0.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils

from grpo_jax import checkpoint as checkpoint_lib
from grpo_jax import cli
from grpo_jax import components
from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import evaluate as evaluate_lib
from grpo_jax import mesh as mesh_lib
from grpo_jax import metrics as metrics_lib
from grpo_jax import models
from grpo_jax import sampler
from grpo_jax import scoring
from grpo_jax import sft as sft_lib
from grpo_jax import train_step as train_step_lib
from grpo_jax.errors import UserError, exit_on_user_error



def step_config(cfg: config_lib.Config, scorer, tokenizer, model) -> train_step_lib.StepConfig:
  g = cfg.grpo
  return train_step_lib.StepConfig(
      num_generations=g.num_generations, num_iterations=g.num_iterations,
      minibatches=g.minibatches_per_iteration, grad_accum_steps=cfg.train.grad_accum_steps,
      beta=g.beta, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, delta=g.delta,
      loss_type=g.loss_type, importance_sampling_level=g.importance_sampling_level,
      scale_rewards=g.scale_rewards, drop_zero_std_groups=g.drop_zero_std_groups,
      mask_truncated_completions=g.mask_truncated_completions, ref_reset_every=g.ref_reset_every,
      sampling=sampler.SampleConfig(
          max_new_tokens=cfg.sampler.max_new_tokens, temperature=cfg.sampler.temperature,
          top_p=cfg.sampler.top_p, top_k=cfg.sampler.top_k,
          eos_token_ids=components.eos_token_ids(tokenizer, model),
          pad_token_id=data_lib.pad_id(tokenizer), stop_at_eos=cfg.sampler.stop_at_eos),
      reward_names=scorer.names)


class Trainer:
  """Holds what one run needs; `run()` trains from scratch or resumes."""

  def __init__(self, cfg: config_lib.Config, workdir: str):
    self.cfg = cfg
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    # Data and reward specs first: a bad row or reward name fails before a model loads.
    self.train_rows, self.eval_rows = components.load_rows(cfg)
    specs = components.reward_specs(cfg)
    # Read into host memory; new_state lays the params out on the mesh, so no one device
    # ever holds the whole model (at 7B in float32, 30 GB).
    with jax.default_device(components.host_device()):
      self.tokenizer, model = components.load_model(cfg)
    n = cfg.sampler.max_new_tokens
    self.scorer = scoring.Scorer(self.tokenizer, self.train_rows, specs, max_new_tokens=n,
                                 timeout_s=cfg.rewards_timeout_s)
    self.eval_reward = components.correctness_reward(cfg)
    eval_specs = [s for s in specs if s.name == self.eval_reward] or list(
        components.rewards_lib.parse_spec(self.eval_reward))
    eval_n = cfg.eval.max_new_tokens or n
    self.eval_scorer = scoring.Scorer(self.tokenizer, self.eval_rows, eval_specs,
                                      max_new_tokens=eval_n, timeout_s=cfg.rewards_timeout_s)
    self.step_cfg = step_config(cfg, self.scorer, self.tokenizer, model)
    updates = cfg.train.num_steps * cfg.grpo.num_iterations * cfg.grpo.minibatches_per_iteration
    self.tx, self.lr_schedule = train_step_lib.make_optimizer(
        learning_rate=cfg.train.learning_rate, total_updates=updates,
        warmup_steps=cfg.train.warmup_steps, schedule=cfg.train.lr_schedule,
        max_grad_norm=cfg.train.max_grad_norm, weight_decay=cfg.train.weight_decay,
        b1=cfg.train.adam_b1, b2=cfg.train.adam_b2, eps=cfg.train.adam_eps)
    self.mesh = mesh_lib.make_mesh(cfg.mesh.shape)
    self.graphdef, params = nnx.split(model)
    self.state = self.new_state(params)
    self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    self.train_step = train_step_lib.make_train_step(
        self.graphdef, self.tx, self.lr_schedule, self.step_cfg, self.scorer,
        state_shardings=self.state_shardings, metrics_sharding=mesh_lib.replicated(self.mesh))
    eval_temp = cfg.eval.temperature if cfg.eval.temperature is not None else cfg.sampler.temperature
    self.sample_fn = evaluate_lib.make_sample_fn(self.graphdef, dataclasses.replace(
        self.step_cfg.sampling, max_new_tokens=eval_n, temperature=eval_temp, stop_at_eos=True))
    self.stream = data_lib.PromptStream(list(range(len(self.train_rows))),
                                        cfg.data.prompts_per_step, cfg.train.seed)
    self.ckpt = checkpoint_lib.Checkpointer(f"{workdir}/checkpoints", keep=cfg.checkpoint.keep,
                                            async_save=cfg.checkpoint.async_save)
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.is_main,
                                            tensorboard=cfg.logging.tensorboard)

  # -- pieces ------------------------------------------------------------------------------

  def new_state(self, params) -> train_step_lib.TrainState:
    """A train state around params, laid out on the mesh (params by the logical-axis rules;
    the optimizer state follows them)."""
    shardings = mesh_lib.param_shardings(params, self.mesh)
    params = jax.device_put(params, shardings)
    init = jax.jit(lambda p: train_step_lib.init_state(p, self.tx, beta=self.cfg.grpo.beta,
                                                       seed=self.cfg.train.seed,
                                                       param_shardings=shardings))
    return init(params)

  def batch(self) -> train_step_lib.Batch:
    ids = self.stream.next()
    prompts = [data_lib.format_prompt(self.tokenizer, self.train_rows[i]["prompt"],
                                      use_chat_template=self.cfg.data.use_chat_template,
                                      system_prompt=self.cfg.data.system_prompt) for i in ids]
    tokens, mask = data_lib.encode_prompts(self.tokenizer, prompts,
                                           buckets=self.cfg.data.prompt_buckets,
                                           max_prompt_len=self.cfg.data.max_prompt_len)
    return train_step_lib.Batch(prompt_tokens=jnp.asarray(tokens, jnp.int32),
                                prompt_mask=jnp.asarray(mask, jnp.int32),
                                row_ids=jnp.asarray(ids, jnp.int32))

  def evaluate(self) -> dict[str, float]:
    if not self.cfg.eval.num_prompts or not self.eval_rows:
      return {}
    rows = self.eval_rows[:self.cfg.eval.num_prompts]
    k = self.cfg.eval.k
    # One key for every evaluation: the model alone moves pass@1 between evaluations, and
    # a model saved at the end evaluates, reloaded in a new run, to the same figures.
    key = jax.random.key(self.cfg.train.seed + 1)
    texts, lengths = evaluate_lib.sample_completions(
        self.sample_fn, self.state.params, self.tokenizer, rows, k, key,
        buckets=self.cfg.data.prompt_buckets, max_prompt_len=self.cfg.data.max_prompt_len,
        use_chat_template=self.cfg.data.use_chat_template, system_prompt=self.cfg.data.system_prompt)
    return evaluate_lib.score_pass_and_majority(self.eval_scorer, rows, texts, lengths, k,
                                                self.eval_reward)

  def save(self, step: int, *, force: bool = False) -> None:
    meta = {"data": self.stream.state(), "config": config_lib.describe(self.cfg),
            "config_digest": config_lib.digest(self.cfg)}
    self.ckpt.save(step, self.state, meta, force=force)

  def restore(self) -> int:
    """Resumes from the newest complete checkpoint; returns its step (-1: fresh start)."""
    step = self.ckpt.latest_step()
    if step is None:
      # Records of an attempt that died before its first checkpoint go; cold-start SFT, which
      # comes first, keeps its own up to its newest checkpoint and drops the rest itself.
      if self.cfg.sft.num_steps <= 0:
        self.writer.truncate_after(-1)
      return -1
    self.state, meta = self.ckpt.restore(self.state, step=step)
    self.stream.restore(meta["data"])
    if meta.get("config_digest") != config_lib.digest(self.cfg):
      logging.warning("resuming step %d with a config that differs from the checkpoint's "
                      "(its values are in the checkpoint's meta)", step)
    self.writer.truncate_after(step)
    if self.is_main:
      print(f"resumed from {self.workdir}/checkpoints/{step}", flush=True)
    return step

  def warm_start(self, stop: components.StopRequest) -> bool:
    """Cold-start SFT (DeepSeek-R1) before GRPO; the reference policy starts from its result.

    SFT checkpoints under <workdir>/checkpoints_sft and resumes from there; returns False
    when a signal stopped it (its last step checkpointed).
    """
    if self.cfg.sft.num_steps <= 0:
      return True
    ckpt = sft_lib.checkpointer(self.cfg, self.workdir)
    params, finished = sft_lib.train(self.cfg, self.tokenizer, self.graphdef, self.state.params,
                                     self.writer, ckpt=ckpt, stop=stop)
    ckpt.close()
    if finished:
      self.state = self.new_state(params)
    return finished

  # -- the loop ----------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    """Trains to train.num_steps. A checkpoint at step k is taken only after every record of
    step k is written, so a run killed at any moment resumes to the same metrics."""
    cfg = self.cfg
    stop = components.StopRequest()
    start = self.restore()
    first_eval: dict[str, float] = {}
    if start < 0:
      if not self.warm_start(stop):
        self.writer.close()
        return {}
      start = 0
      first_eval = self.evaluate()
      self.writer.write(0, first_eval)
      self._print_eval("before GRPO", first_eval)
      self.save(0, force=True)
      if cfg.sft.num_steps > 0:  # once step 0 is on disk, a restart never goes back to SFT
        self.ckpt.wait()
        sft_lib.delete_checkpoints(cfg, self.workdir)
      if stop.requested:
        return self._stopped(0)
    progress = metrics_lib.Progress(cfg.train.num_steps, every_s=cfg.logging.progress_every_s,
                                    enabled=self.is_main)
    final_eval: dict[str, float] = {}
    step = start
    while step < cfg.train.num_steps:
      batch = self.batch()
      t0, reward_s0 = time.perf_counter(), self.scorer.seconds
      self.state, metrics = self.train_step(self.state, batch)
      metrics = jax.device_get(metrics)
      step_s = time.perf_counter() - t0
      step += 1
      record = {k: float(v) for k, v in metrics.items()}
      record["perf/step_s"] = step_s
      record["perf/reward_s"] = self.scorer.seconds - reward_s0
      record["perf/rollout_tokens_per_s"] = record.pop("perf/rollout_tokens") / step_s
      nonfinite = metrics_lib.check_finite(record)
      if nonfinite:
        logging.warning("step %d: non-finite metrics %s", step, ", ".join(nonfinite))
      at_end = step == cfg.train.num_steps
      if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and not at_end:
        record.update(self.evaluate())
      self.writer.write(step, record)
      progress.update(step, record)
      self._stop_on_nonfinite(step, record)
      if at_end:
        final_eval = self.evaluate()
        self.writer.write(step, final_eval)
      # A skipped (non-finite) update is not checkpointed on schedule, so the newest
      # checkpoint is always the last good step.
      due = (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
             and not record["train/nonfinite_consecutive"])
      if due or at_end or stop.requested:
        self.save(step, force=True)
      if stop.requested and not at_end:
        return self._stopped(step)
    if step == start:  # resumed at the end: nothing left to train
      final_eval = self.evaluate()
    self.ckpt.wait()
    self._finish(first_eval, final_eval)
    return final_eval

  def _stopped(self, step: int) -> dict[str, Any]:
    self.ckpt.wait()
    logging.warning("stopped at step %d after a signal; checkpoint saved", step)
    self.writer.close()
    return {}

  def _stop_on_nonfinite(self, step: int, record: dict[str, float]) -> None:
    """Raises UserError after train.max_nan_steps skipped (non-finite) updates in a row."""
    consecutive = int(record["train/nonfinite_consecutive"])
    if consecutive < self.cfg.train.max_nan_steps:
      return
    self.ckpt.wait()
    last = self.ckpt.latest_step()
    raise UserError(
        f"step {step}: {consecutive} optimizer updates in a row had NaN/Inf gradients and were "
        f"skipped (train.max_nan_steps={self.cfg.train.max_nan_steps}); the last good checkpoint "
        f"is step {last} in {self.ckpt.directory}, where a new run on this workdir resumes; "
        "lower train.learning_rate or check the rewards and data")

  def _print_eval(self, title: str, ev: dict[str, float]) -> None:
    if self.is_main and ev:
      k = self.cfg.eval.k
      print(f"{title}: pass@1 {ev['eval/pass@1']:.3f}  maj@{k} {ev[f'eval/maj@{k}']:.3f}",
            flush=True)

  def _finish(self, first_eval, final_eval) -> None:
    # Every process takes part in gathering the sharded params; process 0 writes them.
    params = multihost_utils.process_allgather(self.state.params, tiled=True)
    if not self.is_main:
      return
    out_dir = f"{self.workdir}/hf"
    models.save_pretrained(nnx.merge(self.graphdef, params), out_dir)
    data_lib.save_tokenizer(self.tokenizer, out_dir)
    self._print_eval("after GRPO", final_eval)
    if first_eval and final_eval:
      gain = 100 * (final_eval["eval/pass@1"] - first_eval["eval/pass@1"])
      print(f"held-out pass@1: {100 * first_eval['eval/pass@1']:.1f}% -> "
            f"{100 * final_eval['eval/pass@1']:.1f}% ({gain:+.1f} points)", flush=True)
    if self.cfg.logging.plot:
      print(f"plot: {metrics_lib.plot(self.workdir)}", flush=True)
    self.writer.close()


@exit_on_user_error
def run(config, workdir: str | None) -> dict[str, Any]:
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/demo.py")
  if not workdir:
    raise UserError("--workdir is required: the run directory for checkpoints and metrics")
  components.init_distributed()  # before anything (freeze counts the devices) touches jax
  cfg = config_lib.freeze(config)
  trainer = Trainer(cfg, workdir)
  return trainer.run()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  cli.define_flags()
  cli.run_main(main)
