"""Mistral, Gemma 2 and Gemma 3 through the trainer: chat template, train-step log-probs, one
GRPO step from a local checkpoint to an export that transformers loads."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import main as main_lib
from grpo_jax import models
from grpo_jax import completion_logps as logps_lib
from grpo_jax.data import encoding
from tests import tiny_hf
from tests.test_train import SMALL_RUN, set_keys, train_records

transformers = pytest.importorskip("transformers")


def test_gemma_template_takes_the_system_prompt_into_the_user_turn(tmp_path):
  """Gemma 2's template refuses a system role: the system prompt opens the user turn instead;
  the template's own <bos> is the only one."""
  tokenizer = tiny_hf.make_tokenizer(tmp_path, gemma=True)
  text = encoding.format_prompt(tokenizer, "What is 2 + 3?", system_prompt="Be brief.")
  assert text == "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n"
  tokens, mask = encoding.encode_prompts(tokenizer, [text], buckets=(64,))
  row = tokens[0][mask[0] == 1].tolist()
  assert row[0] == tokenizer.bos_token_id and row.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_train_step_logprobs_equal_a_full_forward(tmp_path, family):
  """completion_logps (prompt prefilled into a cache, shared by 2 rows each) equals the
  log-probs of one forward over prompt + completion, windows sliding over both; the entropies
  of the same pass are those of the full logits (Gemma 2: after its final soft cap)."""
  model = models.from_pretrained(tiny_hf.make_checkpoint(family, tmp_path, layers=3))
  rng = np.random.RandomState(0)
  t, n = 6, 9
  prompt_mask = (np.arange(t)[None] >= np.array([[0], [2]])).astype(np.int32)
  prompts = rng.randint(5, model.config.vocab_size, (2, t)) * prompt_mask
  completion_mask = (np.arange(n)[None] < np.array([[9], [7], [4], [9]])).astype(np.int32)
  completions = rng.randint(5, model.config.vocab_size, (4, n)) * completion_mask
  graphdef, params = nnx.split(model, nnx.Param)
  got, entropy = logps_lib.completion_logps_and_entropy(
      graphdef, params, prompts, prompt_mask, completions, completion_mask, 0.7)
  seq = jnp.concatenate([np.repeat(prompts, 2, 0), completions], axis=1)
  seq_mask = jnp.concatenate([np.repeat(prompt_mask, 2, 0), completion_mask], axis=1)
  log_p = jax.nn.log_softmax(model(seq, seq_mask)[:, t - 1:-1] / 0.7, -1)
  ref = jnp.take_along_axis(log_p, completions[..., None], -1)[..., 0]
  np.testing.assert_allclose(got * completion_mask, ref * completion_mask, atol=1e-5)
  ref_entropy = -jnp.sum(jnp.exp(log_p) * log_p, -1)
  np.testing.assert_allclose(entropy * completion_mask, ref_entropy * completion_mask, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_one_grpo_step_from_a_local_checkpoint(tmp_path, family):
  """configs/hf.py on each family (Gemma 3 as an image-text checkpoint): one GRPO step, then
  the export loads in transformers as that family's causal LM (Gemma 3's text model)."""
  from configs import hf  # pylint: disable=g-import-not-at-top

  ckpt = tiny_hf.make_checkpoint(family, tmp_path / "ckpt", layers=2)
  data_file = tmp_path / "train.jsonl"
  data_file.write_text("".join(
      json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
      for i in range(8)))
  cfg = set_keys(hf.get_config(f"model={ckpt},data={data_file}"), {
      **SMALL_RUN, "train.num_steps": 1, "eval.every_steps": 0, "eval.num_prompts": 0,
      "data.max_prompt_len": 64, "sampler.max_new_tokens": 8})
  main_lib.run(cfg, str(tmp_path / "run"))
  records = train_records(str(tmp_path / "run"))
  assert [r["step"] for r in records] == [1]
  assert np.isfinite(records[0]["train/loss"]) and records[0]["rl/completion_length"] > 0
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
  assert exported.config.model_type == models.from_pretrained(ckpt).config.family
