"""DeepSeek-R1's recipe end to end, run as README's "Run it" lines run it, at tiny size.

cold-start SFT (`grpo_jax.sft`, configs/demo.py) -> GRPO on its hf/ (`grpo_jax.main`,
configs/hf.py) -> rejection sampling (`grpo_jax.rejection_sample`) -> SFT on the kept
samples -> GRPO again. Every stage is a subprocess on one CPU device. Each exported hf/ must
load in transformers (AutoTokenizer + AutoModelForCausalLM) and decode greedily to the text
grpo_jax's sampler gives, and a model reloaded from a GRPO stage's hf/ must evaluate to the
figures that stage logged for its final model.
"""

import json
import sys

import jax
import numpy as np
import pytest

from grpo_jax import data as data_lib
from grpo_jax import metrics as metrics_lib
from grpo_jax import models
from grpo_jax import sampler
from grpo_jax.data import synthetic
from tests.test_reliability import REPO, run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TASK = "synthetic:arithmetic:digits=1,ops=+"
NEW_TOKENS = 40  # the longest 1-digit worked solution is 34 tokens with EOS
# The demo model at half its width and depth: 200 steps teach it the format, and it gets
# about one 1-digit sum in ten right.
DEMO_SFT = ("--config.model.demo.hidden_size=64", "--config.model.demo.intermediate_size=192",
            "--config.model.demo.num_layers=2", "--config.model.demo.num_heads=2",
            "--config.model.demo.num_kv_heads=1", f"--config.data.source={TASK}",
            "--config.sft.num_steps=200", "--config.sft.max_len=96",
            "--config.checkpoint.async_save=False", "--config.logging.tensorboard=False")
# configs/hf.py shrunk to seconds: 4 prompts x 4 completions, 3 steps, 16 held-out prompts
# x 4 samples at temperature 1.
SMALL = ("--config.data.prompts_per_step=4", "--config.grpo.num_generations=4",
         "--config.train.num_steps=3", "--config.train.learning_rate=1e-4",
         "--config.data.num_eval_rows=16", "--config.eval.num_prompts=16", "--config.eval.k=4",
         f"--config.sampler.max_new_tokens={NEW_TOKENS}", "--config.data.max_prompt_len=64",
         "--config.checkpoint.every_steps=0", "--config.checkpoint.async_save=False",
         "--config.logging.tensorboard=False", "--config.logging.plot=False")
EVAL_KEYS = ("eval/pass@1", "eval/maj@4", "eval/completion_length")


def cli(module, *args):
  """Runs `python -m grpo_jax.<module> args` from the repository root; its stdout."""
  proc = run_cli(sys.executable, "-m", f"grpo_jax.{module}", *args, timeout=600)
  assert proc.returncode == 0, f"grpo_jax.{module} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
  return proc.stdout


def hf_config(model_dir, data_file):
  return f"--config=configs/hf.py:model={model_dir},data={data_file}"


def evals(workdir):
  """The evaluation records of a run's metrics.jsonl, by step."""
  return {r["step"]: {k: r[k] for k in EVAL_KEYS}
          for r in metrics_lib.read_metrics(workdir) if "eval/pass@1" in r}


def greedy_texts_agree(hf_dir, prompts):
  """transformers and grpo_jax, both float32, decode the prompts greedily to the same tokens.

  The exported tokenizer must give the demo tokenizer's ids (the one every stage started
  from). Returns the texts.
  """
  ours_tok = data_lib.demo_tokenizer()
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
  texts = [data_lib.format_prompt(ours_tok, p) for p in prompts]
  assert [hf_tok.encode(t) for t in texts] == [ours_tok.encode(t) for t in texts]
  assert [data_lib.format_prompt(hf_tok, p) for p in prompts] == texts
  tokens, mask = data_lib.encode_prompts(ours_tok, texts, buckets=(64,))
  eos, pad = hf_tok.eos_token_id, hf_tok.pad_token_id

  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor(tokens, dtype=torch.long),
                            attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
  ref = ref[:, tokens.shape[1]:].numpy()
  ref = np.pad(ref, ((0, 0), (0, NEW_TOKENS - ref.shape[1])), constant_values=pad)
  out = sampler.generate(models.from_pretrained(hf_dir), tokens, mask, jax.random.key(0),
                         max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_ids=(eos,),
                         pad_token_id=pad)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)
  ours = data_lib.decode_completions(ours_tok, out.tokens, out.mask)
  assert ours == [hf_tok.decode([t for t in row if t not in (eos, pad)]) for row in ref]
  return ours


def test_r1_recipe_runs_stage_after_stage_from_each_exported_model(tmp_path):
  train = tmp_path / "train.jsonl"
  rows = synthetic.synthetic_rows(TASK[len("synthetic:"):], num_rows=160)
  train.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n"
                           for r in rows))
  sft_dir, grpo_dir = tmp_path / "sft", tmp_path / "grpo"
  kept, sft2_dir, grpo2_dir = tmp_path / "sft2.jsonl", tmp_path / "sft2", tmp_path / "grpo2"

  cli("sft", "--config=configs/demo.py", f"--workdir={sft_dir}", *DEMO_SFT)
  cli("main", hf_config(sft_dir / "hf", train), f"--workdir={grpo_dir}", *SMALL)
  summary = json.loads(cli("rejection_sample", hf_config(grpo_dir / "hf", train),
                           f"--out={kept}", "--k=4", "--num_prompts=48",
                           f"--config.sampler.max_new_tokens={NEW_TOKENS}",
                           "--config.data.num_eval_rows=16").splitlines()[-1])
  cli("sft", hf_config(grpo_dir / "hf", kept), f"--workdir={sft2_dir}",
      "--config.sft.num_steps=4", "--config.sft.batch_size=8", "--config.sft.max_len=96",
      "--config.checkpoint.async_save=False", "--config.logging.tensorboard=False")
  cli("main", hf_config(sft2_dir / "hf", train), f"--workdir={grpo2_dir}", *SMALL)

  # Rejection sampling kept samples that earned every reward, and SFT trained on them.
  kept_rows = [json.loads(line) for line in kept.read_text().splitlines()]
  assert summary["kept"] == len(kept_rows) > 0, summary
  assert summary["min_reward"] == pytest.approx(1.2)  # accuracy:1 + format:0.2
  assert all(r["reward"] >= summary["min_reward"] for r in kept_rows)
  sft2_steps = [r["sft/step"] for r in metrics_lib.read_metrics(sft2_dir) if "sft/loss" in r]
  assert sft2_steps == [1, 2, 3, 4]

  # Each GRPO stage evaluated before its first step and at its end; the model the recipe
  # ends with evaluates, reloaded by a new run (evaluated before its one step), to the same
  # figures.
  assert sorted(evals(grpo_dir)) == sorted(evals(grpo2_dir)) == [0, 3]
  check = tmp_path / "check"
  cli("main", hf_config(grpo2_dir / "hf", train), f"--workdir={check}", *SMALL,
      "--config.train.num_steps=1")
  assert evals(check)[0] == evals(grpo2_dir)[3]
  assert evals(grpo2_dir)[3]["eval/pass@1"] > 0  # the equality is not vacuous

  eval_prompts = [r["prompt"] for r in synthetic.synthetic_rows(TASK[len("synthetic:"):],
                                                                split="eval", num_rows=4)]
  texts = [greedy_texts_agree(d / "hf", eval_prompts)
           for d in (sft_dir, grpo_dir, sft2_dir, grpo2_dir)]
  assert all("<answer>" in t for t in texts[0])  # cold-start SFT taught the format
