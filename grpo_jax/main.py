"""GRPO training from the command line.

  python -m grpo_jax.main --config=configs/demo.py --workdir=runs/demo [--config.a.b=value ...]

Starting again on the same workdir resumes from the newest complete checkpoint. SIGTERM or
SIGINT finishes the current step, checkpoints it and exits 0.
"""

from __future__ import annotations

import time
from typing import Any

import jax
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils

from grpo_jax import builder
from grpo_jax import checkpoint as checkpoint_lib
from grpo_jax import cli
from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import distributed
from grpo_jax import evaluate as evaluate_lib
from grpo_jax import liveness
from grpo_jax import metrics as metrics_lib
from grpo_jax import models
from grpo_jax import sft as sft_lib
from grpo_jax import signals
from grpo_jax import train_step as train_step_lib
from grpo_jax.errors import UserError, exit_on_user_error
from grpo_jax.models import lora as lora_lib


class Trainer:
  """Holds what one run needs; `run()` trains from scratch or resumes."""

  def __init__(self, cfg: config_lib.Config, workdir: str):
    self.cfg = cfg
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.parts, params = builder.build_run(cfg)
    self.setup = self.parts.setup
    self.state = self.setup.init_state(params)  # the host copy of params goes
    self.train_step = self.setup.train_step(self.parts.scorer, self.parts.scorer.names)
    self.sample_fn = self.setup.eval_sample_fn()
    self.stream = self.parts.prompt_stream()
    self.ckpt = checkpoint_lib.Checkpointer(f"{workdir}/checkpoints", keep=cfg.checkpoint.keep,
                                            async_save=cfg.checkpoint.async_save)
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.is_main,
                                            tensorboard=cfg.logging.tensorboard)
    # A LoRA base trained by the warm start is not model.path's: checkpoints keep it.
    lora = cfg.model.lora
    self.checkpoints_base = (lora.rank > 0 and cfg.sft.num_steps > 0
                             and lora.sft_trains == "weights")

  # -- pieces ------------------------------------------------------------------------------

  def batch(self) -> train_step_lib.Batch:
    """The next batch of the training stream."""
    return self.parts.batch(self.stream.next())

  def evaluate(self) -> dict[str, float]:
    """pass@1 and maj@k on the first eval.num_prompts held-out rows."""
    if not self.cfg.eval.num_prompts or not self.parts.eval_rows:
      return {}
    rows = self.parts.eval_rows[:self.cfg.eval.num_prompts]
    k = self.cfg.eval.k
    # One key for every evaluation: the model alone moves pass@1 between evaluations, and
    # a model saved at the end evaluates, reloaded in a new run, to the same figures.
    key = jax.random.key(self.cfg.train.seed + 1)
    texts, lengths = evaluate_lib.sample_completions(
        self.sample_fn, self.state.params, self.parts.tokenizer, rows, k, key, self.cfg.data)
    return evaluate_lib.score_pass_and_majority(self.parts.eval_scorer, rows, texts, lengths, k,
                                                self.parts.eval_reward)

  def save(self, step: int, *, force: bool = False) -> None:
    meta = {"data": self.stream.state(), "config": config_lib.describe(self.cfg),
            "config_digest": config_lib.digest(self.cfg)}
    self.ckpt.save(step, self.checkpointed(), meta, force=force)

  def checkpointed(self) -> train_step_lib.TrainState:
    return train_step_lib.checkpointed(self.state, with_base=self.checkpoints_base)

  def restore(self) -> int:
    """Resumes from the newest checkpoint that reads back as written (newer, damaged ones
    are moved aside); returns its step (-1: fresh start)."""
    restored = self.ckpt.restore_newest_good(self.checkpointed())
    if restored is None:
      # Records of an attempt that died before its first checkpoint go; cold-start SFT, which
      # comes first, keeps its own up to its newest checkpoint and drops the rest itself.
      if self.cfg.sft.num_steps <= 0:
        self.writer.truncate_after(-1)
      return -1
    step, saved, meta = restored
    self.state = train_step_lib.restore_checkpointed(self.state, saved)
    self.stream.restore(meta["data"])
    if meta.get("config_digest") != config_lib.digest(self.cfg):
      logging.warning("resuming step %d with a config that differs from the checkpoint's "
                      "(its values are in the checkpoint's meta)", step)
    self.writer.truncate_after(step)
    if self.is_main:
      print(f"resumed from {self.workdir}/checkpoints/{step}", flush=True)
    return step

  def warm_start(self, stop: signals.StopRequest) -> bool:
    """Cold-start SFT (DeepSeek-R1) before GRPO; the reference policy starts from its result
    (with LoRA, SFT trains the adapters GRPO goes on training and pi_ref stays the base, or
    with model.lora.sft_trains="weights" the base, which pi_ref then is).

    SFT checkpoints under <workdir>/checkpoints_sft and resumes from there; returns False
    when a signal stopped it (its last step checkpointed).
    """
    if self.cfg.sft.num_steps <= 0:
      return True
    ckpt = sft_lib.checkpointer(self.cfg, self.workdir)
    params, finished = sft_lib.train(self.cfg, self.parts.tokenizer, self.setup.graphdef,
                                     self.state.params, self.writer, ckpt=ckpt, stop=stop)
    ckpt.close()
    if finished:
      self.state = self.setup.init_state(params)
    return finished

  # -- the loop ----------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    """Trains to train.num_steps. A checkpoint at step k is taken only after every record of
    step k is written, so a run killed at any moment resumes to the same metrics."""
    cfg = self.cfg
    stop = signals.StopRequest()
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
      t0 = time.perf_counter()
      self.state, metrics = self.train_step(self.state, batch)
      metrics = jax.device_get(metrics)
      step_s = time.perf_counter() - t0
      step += 1
      record = {k: float(v) for k, v in metrics.items()}
      record["perf/step_s"] = step_s
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
    where = (f"the last good checkpoint is step {last} in {self.ckpt.directory}, where a new "
             "run on this workdir resumes")
    bad_ref = int(record.get("train/nonfinite_ref_logps", 0))
    if bad_ref:
      raise UserError(
          f"step {step}: {consecutive} optimizer updates in a row were skipped "
          f"(train.max_nan_steps={self.cfg.train.max_nan_steps}) because the reference "
          f"policy's log-probs are NaN/Inf ({bad_ref} completion tokens this step): the "
          f"reference parameters are broken; {where}, with the same broken reference unless "
          "it is fixed; check model.path or set grpo.beta=0")
    raise UserError(
        f"step {step}: {consecutive} optimizer updates in a row had NaN/Inf gradients and were "
        f"skipped (train.max_nan_steps={self.cfg.train.max_nan_steps}); {where}; "
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
    model = nnx.merge(self.setup.graphdef, params)
    models.save_pretrained(model, out_dir)  # with LoRA: merged
    data_lib.save_tokenizer(self.parts.tokenizer, out_dir)
    if model.config.lora is not None:
      base_dir = self.cfg.model.path or None
      if self.checkpoints_base:  # the warm start's base, which the adapters go with
        base_dir = f"{self.workdir}/base"
        models.save_pretrained(lora_lib.without_adapters(model), base_dir)
        data_lib.save_tokenizer(self.parts.tokenizer, base_dir)
      models.save_peft_adapter(model, f"{self.workdir}/adapter", base_model_name_or_path=base_dir)
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
  # Before anything (freeze counts the devices) touches jax.
  distributed.init_distributed(liveness.heartbeat_timeout_s(config))
  cfg = config_lib.freeze(config)
  checkpoint_lib.check_writable(workdir, "--workdir")
  with liveness.watch(cfg.mesh.process_timeout_s):
    return Trainer(cfg, workdir).run()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  cli.define_flags()
  cli.run_main(main)
