"""Rejection sampling into new SFT data (DeepSeek-R1's third stage).

  python -m grpo_jax.rejection_sample --config=configs/hf.py:model=DIR,data=FILE.jsonl \
      --out=sft.jsonl --k=8 [--min_reward=...] [--max_per_prompt=1]

Samples k completions per prompt of data.source with the sampler settings of the config,
scores them with the config's rewards, and keeps those whose total reward reaches
--min_reward (default: the sum of the positive reward weights, i.e. every reward satisfied),
at most --max_per_prompt distinct ones per prompt. Writes JSONL rows
{"prompt", "response", "reward", ...the row's other columns}, ready for `grpo_jax.sft`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from absl import flags
from flax import nnx

from grpo_jax import builder
from grpo_jax import cli
from grpo_jax import config as config_lib
from grpo_jax import distributed
from grpo_jax import evaluate as evaluate_lib
from grpo_jax import rewards as rewards_lib
from grpo_jax import scoring
from grpo_jax.errors import UserError, exit_on_user_error


def select(rows, texts, totals, k: int, min_reward: float, max_per_prompt: int):
  """Keeps, per row, up to max_per_prompt distinct completions whose reward >= min_reward."""
  kept = []
  for i, row in enumerate(rows):
    seen = set()
    for j in range(i * k, (i + 1) * k):
      text = texts[j]
      if len(seen) >= max_per_prompt or text in seen or not totals[j] >= min_reward:
        continue
      seen.add(text)
      kept.append({**row, "response": text, "reward": float(totals[j])})
  return kept


@exit_on_user_error
def run(config, out: str | None, *, k: int, min_reward: float | None, max_per_prompt: int,
        num_prompts: int = 0) -> dict[str, Any]:
  if config is None or not out:
    raise UserError("--config and --out are required")
  if k < 1 or max_per_prompt < 1:
    raise UserError(f"--k={k} and --max_per_prompt={max_per_prompt} must be at least 1")
  distributed.init_distributed()  # before anything (freeze counts the devices) touches jax
  cfg = config_lib.freeze(config)
  tokenizer, model = builder.load_model(cfg)
  rows, _ = builder.load_rows(cfg)
  rows = rows[:num_prompts] if num_prompts else rows
  specs = rewards_lib.parse_spec(cfg.rewards)
  if min_reward is None:
    min_reward = sum(s.weight for s in specs if s.weight > 0)
  graphdef, params = nnx.split(model)
  settings = builder.sampling_settings(cfg, tokenizer, model.config)
  sample_fn = evaluate_lib.make_sample_fn(graphdef, dataclasses.replace(settings, stop_at_eos=True))
  texts, lengths = evaluate_lib.sample_completions(
      sample_fn, params, tokenizer, rows, k, jax.random.key(cfg.train.seed), cfg.data)
  scorer = scoring.Scorer(tokenizer, rows, specs, max_new_tokens=cfg.sampler.max_new_tokens,
                          timeout_s=cfg.rewards_timeout_s)
  result = scorer.score_texts([r for r in rows for _ in range(k)], texts, lengths)
  kept = select(rows, texts, np.asarray(result.total), k, min_reward, max_per_prompt)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
      for row in kept:
        f.write(json.dumps(row, default=str) + "\n")
    os.replace(tmp, out)
  summary = {"prompts": len(rows), "samples": len(texts), "kept": len(kept),
             "prompts_with_a_kept_response": len({r["prompt"] for r in kept}),
             "min_reward": min_reward, "reward_failures": int(result.num_failed)}
  print(json.dumps(summary), flush=True)
  return summary


def define_flags() -> None:
  cli.define_flags(workdir=False)
  flags.DEFINE_string("out", None, "Output JSONL file.")
  flags.DEFINE_integer("k", 8, "Completions sampled per prompt.")
  flags.DEFINE_float("min_reward", None, "Keep completions whose total reward is at least "
                     "this; default: the sum of the positive reward weights.")
  flags.DEFINE_integer("max_per_prompt", 1, "Distinct kept responses per prompt.")
  flags.DEFINE_integer("num_prompts", 0, "Use the first N prompts (0: all).")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  run(f.config, f.out, k=f.k, min_reward=f.min_reward, max_per_prompt=f.max_per_prompt,
      num_prompts=f.num_prompts)


if __name__ == "__main__":
  define_flags()
  cli.run_main(main)
