"""Writes tests/data/trl_golden.json: TRL 1.16's GRPO loss on fixed inputs.

Run from the repository root: `python tests/make_trl_golden.py` (needs torch and
trl==1.16.0; nothing is downloaded).

For every configuration a real `trl.GRPOTrainer` is constructed around a tiny
random-weight Qwen2 model and a word-level tokenizer built with the `tokenizers`
library. Only its model forward is replaced: `_get_per_token_logps_and_entropies`
returns a fixed leaf tensor of log-probs with requires_grad, so the unchanged
`_compute_loss` computes the loss and its metrics, and backward gives
d(loss)/d(logps). The trainer runs in train mode with one process and
`current_gradient_accumulation_steps = 1` (what the training loop sets when
nothing is accumulated) and `use_bias_correction_kl=False`.

tests/test_loss.py imports `make_trainer`, `trl_loss` and `make_inputs` from
here to compare with TRL live on fresh inputs.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import sys
import tempfile
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

GOLDEN_PATH = pathlib.Path(__file__).parent / "data" / "trl_golden.json"
METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
NUM_GENERATIONS = 2


def make_inputs(seed: int, rows: int = 6, tokens: int = 7, advs_per_token: bool = False,
                with_old: bool = True) -> dict[str, Any]:
  """Random float32 inputs: padded rows, an all-masked row, a one-token row,
  log-ratios wide enough to clip on both sides, advantages of both signs."""
  rng = np.random.default_rng(seed)
  logps = -rng.exponential(1.0, (rows, tokens)).astype(np.float32)
  lengths = rng.integers(2, tokens + 1, rows)
  lengths[0], lengths[1] = 0, 1
  mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
  advs_shape = (rows, tokens) if advs_per_token else (rows,)
  advs = rng.normal(0.0, 1.0, advs_shape).astype(np.float32)
  inputs = {
      "logps": logps,
      "old_logps": (logps + rng.normal(0.0, 0.4, (rows, 1))
                    + rng.normal(0.0, 0.3, logps.shape)).astype(np.float32),
      "ref_logps": (logps + rng.normal(0.0, 0.5, logps.shape)).astype(np.float32),
      "advs": advs,
      "mask": mask,
  }
  if not with_old:
    inputs["old_logps"] = None
  return inputs


def make_checkpoint(workdir: str) -> tuple[str, Any]:
  """Saves a tiny random Qwen2 model under workdir (TRL loads its reference model
  from the path); returns (model dir, tokenizer)."""
  import tokenizers
  import torch
  import transformers

  vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(30)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1))
  model_dir = os.path.join(workdir, "tiny_qwen2")
  model.save_pretrained(model_dir)
  return model_dir, tokenizer


def make_trainer(case: dict[str, Any], checkpoint: tuple[str, Any], workdir: str,
                 rows: int):
  """A GRPOTrainer on `checkpoint` (from make_checkpoint) configured as `case`
  (loss_type, beta, epsilon_low, epsilon_high, importance_sampling_level, delta,
  max_completion_length), for batches of `rows` completions."""
  import datasets
  import trl

  model_dir, tokenizer = checkpoint
  args = trl.GRPOConfig(
      output_dir=workdir, report_to="none", use_cpu=True, bf16=False,
      per_device_train_batch_size=rows, num_generations=NUM_GENERATIONS,
      max_completion_length=case["max_completion_length"], loss_type=case["loss_type"],
      beta=case["beta"], epsilon=case["epsilon_low"], epsilon_high=case["epsilon_high"],
      delta=case["delta"], importance_sampling_level=case["importance_sampling_level"],
      use_bias_correction_kl=False)
  dataset = datasets.Dataset.from_dict({"prompt": ["w1 w2", "w3 w4"] * rows})
  trainer = trl.GRPOTrainer(
      model=model_dir, reward_funcs=lambda completions, **_: [0.0] * len(completions),
      args=args, train_dataset=dataset, processing_class=tokenizer)
  trainer.model.train()
  trainer.current_gradient_accumulation_steps = 1
  return trainer


def trl_loss(trainer, inputs: dict[str, Any], num_items_in_batch: float | None = None):
  """Runs trainer._compute_loss on fixed log-probs (and token entropies, inputs["entropies"],
  zeros when absent): (loss, metrics, d loss / d logps)."""
  import torch

  logps = torch.tensor(inputs["logps"], requires_grad=True)
  rows, tokens = logps.shape
  mask = torch.tensor(inputs["mask"])
  entropies = (torch.tensor(inputs["entropies"]) if "entropies" in inputs
               else torch.zeros(rows, tokens))
  trainer._get_per_token_logps_and_entropies = (
      lambda *args, **kwargs: (logps, entropies, None))
  batch = {
      "prompt_ids": torch.ones(rows, 1, dtype=torch.long),
      "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
      "completion_ids": torch.ones(rows, tokens, dtype=torch.long),
      "completion_mask": mask,
      "advantages": torch.tensor(inputs["advs"]),
      "num_items_in_batch": torch.tensor(
          float(mask.sum()) if num_items_in_batch is None else num_items_in_batch),
  }
  if inputs["old_logps"] is not None:
    batch["old_per_token_logps"] = torch.tensor(inputs["old_logps"])
  if trainer.beta != 0.0:
    batch["ref_per_token_logps"] = torch.tensor(inputs["ref_logps"])
  trainer._metrics["train"].clear()
  loss = trainer._compute_loss(trainer.model, batch)
  loss.backward()
  loss = loss.detach()
  metrics = {name: float(trainer._metrics["train"][name][-1])
             for name in METRICS if name in trainer._metrics["train"]}
  return loss.item(), metrics, logps.grad.numpy()


# Input sets of the fixture by seed: make_inputs keyword arguments. Seeds 9 and
# 17 clip on both sides at both levels; 17 also has ratios above delta=1.5
# where the advantage is negative (the cap then matters).
INPUT_SETS = {9: {}, 17: {}, 2: {"with_old": False}, 16: {"advs_per_token": True}}


def golden_cases() -> list[dict[str, Any]]:
  """The full grid of the issue, plus delta, old_logps=None and [B, T] advantages."""
  base = dict(epsilon_low=0.2, delta=None, max_completion_length=9, seed=9)
  cases = [
      dict(base, loss_type=lt, beta=beta, epsilon_high=eh, importance_sampling_level=lvl)
      for lt, beta, eh, lvl in itertools.product(
          ("grpo", "bnpo", "dr_grpo", "dapo"), (0.0, 0.04), (None, 0.28),
          ("token", "sequence"))]
  grpo = dict(base, loss_type="grpo", beta=0.04, epsilon_high=0.28,
              importance_sampling_level="token")
  cases += [
      dict(grpo, delta=1.5, seed=17),
      dict(grpo, delta=1.5, seed=17, importance_sampling_level="sequence"),
      dict(grpo, seed=2),
      dict(grpo, seed=16),
      dict(grpo, seed=16, importance_sampling_level="sequence"),
  ]
  return cases


def main() -> None:
  import transformers

  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  inputs = {seed: make_inputs(seed, **kwargs) for seed, kwargs in INPUT_SETS.items()}
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    checkpoint = make_checkpoint(workdir)
    for case in golden_cases():
      case_inputs = inputs[case["seed"]]
      trainer = make_trainer(case, checkpoint, workdir, len(case_inputs["logps"]))
      loss, metrics, grad = trl_loss(trainer, case_inputs)
      results.append({"case": case, "loss": loss, "metrics": metrics, "grad": grad.tolist()})
  GOLDEN_PATH.parent.mkdir(exist_ok=True)
  GOLDEN_PATH.write_text(json.dumps({
      "inputs": {seed: {k: None if v is None else v.tolist() for k, v in arrays.items()}
                 for seed, arrays in inputs.items()},
      "results": results}) + "\n")
  print(f"wrote {len(results)} cases to {GOLDEN_PATH}", file=sys.stderr)


if __name__ == "__main__":
  main()
