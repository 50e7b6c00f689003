"""Evaluation by pass@1 (averaged over k samples) and maj@k (majority vote; "cons@k" in R1).

Also the jitted sampling function that evaluation and rejection sampling share.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import mesh as mesh_lib
from grpo_jax import rewards as rewards_lib
from grpo_jax import sampler as sampler_lib
from grpo_jax.models import lora as lora_lib

CORRECTNESS_REWARDS = ("accuracy", "exact_match")


def correctness_reward(cfg: config_lib.Config) -> str:
  """The reward evaluation counts as "correct": accuracy if configured, else exact_match;
  without either, accuracy for JSONL / TFDS data and exact_match for the synthetic tasks."""
  names = [s.name for s in rewards_lib.parse_spec(cfg.rewards)]
  for name in CORRECTNESS_REWARDS:
    if name in names:
      return name
  return "accuracy" if cfg.data.source.startswith(("jsonl:", "tfds:")) else "exact_match"


def make_sample_fn(graphdef, settings: sampler_lib.SamplingSettings, layout=None):
  """jit: (params, prompt_tokens [P, T], prompt_mask [P, T], key, samples_per_prompt=k) ->
  (tokens, mask) [P * k, N], a prompt's k samples consecutive (LoRA adapters merged once).

  layout (train_step.Layout): when the P prompts split evenly over the batch axes, sampling
  runs in the rollout's layout (mesh.to_rollout_layout), each device on its own rows and
  their KV cache; otherwise, and without a layout, every device samples every row.
  """

  @functools.partial(jax.jit, static_argnames="samples_per_prompt")
  def sample(params, prompt_tokens, prompt_mask, key, samples_per_prompt=1):
    if layout is not None and prompt_tokens.shape[0] % mesh_lib.row_shards(layout.rows.mesh) == 0:
      params, prompt_tokens, prompt_mask = mesh_lib.to_rollout_layout(
          params, layout.params, nnx.merge(graphdef, params).config.compute_dtype, layout.rows,
          prompt_tokens, prompt_mask)
    policy = lora_lib.for_rollout(nnx.merge(graphdef, params))
    out = sampler_lib.generate_from(policy, prompt_tokens, prompt_mask, key, settings,
                                    samples_per_prompt)
    return out.tokens, out.mask.astype(jnp.int32)

  return sample


def sample_completions(sample_fn, params, tokenizer, rows: Sequence[dict[str, Any]], k: int,
                       key, data: config_lib.DataCfg, *, batch_rows: int = 256):
  """k completions for each dataset row, its prompt formatted and encoded as `data` says, in
  batches of at most `batch_rows` completions.

  Returns (completion texts [P * k] grouped by row, token lengths [P * k]).
  """
  texts, lengths = [], []
  per_batch = max(1, batch_rows // k)
  for start in range(0, len(rows), per_batch):
    tokens, mask = data_lib.encode_row_prompts(tokenizer, rows[start:start + per_batch], data)
    out_tokens, out_mask = sample_fn(params, tokens, mask, jax.random.fold_in(key, start),
                                     samples_per_prompt=k)
    out_tokens, out_mask = np.asarray(out_tokens), np.asarray(out_mask)
    texts += data_lib.decode_completions(tokenizer, out_tokens, out_mask)
    lengths += out_mask.sum(-1).tolist()
  return texts, lengths


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
  """Majority vote over extracted answers (no answer never wins); ties go to the first seen."""
  counts = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return False
  top = max(counts.values())
  winner = next(a for a in answers if a is not None and counts[a] == top)
  return any(c for a, c in zip(answers, correct) if a == winner)


def score_pass_and_majority(scorer, rows: Sequence[dict[str, Any]], texts: Sequence[str],
                            lengths: Sequence[int], k: int, reward_name: str) -> dict[str, float]:
  """pass@1 (mean correctness over all P*k samples) and maj@k from completion texts."""
  rep_rows = [row for row in rows for _ in range(k)]
  result = scorer.score_texts(rep_rows, texts, lengths)
  correct = np.nan_to_num(result.per_fn[reward_name], nan=0.0) > 0.5
  answers = [rewards_lib.extract_answer(t) for t in texts]
  majority = [majority_correct(answers[i * k:(i + 1) * k], correct[i * k:(i + 1) * k])
              for i in range(len(rows))]
  return {
      "eval/pass@1": float(correct.mean()),
      f"eval/maj@{k}": float(np.mean(majority)),
      "eval/completion_length": float(np.mean(lengths)),
  }
