"""Cold-start supervised fine-tuning (DeepSeek-R1's first stage).

  python -m grpo_jax.sft --config=configs/demo.py --workdir=runs/sft

Trains on prompt/response rows: a JSONL file whose rows hold "prompt" and "response"
(what `grpo_jax.rejection_sample` writes), or a synthetic task's worked solutions. The loss
is the mean negative log-likelihood of the response tokens (and EOS). At the end the model
is written as a Hugging Face checkpoint to <workdir>/hf, ready for `model.path`. With LoRA
(model.lora.rank > 0) SFT trains the adapters only (or, with model.lora.sft_trains="weights",
the base); hf/ then holds the merged model and <workdir>/adapter the adapters as a PEFT
directory (for model.lora.init_from).

Like GRPO, SFT checkpoints every checkpoint.every_steps steps (to <workdir>/checkpoints_sft)
and on SIGTERM / Ctrl-C; the same command resumes it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from absl import flags, logging
from flax import nnx

from grpo_jax import builder
from grpo_jax import checkpoint as checkpoint_lib
from grpo_jax import cli
from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import distributed
from grpo_jax import liveness
from grpo_jax import metrics as metrics_lib
from grpo_jax import models
from grpo_jax import optimizer as optimizer_lib
from grpo_jax import signals
from grpo_jax.errors import UserError, exit_on_user_error
from grpo_jax.models import lora as lora_lib


def response_of(row: dict[str, Any]) -> str:
  """The SFT target of a row: its "response", or a synthetic row's worked solution."""
  if "response" in row:
    return row["response"]
  if "reasoning" in row:
    return data_lib.sft_target(row)
  raise UserError("SFT rows need a \"response\" column (or a synthetic task's \"reasoning\"); "
                  f"this row has only {sorted(row)}")


def sft_rows(cfg: config_lib.Config) -> list[dict[str, Any]]:
  """The rows of sft.source (data.source unless set)."""
  source = cfg.sft.source
  return data_lib.load_rows(source, split="train", seed=cfg.train.seed,
                            skip_bad_rows=cfg.data.skip_bad_rows, required=("prompt", "response")
                            if source.startswith("jsonl:") else ("prompt", "answer"))


def nll_loss(graphdef, params, tokens, loss_mask, attention_mask, dropout_key=None) -> jax.Array:
  """Mean NLL of tokens [B, T] where loss_mask is 1 (token t predicted from t - 1)."""
  model = nnx.merge(graphdef, params)
  h_btd, _ = model.hidden(tokens, positions=models.positions_from_mask(attention_mask),
                          attention_mask=attention_mask, dropout_key=dropout_key)
  logps = model.token_logprobs(h_btd[:, :-1], tokens[:, 1:])
  mask = loss_mask[:, 1:].astype(jnp.float32)
  return -(logps * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def trainable_split(cfg: config_lib.Config):
  """params -> (what SFT trains, the rest): every weight, or with LoRA the adapters or (with
  model.lora.sft_trains="weights") the base."""
  weights = cfg.model.lora.rank > 0 and cfg.model.lora.sft_trains == "weights"
  return lora_lib.split_base if weights else lora_lib.split_trainable


def make_sft_step(graphdef, tx: optax.GradientTransformation, split=lora_lib.split_trainable):
  """jit: one update of the params that `split` (trainable_split) gives first, on a batch."""

  @jax.jit
  def sft_step(params, opt_state, tokens, loss_mask, attention_mask, dropout_key):
    trainable, frozen = split(params)
    loss_of = lambda trainable: nll_loss(graphdef, lora_lib.join(trainable, frozen), tokens,
                                         loss_mask, attention_mask, dropout_key)
    loss, grads = jax.value_and_grad(loss_of)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    params = lora_lib.join(optax.apply_updates(trainable, updates), frozen)
    return params, opt_state, loss, optax.tree.norm(grads)

  return sft_step


SFT_CHECKPOINTS = "checkpoints_sft"  # under the workdir, beside GRPO's "checkpoints"


def checkpointer(cfg: config_lib.Config, workdir: str) -> checkpoint_lib.Checkpointer:
  """Where SFT keeps its newest checkpoint, saved every checkpoint.every_steps SFT steps."""
  return checkpoint_lib.Checkpointer(os.path.join(workdir, SFT_CHECKPOINTS), keep=1,
                                     every_steps=cfg.checkpoint.every_steps,
                                     async_save=cfg.checkpoint.async_save)


def delete_checkpoints(cfg: config_lib.Config, workdir: str) -> None:
  """Removes SFT's checkpoints (GRPO, once it has its own, never resumes from them)."""
  ckpt = checkpointer(cfg, workdir)
  ckpt.delete_all()
  ckpt.close()


def train(cfg: config_lib.Config, tokenizer, graphdef, params, writer: metrics_lib.MetricsWriter,
          rows: Sequence[dict[str, Any]] | None = None, *,
          ckpt: checkpoint_lib.Checkpointer | None = None,
          stop: signals.StopRequest | None = None) -> tuple[Any, bool]:
  """Runs cfg.sft.num_steps SFT updates from params; returns (params, finished).

  Metrics go to the writer as step-0 records with "sft/step", "sft/loss", "sft/grad_norm".
  With `ckpt`, SFT resumes from its newest checkpoint (the trainable params, optimizer state,
  position in the data) and saves one every checkpoint.every_steps steps; once
  `stop.requested` (SIGTERM or Ctrl-C) it saves the step it has just finished and returns
  finished=False.
  """
  rows = list(rows if rows is not None else sft_rows(cfg))
  if not rows:
    raise UserError(f"sft.source={cfg.sft.source!r} has no rows")
  s = cfg.sft
  tx, _ = optimizer_lib.for_sft(cfg)
  split = trainable_split(cfg)
  trainable, frozen = split(params)
  state = {"params": trainable, "opt_state": tx.init(trainable)}  # what a checkpoint holds
  step_fn = make_sft_step(graphdef, tx, split)
  dropout_key = jax.random.split(jax.random.PRNGKey(cfg.train.seed))[1]
  stream = data_lib.PromptStream(rows, s.batch_size, cfg.train.seed)
  start, restored = 0, ckpt.restore_newest_good(state) if ckpt is not None else None
  if restored:
    start, state, meta = restored
    stream.restore(meta["data"])
    if writer.enabled:
      print(f"resumed SFT from {ckpt.directory}/{start}", flush=True)
  if ckpt is not None:
    writer.keep_sft_records_upto(start)  # what an interrupted attempt wrote after it goes
  progress = metrics_lib.Progress(s.num_steps, every_s=cfg.logging.progress_every_s,
                                  enabled=writer.enabled, title="sft")
  for i in range(start + 1, s.num_steps + 1):
    batch = stream.next()
    tokens, loss_mask, attention_mask = data_lib.encode_sft(
        tokenizer, data_lib.format_row_prompts(tokenizer, batch, cfg.data),
        [response_of(r) for r in batch], max_len=s.max_len)
    params, opt_state, loss, grad_norm = step_fn(
        lora_lib.join(state["params"], frozen), state["opt_state"], jnp.asarray(tokens),
        jnp.asarray(loss_mask), jnp.asarray(attention_mask), jax.random.fold_in(dropout_key, i))
    state = {"params": split(params)[0], "opt_state": opt_state}
    if i % cfg.logging.every_steps == 0 or i == s.num_steps:
      record = {"sft/step": i, "sft/loss": float(loss), "sft/grad_norm": float(grad_norm)}
      writer.write(0, record)
      progress.update(i, record)
    stopping = stop is not None and stop.requested and i < s.num_steps
    if ckpt is not None and i < s.num_steps:
      ckpt.save(i, state, {"data": stream.state()}, force=stopping)
    if stopping:
      logging.warning("stopped at SFT step %d after a signal%s", i,
                      "; checkpoint saved" if ckpt is not None else "")
      return lora_lib.join(state["params"], frozen), False
  return lora_lib.join(state["params"], frozen), True


@exit_on_user_error
def run(config, workdir: str | None) -> str:
  if config is None or not workdir:
    raise UserError("--config and --workdir are required, e.g. --config=configs/demo.py "
                    "--workdir=runs/sft")
  # Before anything (freeze counts the devices) touches jax.
  distributed.init_distributed(liveness.heartbeat_timeout_s(config))
  cfg = config_lib.freeze(config)
  if cfg.sft.num_steps <= 0:
    raise UserError(f"sft.num_steps={cfg.sft.num_steps}: set a positive number of SFT steps")
  checkpoint_lib.check_writable(workdir, "--workdir")
  with liveness.watch(cfg.mesh.process_timeout_s):
    tokenizer, model = builder.load_model(cfg)
    graphdef, params = nnx.split(model)
    writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0,
                                       tensorboard=cfg.logging.tensorboard)
    ckpt = checkpointer(cfg, workdir)
    params, finished = train(cfg, tokenizer, graphdef, params, writer, ckpt=ckpt,
                             stop=signals.StopRequest())
    ckpt.close()
    writer.close()
    if not finished:
      return ""
    out_dir = f"{workdir}/hf"
    if jax.process_index() == 0:
      model = nnx.merge(graphdef, params)
      models.save_pretrained(model, out_dir)  # with LoRA: merged
      data_lib.save_tokenizer(tokenizer, out_dir)
      if model.config.lora is not None:
        models.save_peft_adapter(model, f"{workdir}/adapter",
                                 base_model_name_or_path=cfg.model.path or None)
      logging.info("wrote %s", out_dir)
    delete_checkpoints(cfg, workdir)  # the result is in hf/; a new run starts over
    return out_dir


def main(argv) -> None:
  del argv
  out_dir = run(flags.FLAGS.config, flags.FLAGS.workdir)
  if out_dir:  # empty: stopped by a signal, to be resumed by the same command
    print(out_dir)


if __name__ == "__main__":
  cli.define_flags()
  cli.run_main(main)
