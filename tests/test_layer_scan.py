"""Layers stacked and scanned (model.scan_layers): the logits of transformers and of the
unscanned model, the same gradients and samples, the same files in and out, the same training
metrics, a clear error for a checkpoint of the other layout, and one compiled block per kind
of layer whatever the depth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from grpo_jax import completion_logps as logps_lib
from grpo_jax import main as main_lib
from grpo_jax import models
from grpo_jax import sampler as sampler_lib
from grpo_jax.models import layer_scan
from grpo_jax.models.config import FULL, SLIDING, LoRASpec
from tests import tiny_hf
from tests.test_models import _batch as batch
from tests.test_models import _hf_logits as hf_logits
from tests.test_models import _max_diff_on_valid as max_diff_on_valid
from tests.test_train import tiny_config, train_records

pytest.importorskip("torch")
pytest.importorskip("transformers")

F, S = FULL, SLIDING
# Layer patterns that make several runs: qwen2_sliding (F) + (S) x 2; gemma2 (S, F) x 2 + (S);
# gemma3_text (S, S, F) x 2 + (S), Gemma 3's rope bases and window.
CASES = {
    "qwen2": ("qwen2", dict(layers=3)),
    "qwen2_sliding": ("qwen2", dict(layers=3, use_sliding_window=True, sliding_window=4,
                                    max_window_layers=1)),
    "gemma2": ("gemma2", dict(tie=True, layers=5)),
    "gemma3_text": ("gemma3_text", dict(layers=7, kv_heads=1,
                                        layer_types=[S, S, F, S, S, F, S])),
}
PARITY_ATOL = 2e-4  # against transformers, float32, as tests/test_models.py
SAME_ATOL = 2e-5  # scanned against unscanned: the same float32 ops, another schedule


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  return tiny_hf.checkpoint_maker(CASES, tmp_path_factory)


@pytest.mark.parametrize("kinds, want", [
    ([F] * 28, [(0, 1, 28)]),  # Llama, Qwen: one run
    ([S, F] * 13, [(0, 2, 13)]),  # Gemma 2
    (([S] * 5 + [F]) * 4 + [S, S], [(0, 6, 4), (24, 1, 2)]),  # Gemma 3 1B's 26 layers
    ([F] * 3 + [S] * 25, [(0, 1, 3), (3, 1, 25)]),  # Qwen2 sliding from max_window_layers
    ([F], [(0, 1, 1)]),
])
def test_runs_cover_the_layers_in_order_with_the_fewest_blocks(kinds, want):
  assert layer_scan.runs(kinds) == want


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_scanned_model_gives_the_logits_of_transformers_and_of_the_unscanned_one(
    checkpoints, name):
  directory = checkpoints(name)
  plain = models.from_pretrained(directory)
  scanned = models.from_pretrained(directory, scan_layers=True)
  num_layers = scanned.config.num_layers
  assert scanned.layers.attn.q.shape[0] == num_layers  # stacked, "layers" first
  assert scanned.layers.attn.q.get_metadata()["out_sharding"][0] == layer_scan.LAYERS
  tokens, mask = batch(scanned.config.vocab_size)
  ours = scanned(jnp.asarray(tokens), jnp.asarray(mask))
  assert max_diff_on_valid(ours, hf_logits(directory, tokens, mask), mask) < PARITY_ATOL
  assert max_diff_on_valid(ours, plain(jnp.asarray(tokens), jnp.asarray(mask)), mask) < SAME_ATOL


def _shared_prompt_batch(vocab_size, share=2):
  prompts, prompt_mask = batch(vocab_size, b=2, t=6, pads=(0, 3), seed=1)
  completion, completion_mask = batch(vocab_size, b=2 * share, t=7, pads=(0,) * 2 * share, seed=2)
  completion_mask[1, 4:] = 0  # a completion that ended early
  return tuple(jnp.asarray(x) for x in (prompts, prompt_mask, completion, completion_mask))


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("name", ["qwen2", "gemma3_text"])
def test_log_prob_gradients_of_a_scanned_model_are_the_unscanned_ones(checkpoints, name, remat):
  """The training forward: prompts shared by their rows through a stacked cache, remat on and
  off; the gradient of every weight of every layer."""
  directory = checkpoints(name)
  rows = _shared_prompt_batch(models.from_pretrained(directory).config.vocab_size)

  def grads(scan_layers):
    model = models.from_pretrained(directory, remat=remat, scan_layers=scan_layers)
    graphdef, params = nnx.split(model)
    weights = jnp.linspace(-1.0, 1.0, rows[2].size).reshape(rows[2].shape)
    loss = lambda p: jnp.sum(weights * rows[3] * logps_lib.completion_logps(
        graphdef, p, *rows, 1.0))
    g = jax.jit(jax.grad(loss))(params)
    return nnx.state(layer_scan.unscanned(nnx.merge(graphdef, g)))

  want, got = nnx.to_flat_state(grads(False)), nnx.to_flat_state(grads(True))
  assert [path for path, _ in got] == [path for path, _ in want]
  for (path, g), (_, w) in zip(got, want):
    scale = float(jnp.max(jnp.abs(w[...])))
    np.testing.assert_allclose(g[...], w[...], atol=1e-5 * scale, err_msg=str(path))


def test_a_scanned_model_samples_the_unscanned_models_tokens(checkpoints):
  directory = checkpoints("gemma2")
  prompts, prompt_mask = batch(models.from_pretrained(directory).config.vocab_size, b=2, t=6,
                               pads=(0, 3))
  outs = [sampler_lib.generate(models.from_pretrained(directory, scan_layers=scan),
                               jnp.asarray(prompts), jnp.asarray(prompt_mask),
                               jax.random.key(3), max_new_tokens=9, samples_per_prompt=2)
          for scan in (False, True)]
  np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
  np.testing.assert_allclose(outs[1].logprobs, outs[0].logprobs, atol=1e-5)


def test_a_scanned_model_writes_and_reads_the_same_files(checkpoints, tmp_path):
  """Hugging Face weights and PEFT adapters: the unscanned layout's files, read back into
  either layout."""
  directory = checkpoints("gemma3_text")
  spec = LoRASpec(rank=2, alpha=4.0, targets=("q_proj", "o_proj", "down_proj"),
                  base_dtype="float32")
  for scan in (False, True):
    model = models.from_pretrained(directory, scan_layers=scan, lora=spec, seed=5)
    graphdef, params = nnx.split(model)  # adapters B made non-zero, the same either way
    params = jax.tree.map(lambda x: x + 0.01, params)
    model = nnx.merge(graphdef, params)
    models.save_pretrained(model, tmp_path / f"hf_{scan}")
    models.save_peft_adapter(model, tmp_path / f"adapter_{scan}")
  for kind, file in (("hf", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
    plain, scanned = (load_file(tmp_path / f"{kind}_{scan}" / file) for scan in (False, True))
    assert sorted(scanned) == sorted(plain)
    for name in plain:
      np.testing.assert_array_equal(scanned[name], plain[name], err_msg=name)
  base = models.from_pretrained(directory, scan_layers=True, lora=spec)
  loaded = models.load_peft_adapter(base, tmp_path / "adapter_False")
  assert loaded.config.scan_layers
  plain = models.load_peft_adapter(models.from_pretrained(directory, lora=spec),
                                   tmp_path / "adapter_False")
  tokens, mask = batch(base.config.vocab_size)
  np.testing.assert_allclose(loaded(jnp.asarray(tokens), jnp.asarray(mask)),
                             plain(jnp.asarray(tokens), jnp.asarray(mask)), atol=SAME_ATOL)


@pytest.mark.parametrize("overrides", [
    {"model.remat": True},
    {"model.lora.rank": 4, "model.lora.alpha": 8.0, "model.lora.dropout": 0.1,
     "model.lora.base_dtype": "int8", "grpo.beta": 0.04},
], ids=["full_remat", "qlora_dropout"])
def test_a_scanned_run_has_the_metrics_of_an_unscanned_one(tmp_path, overrides):
  records = []
  for scan in (False, True):
    cfg = tiny_config(**{"train.num_steps": 2, "model.demo.num_layers": 3,
                         "rewards": "tests.test_mesh:digit_share", "train.learning_rate": 1e-2,
                         "model.scan_layers": scan, **overrides})
    main_lib.run(cfg, str(tmp_path / str(scan)))
    records.append(train_records(str(tmp_path / str(scan))))
  for got, want in zip(records[1], records[0], strict=True):
    keys = [k for k in want if not k.startswith("perf/")]
    assert [got[k] for k in keys] == pytest.approx([want[k] for k in keys], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_resuming_a_checkpoint_of_the_other_layout_is_one_error_line(tmp_path, capsys,
                                                                     saved_scanned):
  keys = {"train.num_steps": 1, "checkpoint.every_steps": 1, "eval.num_prompts": 0}
  main_lib.run(tiny_config(**keys, **{"model.scan_layers": saved_scanned}), str(tmp_path))
  with pytest.raises(SystemExit) as exit_info:
    main_lib.run(tiny_config(**{**keys, "train.num_steps": 2,
                                "model.scan_layers": not saved_scanned}), str(tmp_path))
  assert exit_info.value.code == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  stored = "stacked (model.scan_layers=True)" if saved_scanned else (
      "one by one (model.scan_layers=False)")
  assert len(errors) == 1 and (f"written with another model or optimizer config: its layers "
                               f"are stored {stored} (and ") in errors[0], errors


def test_the_compiled_gradient_holds_one_block_per_kind_of_layer_whatever_the_depth():
  """What scanning is for: the program (and its compile time) does not grow with L."""
  base = models.init(models.ModelConfig(
      family="gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=10000.0, rope_scaling=None,
      rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, qk_norm=False,
      max_position_embeddings=64, bos_token_id=None, eos_token_ids=(1,), pad_token_id=0,
      sliding_window=4, layer_types=(S, F)), seed=0).config
  tokens = jnp.ones((2, 8), jnp.int32)

  def hlo_size(num_layers, scan):
    config = dataclasses.replace(base, num_layers=num_layers, layer_types=(S, F) * (num_layers // 2),
                                 scan_layers=scan, remat=True)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: models.init(config, seed=0)))
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens))
    return len(jax.jit(jax.grad(loss)).lower(params).compile().as_text())

  scanned = hlo_size(4, True), hlo_size(16, True)  # (4 layers: 2 steps; XLA unrolls 1)
  unrolled = hlo_size(4, False), hlo_size(16, False)
  assert scanned[1] < 1.05 * scanned[0], scanned  # 2026-11-29: 648,498 and 649,534 characters
  assert unrolled[1] > 3 * unrolled[0], unrolled  # 795,272 and 3,095,902
