"""Model parity with transformers' PyTorch models, KV-cache decoding, checkpoint I/O, errors."""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from grpo_jax import models
from grpo_jax.models import published as published_lib
from grpo_jax.errors import UserError
from tests import tiny_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=64)
# name -> (family, make_checkpoint kwargs). With head_dim 16 and theta 5e5 the rope
# wavelengths are 6.3 (kept), 32 (interpolated) and > 64 (divided by factor). The sliding
# families have a window of 4 slots (tiny_hf.FAMILY_SETTINGS), shorter than the test rows;
# with 3 layers Gemma alternates sliding, full, sliding. "gemma3" is an image-text checkpoint.
CASES = {
    "llama3_tied": ("llama", dict(tie=True, rope_parameters=_LLAMA3)),
    "llama3_untied": ("llama", dict(tie=False, rope_parameters=_LLAMA3)),
    "qwen2": ("qwen2", dict(tie=False)),
    "qwen2_sliding": ("qwen2", dict(layers=3, use_sliding_window=True, sliding_window=4,
                                    max_window_layers=1)),
    "qwen3": ("qwen3", dict(tie=True, kv_heads=1)),
    "mistral": ("mistral", dict()),
    "gemma2": ("gemma2", dict(tie=True, layers=3)),
    "gemma3_text": ("gemma3_text", dict(layers=3, kv_heads=1)),
    "gemma3": ("gemma3", dict(tie=True, layers=3)),
}
SLIDING_CASES = ["qwen2_sliding", "mistral", "gemma2", "gemma3_text", "gemma3"]
PARITY_ATOL = 2e-4
CACHE_ATOL = 1e-4
GRAD_RTOL = 1e-4  # of each tensor's largest gradient entry
# bf16 params and activations vs float32 on logits of mean |l| ~1.3, max ~7: measured max
# 0.14, mean 0.02 (transformers' own bf16 forward is 0.18 max away from its float32 one).
BF16_MAX_ATOL = 0.3
BF16_MEAN_ATOL = 0.05


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """Case name -> checkpoint dir, built on first use."""
  return tiny_hf.checkpoint_maker(CASES, tmp_path_factory)


def _batch(vocab_size, b=3, t=12, pads=(0, 4, 9), seed=0):
  """Random tokens [B, T] with left padding of pads[i] tokens in row i, and the mask."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, vocab_size, size=(b, t)).astype(np.int32)
  mask = np.arange(t)[None, :] >= np.asarray(pads)[:, None]
  return np.where(mask, tokens, 0).astype(np.int32), mask.astype(np.int32)


def _hf_logits(directory, tokens, mask):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.numpy()


def _max_diff_on_valid(a, b, mask):
  return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask) == 1].max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers_with_left_padding(checkpoints, name):
  directory = checkpoints(name)
  model = models.from_pretrained(directory)
  tokens, mask = _batch(model.config.vocab_size)
  ours = model(jnp.asarray(tokens), jnp.asarray(mask))
  assert ours.dtype == jnp.float32
  diff = _max_diff_on_valid(ours, _hf_logits(directory, tokens, mask), mask)
  print(f"parity {name}: max |diff| = {diff:.2e}")
  assert diff < PARITY_ATOL


# "gemma3" computes as "gemma3_text" does; its HF parameter names are those of an image-text model.
@pytest.mark.parametrize("name", ["llama3_tied", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"])
def test_gradients_match_transformers(checkpoints, name, tmp_path):
  """d/dparams of sum_t w_t log p(x_t+1 | x_<=t) (w random, padding masked) against PyTorch's
  autograd through transformers' model; ours go through save_pretrained to get HF names."""
  directory = checkpoints(name)
  model = models.from_pretrained(directory)
  tokens, mask = _batch(model.config.vocab_size)
  # A weight per predicted token (like advantages), zero where the input is padding.
  weights = (np.random.RandomState(2).randn(*tokens.shape) * mask)[:, :-1].astype(np.float32)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)

  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(jnp.asarray(tokens), jnp.asarray(mask))[:, :-1]
    logps = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(logps * weights)

  grads = jax.jit(jax.grad(loss))(params)
  nnx.update(model, grads)
  models.save_pretrained(model, tmp_path)
  ours = load_file(tmp_path / "model.safetensors")

  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  logits = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(positions)).logits[:, :-1]
  logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[:, 1:, None], dtype=torch.long))[..., 0]
  (logps * torch.tensor(weights)).sum().backward()
  theirs = {n: p.grad.numpy() for n, p in hf.named_parameters()}

  assert set(ours) == set(theirs)
  worst = max(float(np.abs(ours[n] - theirs[n]).max() / (np.abs(theirs[n]).max() + 1e-6)) for n in ours)
  print(f"gradients {name}: max |diff| / max |grad| per tensor = {worst:.1e}")
  assert worst < GRAD_RTOL


@pytest.mark.parametrize("name", ["llama3_untied", "qwen2", "qwen3", *SLIDING_CASES])
def test_prefill_then_decode_matches_full_forward(checkpoints, name):
  """8 prompt slots then 5 decoded ones: the decode steps' windows slide past the prompt."""
  model = models.from_pretrained(checkpoints(name))
  prompt_len, new, spare = 8, 5, 3
  tokens, mask = _batch(model.config.vocab_size, t=prompt_len + new, pads=(0, 3, 6), seed=1)
  positions = np.asarray(models.positions_from_mask(jnp.asarray(mask)))
  full = model(jnp.asarray(tokens), jnp.asarray(mask))

  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def step(params, cache, tok, pos, m, index):
    m_ = nnx.merge(graphdef, params)
    h, cache = m_.hidden(tok, positions=pos, attention_mask=m, cache=cache, cache_index=index)
    return m_.logits(h), cache

  cache = models.init_cache(model.config, tokens.shape[0], prompt_len + new + spare)
  logits, cache = step(params, cache, tokens[:, :prompt_len], positions[:, :prompt_len],
                       mask[:, :prompt_len], jnp.int32(0))
  got = [logits]
  for i in range(prompt_len, prompt_len + new):
    logits, cache = step(params, cache, tokens[:, i:i + 1], positions[:, i:i + 1], mask[:, i:i + 1],
                         jnp.int32(i))
    got.append(logits)
  assert _max_diff_on_valid(jnp.concatenate(got, axis=1), full, mask) < CACHE_ATOL
  np.testing.assert_array_equal(np.asarray(cache.valid[:, :prompt_len + new]), mask == 1)
  assert not np.asarray(cache.valid[:, prompt_len + new:]).any()


def test_positions_count_real_tokens_from_zero():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(models.positions_from_mask(mask),
                                [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])


def test_init_cache_is_empty():
  config = models.ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                              num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4, dtype="bfloat16")
  cache = models.init_cache(config, 2, 7)
  assert len(cache.k) == len(cache.v) == 3
  assert all(x.shape == (2, 2, 7, 4) and x.dtype == jnp.bfloat16 for x in cache.k + cache.v)
  assert cache.valid.shape == (2, 7) and not cache.valid.any()


@pytest.mark.parametrize("name", ["qwen2", *SLIDING_CASES])
def test_save_pretrained_loads_back_in_transformers(checkpoints, tmp_path, name):
  """Exported, transformers computes the source's logits (an image-text Gemma 3 comes back as
  its text model, Gemma3ForCausalLM) and we read back the same config."""
  source = checkpoints(name)
  model = models.from_pretrained(source)
  models.save_pretrained(model, tmp_path)
  written = json.loads((tmp_path / "config.json").read_text())
  assert "rope_parameters" in written and "rope_theta" not in written
  assert written["model_type"] == model.config.family
  assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == model.config.family
  tokens, mask = _batch(model.config.vocab_size)
  np.testing.assert_allclose(_hf_logits(tmp_path, tokens, mask), _hf_logits(source, tokens, mask), atol=1e-6)
  assert models.from_pretrained(tmp_path).config == model.config


# Each feature off in turn, the logits move far from transformers': the parity tests test it.
_FEATURES_OFF = {
    "mistral window": ("mistral", dict(sliding_window=None, layer_types=())),
    "qwen2 window": ("qwen2_sliding", dict(sliding_window=None, layer_types=())),
    "gemma2 window": ("gemma2", dict(sliding_window=None, layer_types=())),
    "gemma2 attention cap": ("gemma2", dict(attn_logit_softcap=None)),
    "gemma2 final cap": ("gemma2", dict(final_logit_softcap=None)),
    "gemma2 query scale": ("gemma2", dict(query_pre_attn_scalar=None)),
    "gemma3 local rope": ("gemma3_text", dict(rope_local_theta=10000.0)),
    "gemma3 linear scaling": ("gemma3_text", dict(rope_scaling=None)),
}


@pytest.mark.parametrize("feature", sorted(_FEATURES_OFF))
def test_each_feature_changes_the_logits(checkpoints, feature):
  name, off = _FEATURES_OFF[feature]
  model = models.from_pretrained(checkpoints(name))
  altered = models.init(dataclasses.replace(model.config, **off))
  nnx.update(altered, nnx.state(model, nnx.Param))
  tokens, mask = _batch(model.config.vocab_size)
  assert _max_diff_on_valid(altered(tokens, mask), model(tokens, mask), mask) > 100 * PARITY_ATOL


def test_token_logprobs_apply_the_final_cap_in_chunks(checkpoints):
  """model.token_logprobs (the train step's chunked form) gives the log-probs and gradients of
  log_softmax(model.logits / temperature), soft cap included."""
  model = models.from_pretrained(checkpoints("gemma2"))
  tokens, mask = _batch(model.config.vocab_size)
  weights = (np.random.RandomState(3).randn(*tokens.shape) * mask)[:, 1:].astype(np.float32)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, chunked):
    m = nnx.merge(graphdef, params)
    h, _ = m.hidden(tokens, positions=models.positions_from_mask(mask), attention_mask=mask)
    if chunked:
      logps = m.token_logprobs(h[:, :-1], tokens[:, 1:], temperature=0.7, chunk_size=5)
    else:
      logps = jnp.take_along_axis(jax.nn.log_softmax(m.logits(h[:, :-1]) / 0.7, -1),
                                  tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(logps * weights), logps

  (_, chunked), chunked_grads = jax.value_and_grad(loss, has_aux=True)(params, True)
  (_, full), full_grads = jax.value_and_grad(loss, has_aux=True)(params, False)
  np.testing.assert_allclose(chunked, full, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), chunked_grads, full_grads)


def test_published_configs_read_as_transformers_reads_them():
  """Published config.json files (grpo_jax/models/published_configs.json, sources there)
  give the ModelConfig that transformers' own reading of them gives once written out in full
  (its defaults, its layer types): Gemma 2 / 3, an image-text Gemma 3, Qwen2.5 (Math), an R1
  distill, Mistral, Llama 3.x, Qwen3."""
  published = published_lib.configs()
  for name, hf in published.items():
    ours = models.ModelConfig.from_hf(hf)
    theirs = transformers.AutoConfig.for_model(**hf)
    assert ours == models.ModelConfig.from_hf(theirs.to_dict()), name
    text = theirs.get_text_config()  # Mistral has no layer_types: it slides on every layer
    types = getattr(text, "layer_types", None) or ["sliding_attention"] * text.num_hidden_layers
    window = getattr(text, "sliding_window", None)  # Llama has none
    sliding = "sliding_attention" in types and window is not None
    assert ours.layer_types == (tuple(types) if sliding else ()), name
    assert ours.sliding_window == (window if sliding else None), name
  gemma3_4b = models.ModelConfig.from_hf(published["gemma-3-4b-it"])
  assert gemma3_4b.layer_types.count("full_attention") == 5 and gemma3_4b.eos_token_ids == (1, 106)
  assert models.ModelConfig.from_hf(published["Qwen2.5-Math-1.5B"]).layer_types == ()


def test_image_text_gemma3_with_transformers_4_5x_names_loads_the_same(checkpoints, tmp_path):
  """Tensors named model.language_model.* (as transformers 4.52 - 4.5x saved them), not
  language_model.model.* (as published and as transformers 5 saves them)."""
  source = checkpoints("gemma3")
  directory = tmp_path / "renamed"
  shutil.copytree(source, directory)
  tensors = load_file(directory / "model.safetensors")
  renamed = {name.replace("language_model.model.", "model.language_model."): value
             for name, value in tensors.items()}
  assert renamed != tensors
  save_file(renamed, directory / "model.safetensors", metadata={"format": "pt"})
  tokens, mask = _batch(models.from_pretrained(source).config.vocab_size)
  np.testing.assert_array_equal(models.from_pretrained(directory)(tokens, mask),
                                models.from_pretrained(source)(tokens, mask))


def test_gemma_eos_ids_include_end_of_turn(checkpoints):
  """generation_config.json's EOS list ([<eos>, <end_of_turn>], as Gemma publishes it) is read."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoints("gemma2"))
  for name in ("gemma2", "gemma3"):
    assert models.from_pretrained(checkpoints(name)).config.eos_token_ids == (
        tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>"))


def test_sharded_save_is_read_by_both(checkpoints, tmp_path):
  source = checkpoints("llama3_untied")
  model = models.from_pretrained(source)
  models.save_pretrained(model, tmp_path, max_shard_bytes=40_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / "model.safetensors").exists()
  tokens, mask = _batch(model.config.vocab_size)
  np.testing.assert_allclose(_hf_logits(tmp_path, tokens, mask), _hf_logits(source, tokens, mask), atol=1e-6)
  reloaded = models.from_pretrained(tmp_path)
  np.testing.assert_array_equal(reloaded(tokens, mask), model(tokens, mask))


def test_bfloat16_params_round_trip_exactly(checkpoints, tmp_path):
  model = models.from_pretrained(checkpoints("qwen3"), dtype="bfloat16")
  models.save_pretrained(model, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  reloaded = models.from_pretrained(tmp_path, dtype="bfloat16")
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reloaded))):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _rewrite_config(source, target, edit):
  shutil.copytree(source, target)
  hf = json.loads((target / "config.json").read_text())
  edit(hf)
  (target / "config.json").write_text(json.dumps(hf))
  return target


def _to_rope_theta_layout(hf):
  """transformers 5 layout -> the published one: rope_theta + rope_scaling (old "type" key)."""
  rope = hf.pop("rope_parameters")
  hf["rope_theta"] = rope.pop("rope_theta")
  rope["type"] = rope.pop("rope_type")
  hf["rope_scaling"] = rope


def test_both_config_layouts_give_same_model(checkpoints, tmp_path):
  source = checkpoints("llama3_tied")
  old = _rewrite_config(source, tmp_path / "old", _to_rope_theta_layout)
  assert "rope_parameters" not in json.loads((old / "config.json").read_text())
  new_model, old_model = models.from_pretrained(source), models.from_pretrained(old)
  assert old_model.config == new_model.config
  assert dict(new_model.config.rope_scaling)["factor"] == 8.0
  tokens, mask = _batch(new_model.config.vocab_size)
  assert _max_diff_on_valid(old_model(tokens, mask), _hf_logits(source, tokens, mask), mask) < PARITY_ATOL


def test_config_round_trips_through_to_hf():
  hf = {"model_type": "llama", "vocab_size": 99, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 5e5, "rope_scaling": dict(_LLAMA3), "eos_token_id": [5, 6], "bos_token_id": 1}
  config = models.ModelConfig.from_hf(hf, dtype="bfloat16")
  assert config.head_dim == 8 and config.eos_token_ids == (5, 6) and config.rope_theta == 5e5
  assert config.dtype == config.param_dtype == "bfloat16"
  assert models.ModelConfig.from_hf(config.to_hf(), dtype="bfloat16") == config
  hash(config)


def test_unsupported_model_type_is_user_error(checkpoints, tmp_path):
  directory = _rewrite_config(checkpoints("qwen2"), tmp_path / "gpt2", lambda hf: hf.update(model_type="gpt2"))
  with pytest.raises(UserError, match=r"model_type 'gpt2' is not supported; supported: llama, qwen2, "
                     r"qwen3, mistral, gemma2, gemma3_text, gemma3$") as e:
    models.from_pretrained(directory)
  assert "\n" not in str(e.value)


def test_missing_tensor_is_user_error(checkpoints, tmp_path):
  directory = tmp_path / "ckpt"
  shutil.copytree(checkpoints("qwen2"), directory)
  tensors = load_file(directory / "model.safetensors")
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(UserError, match=r"lacks 1 tensors .*: model\.layers\.1\.self_attn\.k_proj\.bias$") as e:
    models.from_pretrained(directory)
  assert "\n" not in str(e.value)


def test_missing_config_is_user_error(tmp_path):
  with pytest.raises(UserError, match=r"no config\.json in .*; expected a local Hugging Face checkpoint"):
    models.from_pretrained(tmp_path)


def test_missing_weights_file_is_user_error(checkpoints, tmp_path):
  directory = tmp_path / "ckpt"
  shutil.copytree(checkpoints("qwen2"), directory)
  (directory / "model.safetensors").unlink()
  with pytest.raises(UserError, match=r"only safetensors weights are read"):
    models.from_pretrained(directory)


def test_bfloat16_stays_close_to_float32(checkpoints):
  directory = checkpoints("llama3_untied")
  f32, bf16 = models.from_pretrained(directory), models.from_pretrained(directory, dtype="bfloat16")
  tokens, mask = _batch(f32.config.vocab_size)
  ref, got = f32(tokens, mask), bf16(tokens, mask)
  assert got.dtype == jnp.float32
  assert bf16.hidden(tokens, positions=jnp.zeros_like(tokens), attention_mask=mask)[0].dtype == jnp.bfloat16
  diff = np.abs(np.asarray(got) - np.asarray(ref))[mask == 1]
  assert diff.max() < BF16_MAX_ATOL and diff.mean() < BF16_MEAN_ATOL


@pytest.mark.parametrize("fields,message", [
    (dict(family="llama", qk_norm=False, final_logit_softcap=30.0), r"final_logit_softcap are Gemma"),
    (dict(layer_types=("sliding_attention",)), r"layer_types has 1 entries for 2 layers"),
    (dict(layer_types=("sliding_attention", "local")), r"may only hold 'full_attention' and"),
    (dict(layer_types=("sliding_attention",) * 2), r"sliding layers need a sliding_window >= 1"),
    (dict(family="gemma3_text", attn_logit_softcap=50.0), r"gemma3_text attention has no logit"),
    (dict(family="gemma2", qk_norm=False, rope_local_theta=1e4), r"gemma2 uses one rope base"),
    (dict(family="gemma2", qk_norm=False, final_logit_softcap=-1.0), r"must be positive"),
    (dict(rope_scaling=(("factor", 8.0), ("rope_type", "yarn"))), r"is not one of: llama3 with"),
])
def test_invalid_model_configs_are_one_line_user_errors(fields, message):
  with pytest.raises(UserError, match=message) as e:
    _tiny_config(**fields)
  assert "\n" not in str(e.value)


def _tiny_config(**kwargs):
  base = dict(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, attention_bias=True)
  return models.ModelConfig(**{**base, **kwargs})


def test_every_parameter_has_logical_axis_names():
  allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", None}
  gemma = dict(sliding_window=3, layer_types=("sliding_attention", "full_attention"))
  for config in (_tiny_config(), _tiny_config(family="qwen2", qk_norm=False, tie_word_embeddings=True),
                 _tiny_config(family="gemma2", qk_norm=False, **gemma),
                 _tiny_config(family="gemma3_text", rope_local_theta=10.0, **gemma)):
    state = nnx.state(models.init(config), nnx.Param)
    for path, var in nnx.to_flat_state(state):
      names = var.get_metadata().get("out_sharding")
      assert names is not None and len(names) == var[...].ndim, path
      assert set(names) <= allowed, path


def test_remat_gives_same_values_and_gradients():
  tokens, mask = _batch(64, t=6, pads=(0, 2, 6))  # the last row is all padding

  def loss_and_grad(remat):
    graphdef, params = nnx.split(models.init(_tiny_config(remat=remat), seed=3), nnx.Param)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, mask) * mask[..., None])
    return jax.jit(jax.value_and_grad(loss))(params)

  (plain, plain_grads), (remat, remat_grads) = loss_and_grad(False), loss_and_grad(True)
  assert np.isfinite(plain) and all(np.isfinite(g).all() for g in jax.tree.leaves(plain_grads))
  np.testing.assert_allclose(remat, plain, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), remat_grads, plain_grads)
