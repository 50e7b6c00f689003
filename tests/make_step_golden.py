"""Writes tests/data/step_golden.json: the train metrics of two short GRPO runs of the demo
model, frozen so that a change to the step's code can be checked against them
(tests/test_train_step.py).

Run from the repository root: `python tests/make_step_golden.py`. The file in the repository
was written by the code before the step was split into phase functions (commit 4898a25);
rerun it only when the step is meant to compute something new.

"plain" is tests/test_train.py's tiny config after a short SFT warm start; "options" turns
every option of the step on: the KL term, mu = 2 iterations over 2 minibatches of 2
accumulated micro-batches, the dapo normaliser, clip-higher, dropped zero-variance groups and
masked truncated completions. Both run on 8 fake CPU devices (tests/conftest.py), as the test
does.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

GOLDEN_PATH = pathlib.Path(__file__).parent / "data" / "step_golden.json"
# A short SFT warm start makes completions end (EOS) and vary; the digit-share reward varies
# within most groups, so every step has a loss and a gradient.
BASE = {
    "sft.num_steps": 30, "sft.batch_size": 8, "sft.max_len": 48, "sampler.max_new_tokens": 40,
    "rewards": "tests.test_mesh:digit_share,exact_match:1", "train.num_steps": 3,
}
OPTIONS = {
    "grpo.beta": 0.04, "grpo.num_iterations": 2, "grpo.minibatches_per_iteration": 2,
    "train.grad_accum_steps": 2, "grpo.loss_type": "dapo", "grpo.epsilon_high": 0.28,
    "grpo.drop_zero_std_groups": True, "grpo.mask_truncated_completions": True,
    "data.prompts_per_step": 8, "grpo.num_generations": 4,
}


def config(name: str):
  """The ConfigDict of run `name` ("plain" or "options")."""
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  return tiny_config(**BASE, **({} if name == "plain" else OPTIONS))


def train_metrics(name: str) -> list[dict[str, float]]:
  """The train records of run `name`, without the timings."""
  from grpo_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from grpo_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as workdir:
    main_lib.run(config(name), workdir)
    records = [r for r in metrics_lib.read_metrics(workdir) if "train/loss" in r]
  return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def main() -> None:
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  # 8 fake CPU devices, set before jax is imported.
  import tests.conftest  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  golden = {name: train_metrics(name) for name in ("plain", "options")}
  GOLDEN_PATH.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
  print(f"wrote {GOLDEN_PATH} ({os.path.getsize(GOLDEN_PATH)} bytes)")


if __name__ == "__main__":
  main()
