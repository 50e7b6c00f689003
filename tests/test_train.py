"""End-to-end GRPO training on the built-in demo model: runs, learns, resumes exactly."""

import json
import os

import numpy as np
import pytest

from grpo_jax import main as main_lib
from grpo_jax import metrics as metrics_lib
from grpo_jax import rejection_sample
from grpo_jax import sft
from configs import demo

DESIGN_KEYS = ("train/loss", "train/grad_norm", "rl/reward_mean", "rl/reward_std", "rl/kl",
               "rl/clip_ratio", "rl/completion_length", "rl/frac_zero_std_groups", "rl/entropy",
               "perf/step_s", "perf/rollout_tokens_per_s")


# What makes any config a seconds-long run: 2 prompts x 4 completions, 2 steps, small evals,
# synchronous checkpoints only at the end, no TensorBoard or plot.
SMALL_RUN = {
    "data.prompts_per_step": 2, "data.num_eval_rows": 4, "grpo.num_generations": 4,
    "train.num_steps": 2, "eval.num_prompts": 2, "eval.k": 2, "checkpoint.every_steps": 0,
    "checkpoint.async_save": False, "logging.tensorboard": False, "logging.plot": False,
}


def set_keys(cfg, values):
  """Sets dotted config keys ("grpo.beta": 0.04) on a ConfigDict; returns it."""
  for key, value in values.items():
    node = cfg
    *path, leaf = key.split(".")
    for name in path:
      node = node[name]
    node[leaf] = value
  return cfg


def tiny_config(**overrides):
  """The copy demo's config shrunk to seconds: a 1-layer model, 2 prompts x 4 completions."""
  return set_keys(demo.get_config("copy"), {
      **SMALL_RUN,
      "model.demo.hidden_size": 32, "model.demo.intermediate_size": 64,
      "model.demo.num_layers": 1, "model.demo.num_heads": 2, "model.demo.num_kv_heads": 1,
      "data.source": "synthetic:arithmetic:digits=1", "sampler.max_new_tokens": 12,
      "train.learning_rate": 1e-3, "train.warmup_steps": 0, "sft.num_steps": 0,
      "eval.every_steps": 0, "mesh.shape": (1, -1, 1),
      **overrides})


def train_records(workdir):
  return [r for r in metrics_lib.read_metrics(workdir) if "train/loss" in r]


def test_demo_config_runs_end_to_end_with_design_metrics(tmp_path):
  cfg = tiny_config(**{"sft.num_steps": 2, "sft.batch_size": 4, "sft.max_len": 64,
                       "logging.plot": True})
  final = main_lib.run(cfg, str(tmp_path))
  records = metrics_lib.read_metrics(str(tmp_path))
  evals = [r for r in records if "eval/pass@1" in r]
  # One evaluation before the first GRPO step (after the SFT warm start), one at the end.
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 2
  assert "eval/maj@2" in final
  steps = train_records(str(tmp_path))
  assert [r["step"] for r in steps] == [1, 2]
  for key in DESIGN_KEYS + ("rewards/exact_match", "rewards/format"):
    assert key in steps[0], key
    assert np.isfinite(steps[0][key]), key
  assert any("sft/loss" in r for r in records)
  assert os.path.isdir(tmp_path / "checkpoints" / "2")
  assert os.path.isfile(tmp_path / "hf" / "config.json")
  assert os.path.isfile(tmp_path / "progress.png")


def seven_reward(prompts, completions, **unused):
  """Test reward: the share of '7' characters in the completion."""
  return [c.count("7") / max(len(c), 1) for c in completions]


def test_grpo_raises_the_reward_on_a_tiny_task(tmp_path):
  cfg = tiny_config(**{"rewards": "tests.test_train:seven_reward", "train.num_steps": 24,
                       "train.learning_rate": 1e-2, "train.lr_schedule": "constant",
                       "data.prompts_per_step": 4, "sampler.max_new_tokens": 8,
                       "eval.num_prompts": 0})
  main_lib.run(cfg, str(tmp_path))
  rewards = [r["rl/reward_mean"] for r in train_records(str(tmp_path))]
  assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.2, rewards


def test_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path):
  over = {"train.lr_schedule": "constant", "grpo.beta": 0.04, "eval.num_prompts": 0}
  main_lib.run(tiny_config(**over, **{"train.num_steps": 4}), str(tmp_path / "straight"))
  main_lib.run(tiny_config(**over, **{"train.num_steps": 2}), str(tmp_path / "resumed"))
  main_lib.run(tiny_config(**over, **{"train.num_steps": 4}), str(tmp_path / "resumed"))
  straight = train_records(str(tmp_path / "straight"))
  resumed = train_records(str(tmp_path / "resumed"))
  assert [r["step"] for r in resumed] == [1, 2, 3, 4]
  for a, b in zip(straight, resumed):
    for key in ("train/loss", "rl/reward_mean", "rl/kl", "train/grad_norm"):
      assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_several_updates_per_batch_with_kl_minibatches_and_remat(tmp_path):
  # remat: the blocks are rematerialised in training but not inside the sampler's loop.
  cfg = tiny_config(**{"grpo.num_iterations": 2, "grpo.beta": 0.04, "grpo.ref_reset_every": 1,
                       "model.remat": True,
                       "grpo.minibatches_per_iteration": 2, "data.prompts_per_step": 4,
                       "grpo.loss_type": "dapo", "eval.num_prompts": 0})
  main_lib.run(cfg, str(tmp_path))
  for r in train_records(str(tmp_path)):
    assert np.isfinite(r["train/loss"]) and r["rl/kl"] >= 0.0


def raising_reward(prompts, completions, **unused):
  raise RuntimeError("reward code bug")


def test_a_raising_reward_function_is_counted_and_the_run_goes_on(tmp_path):
  cfg = tiny_config(**{"rewards": "tests.test_train:raising_reward,format:1",
                       "eval.num_prompts": 0})
  main_lib.run(cfg, str(tmp_path))
  records = train_records(str(tmp_path))
  assert len(records) == 2
  assert all(r["rl/reward_failures"] == 8 for r in records)  # B*G completions each step


def test_sft_entry_point_writes_a_hugging_face_checkpoint(tmp_path):
  cfg = tiny_config(**{"sft.num_steps": 3, "sft.batch_size": 4, "sft.max_len": 64})
  out = sft.run(cfg, str(tmp_path))
  assert os.path.isfile(os.path.join(out, "config.json"))
  assert [r for r in metrics_lib.read_metrics(str(tmp_path)) if "sft/loss" in r]


def test_rejection_sampling_keeps_only_accepted_completions(tmp_path):
  cfg = tiny_config(**{"rewards": "tests.test_train:seven_reward"})
  out = str(tmp_path / "kept.jsonl")
  summary = rejection_sample.run(cfg, out, k=4, min_reward=0.0, max_per_prompt=2,
                                 num_prompts=3)
  rows = [json.loads(line) for line in open(out)]
  assert summary["kept"] == len(rows) > 0
  assert all({"prompt", "response", "answer", "reward"} <= set(r) for r in rows)
  # An impossible threshold keeps nothing.
  assert rejection_sample.run(cfg, out, k=2, min_reward=2.0, max_per_prompt=1,
                              num_prompts=3)["kept"] == 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gradient_accumulation_gives_the_update_of_one_big_batch(tmp_path, loss_type):
  # Same key, so the same rollout; accumulating 2 micro-batches must match one batch, also
  # with zero-variance groups dropped (their rows leave the normalisers).
  over = {"grpo.loss_type": loss_type, "grpo.drop_zero_std_groups": True,
          "data.prompts_per_step": 4, "train.num_steps": 1, "eval.num_prompts": 0,
          "mesh.shape": (1, 1, 8)}
  main_lib.run(tiny_config(**over), str(tmp_path / "one"))
  main_lib.run(tiny_config(**over, **{"train.grad_accum_steps": 2}), str(tmp_path / "acc"))
  one, acc = train_records(str(tmp_path / "one"))[0], train_records(str(tmp_path / "acc"))[0]
  assert one["rl/reward_mean"] == acc["rl/reward_mean"]
  for key in ("train/loss", "train/grad_norm"):
    assert one[key] == pytest.approx(acc[key], rel=1e-4, abs=1e-7), key


def test_hf_config_trains_a_local_checkpoint_on_jsonl(tmp_path):
  """configs/hf.py end to end: a local HF Qwen2 checkpoint (bf16 compute, remat), its own
  tokenizer and chat template, JSONL rows, the accuracy reward; the result loads back."""
  pytest.importorskip("torch")
  import transformers
  from configs import hf
  from tests import tiny_hf

  ckpt = tiny_hf.make_checkpoint("qwen2", tmp_path / "ckpt", layers=1)
  data_file = tmp_path / "train.jsonl"
  data_file.write_text("".join(
      json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
      for i in range(24)))
  cfg = set_keys(hf.get_config(f"model={ckpt},data={data_file}"), {
      **SMALL_RUN, "data.max_prompt_len": 64, "sampler.max_new_tokens": 8})
  main_lib.run(cfg, str(tmp_path / "run"))
  records = train_records(str(tmp_path / "run"))
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) and r["rl/kl"] >= 0 for r in records)
  assert "rewards/accuracy" in records[0] and "rewards/format" in records[0]
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
  assert model.config.model_type == "qwen2"
