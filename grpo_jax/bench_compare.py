"""The jax side of the grpo_jax vs TRL comparison (`python -m grpo_jax.bench --what=trl`).

The comparison setup: a tiny Qwen2 checkpoint and JSONL prompts made locally, both trainers
on the same sizes and reward (bench.py's docstring); TRL runs in a child process
(grpo_jax.bench_trl) with the Python of a virtualenv that has torch and TRL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import ml_collections

from grpo_jax import bench_step
from grpo_jax import bench_trl
from grpo_jax import builder
from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_REWARD = "grpo_jax.bench_trl:letter_reward"
TRL_PINS = ("torch==2.13.0", "trl==1.16.0")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def trl_matched(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of cfg with what the TRL side does not vary set to what it does: float32 without
  remat, exactly N tokens (no early EOS), the shared reward, prompts as plain text, one update
  per step with the "grpo" loss, no SFT warm start and no evaluation."""
  cfg = cfg.copy_and_resolve_references()
  cfg.model.dtype = cfg.model.param_dtype = "float32"
  cfg.model.remat = False
  cfg.sampler.stop_at_eos = False
  cfg.sampler.top_p, cfg.sampler.top_k = 1.0, 0
  cfg.rewards = SHARED_REWARD
  cfg.data.use_chat_template = False
  cfg.data.system_prompt = None
  cfg.grpo.num_iterations = cfg.grpo.minibatches_per_iteration = cfg.train.grad_accum_steps = 1
  cfg.grpo.loss_type, cfg.grpo.scale_rewards = "grpo", "group"
  cfg.grpo.epsilon_low, cfg.grpo.epsilon_high, cfg.grpo.delta = 0.2, None, None
  cfg.train.max_grad_norm = 1.0
  cfg.sft.num_steps = 0
  cfg.eval.num_prompts = 0
  return cfg


def torch_python(trl_venv: str | None, trl_python: str | None) -> str:
  """The Python of the TRL side: --trl_python, the one in --trl_venv (made and filled with
  TRL_PINS if need be), or this one when torch and trl import here."""
  if trl_python:
    return trl_python
  if trl_venv:
    return ensure_trl_venv(trl_venv)
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("trl") is None:
    raise UserError("torch and trl are not importable here; pass --trl_venv=DIR to install "
                    f"{' '.join(TRL_PINS)} (CPU) there, or --trl_python=PYTHON")
  return sys.executable


def _pip(python: str, *args: str) -> None:
  proc = subprocess.run([python, "-m", "pip", "install", "--quiet", *args], check=False)
  if proc.returncode:
    raise UserError(f"pip install {' '.join(args)} failed (exit {proc.returncode}); allowed: a "
                    "--trl_venv where pip can reach the package index, or --trl_python=PYTHON")


def ensure_trl_venv(venv: str) -> str:
  """venv's python, after making the virtualenv and installing CPU torch + TRL if they are
  missing (torch from the CPU wheel index, so no CUDA build is pulled)."""
  python = os.path.join(venv, "bin", "python")
  if not os.path.exists(python):
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  if subprocess.run([python, "-c", "import torch, trl"], capture_output=True,
                    check=False).returncode:
    torch_pin, trl_pin = TRL_PINS
    _pip(python, "--index-url", TORCH_CPU_INDEX, torch_pin)
    _pip(python, trl_pin, torch_pin)
  return python


def _side(python: str, *args: str) -> None:
  """Runs `python -m grpo_jax.bench_trl ARGS` from the repository root, offline, on CPU."""
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "CUDA_VISIBLE_DEVICES": ""}
  proc = subprocess.run([python, "-m", "grpo_jax.bench_trl", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"grpo_jax.bench_trl {args[0]} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-6000:]}")


def comparison_config(workdir: str, python: str) -> ml_collections.ConfigDict:
  """The comparison setup (module docstring), made in workdir unless already there."""
  if not (REPO_ROOT / "tests" / "tiny_hf.py").is_file():
    raise UserError(f"the comparison setup is made by tests/tiny_hf.py, which {REPO_ROOT} lacks;"
                    " allowed: run from a repository checkout, or pass --config")
  model_dir = os.path.join(workdir, "tiny_qwen2")
  data = os.path.join(workdir, "prompts.jsonl")
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    _side(python, "checkpoint", model_dir)
  bench_trl.write_prompts(data)
  prompts = [row["prompt"] for row in data_lib.load_rows("jsonl:" + data)]
  tokens, _ = data_lib.encode_prompts(builder.load_tokenizer(model_dir), prompts, buckets=())
  cfg = config_lib.defaults()
  cfg.model.path = model_dir
  cfg.data.source = "jsonl:" + data
  cfg.data.num_eval_rows = 0
  cfg.data.prompt_buckets = (tokens.shape[1],)  # the longest prompt: TRL pads to its batch's
  cfg.data.prompts_per_step = 8  # B
  cfg.grpo.num_generations = 8  # G
  cfg.sampler.max_new_tokens = 64  # N
  cfg.grpo.beta = 0.04
  return trl_matched(cfg)


def run_trl_side(python: str, cfg: config_lib.Config, workdir: str, args: bench_step.StepArgs,
                 threads: int) -> dict[str, Any]:
  """TRL's GRPOTrainer on cfg's checkpoint, prompts and sizes, in a child process."""
  if not cfg.data.source.startswith("jsonl:"):
    raise UserError(f"data.source={cfg.data.source!r} is not allowed with --what=trl: "
                    "jsonl:<file> (TRL reads the same file)")
  if not cfg.model.path:
    raise UserError("model.path='' is not allowed with --what=trl: a local Hugging Face "
                    "checkpoint dir (TRL loads the same one)")
  out = os.path.join(workdir, "trl.json")
  _side(python, "trl", f"--model={cfg.model.path}", f"--data={cfg.data.source[len('jsonl:'):]}",
        f"--out={out}", f"--workdir={os.path.join(workdir, 'trl_run')}",
        f"--num_generations={cfg.grpo.num_generations}",
        f"--prompts_per_step={cfg.data.prompts_per_step}",
        f"--new_tokens={cfg.sampler.max_new_tokens}", f"--beta={cfg.grpo.beta}",
        f"--learning_rate={cfg.train.learning_rate}", f"--temperature={cfg.sampler.temperature}",
        f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={threads}",
        f"--seed={cfg.train.seed}")
  with open(out) as fp:
    return json.load(fp)
