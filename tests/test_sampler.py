"""Sampler: greedy parity with transformers (every family, sliding windows included), log-probs
vs a full forward, EOS masking, top-k / top-p truncation and frequencies, one compile per
prompt bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import models
from grpo_jax import sampler
from grpo_jax.errors import UserError
from tests import tiny_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process  # pylint: disable=g-import-not-at-top

PAD = 0
N = 12  # new tokens
PADS = (0, 3, 5, 1)  # left padding of each prompt row
T = 7  # prompt width


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(transformers model, our model) with the same random qwen2 weights."""
  directory = tiny_hf.make_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  return hf, models.from_pretrained(directory)


# The families with sliding windows (4 slots, tiny_hf.FAMILY_SETTINGS) or Gemma's features;
# T + N = 19 slots, so decoding slides the window well past the prompt.
@pytest.fixture(scope="module", params=["mistral", "gemma2", "gemma3_text", "gemma3"])
def family(request, tmp_path_factory):
  """(transformers model, our model) of one family with the same random weights."""
  directory = tiny_hf.make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), layers=3)
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  return hf, models.from_pretrained(directory)


def _prompts(vocab_size, seed=0):
  """Left-padded prompts [B, T] int32 and their mask."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(5, vocab_size, size=(len(PADS), T))
  mask = np.arange(T)[None, :] >= np.asarray(PADS)[:, None]
  return np.where(mask, tokens, PAD).astype(np.int32), mask.astype(np.int32)


def _hf_greedy(hf, tokens, mask, eos_token_ids):
  """transformers' greedy completions [B, <=N] (pad after EOS, stops when all rows ended)."""
  config = transformers.GenerationConfig(
      max_new_tokens=N, do_sample=False, eos_token_id=list(eos_token_ids) or None,
      pad_token_id=PAD, bos_token_id=None)
  with torch.no_grad():
    out = hf.generate(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                      generation_config=config)
  return out[:, T:].numpy()


def _mask_through_first_eos(tokens_bn, eos_token_ids):
  is_eos = np.isin(tokens_bn, eos_token_ids)
  return (np.cumsum(is_eos, axis=1) - is_eos == 0).astype(np.int32)


def test_greedy_matches_transformers_and_masks_after_eos(tiny):
  hf, model = tiny
  tokens, mask = _prompts(model.config.vocab_size)
  free = _hf_greedy(hf, tokens, mask, ())  # [B, N], no EOS
  # EOS ids that greedy decoding does produce: row 0's 3rd token and row 2's 5th token.
  eos = (int(free[0, 2]), int(free[2, 4]))
  ref = _hf_greedy(hf, tokens, mask, eos)
  ref = np.pad(ref, ((0, 0), (0, N - ref.shape[1])), constant_values=PAD)
  ref_mask = _mask_through_first_eos(ref, eos)
  assert ref_mask.sum(1).min() < N, "no EOS fired: the test would not test stopping"

  out = sampler.generate(model, tokens, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0,
                         eos_token_ids=eos, pad_token_id=PAD)
  np.testing.assert_array_equal(out.tokens, ref)
  np.testing.assert_array_equal(out.mask, ref_mask)
  assert np.all(np.asarray(out.tokens)[ref_mask == 0] == PAD)
  assert np.all(np.asarray(out.logprobs)[ref_mask == 0] == 0)


def test_greedy_matches_transformers_in_every_family(family):
  """Stopping at the checkpoint's EOS ids (Gemma's include <end_of_turn>), as generate does."""
  hf, model = family
  tokens, mask = _prompts(model.config.vocab_size)
  eos = model.config.eos_token_ids
  ref = _hf_greedy(hf, tokens, mask, eos)
  out = sampler.generate(model, tokens, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0,
                         eos_token_ids=eos, pad_token_id=PAD)
  np.testing.assert_array_equal(out.tokens, np.pad(ref, ((0, 0), (0, N - ref.shape[1])),
                                                   constant_values=PAD))


def test_sampled_logprobs_equal_teacher_forced_forward_in_every_family(family):
  """Two samples per prompt (one shared prefill), temperature 1: each sampled token's log-prob is
  the full forward's over prompt + completion."""
  _, model = family
  tokens, mask = _prompts(model.config.vocab_size, seed=1)
  out = sampler.generate(model, tokens, mask, jax.random.key(3), max_new_tokens=N,
                         eos_token_ids=model.config.eos_token_ids, pad_token_id=PAD,
                         samples_per_prompt=2)
  tokens, mask = np.repeat(tokens, 2, axis=0), np.repeat(mask, 2, axis=0)
  seq = jnp.concatenate([tokens, out.tokens], axis=1)
  logits_bnv = model(seq, attention_mask=jnp.concatenate([mask, out.mask], axis=1))[:, T - 1:-1]
  ref = jnp.take_along_axis(jax.nn.log_softmax(logits_bnv, axis=-1), out.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.logprobs * out.mask, ref * out.mask, atol=1e-4)


def test_no_stop_at_eos_gives_n_tokens_from_inside_a_jit(tiny):
  hf, model = tiny
  tokens, mask = _prompts(model.config.vocab_size)
  free = _hf_greedy(hf, tokens, mask, ())
  eos = (int(free[0, 2]),)
  settings = sampler.SamplingSettings(max_new_tokens=N, temperature=0.0, eos_token_ids=eos,
                                  pad_token_id=PAD, stop_at_eos=False)
  graphdef, params = nnx.split(model)

  @jax.jit
  def outer(params, tokens, mask, key):
    return sampler.generate_from(nnx.merge(graphdef, params), tokens, mask, key, settings)

  out = outer(params, tokens, mask, jax.random.key(0))
  np.testing.assert_array_equal(out.tokens, free)
  np.testing.assert_array_equal(out.mask, np.ones_like(free))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logprobs_equal_teacher_forced_forward(tiny, temperature, top_k, top_p):
  """Log-probs are under the untruncated softmax(logits / temperature) (1 when greedy)."""
  _, model = tiny
  tokens, mask = _prompts(model.config.vocab_size, seed=1)
  out = sampler.generate(model, tokens, mask, jax.random.key(3), max_new_tokens=N,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_token_ids=model.config.eos_token_ids, pad_token_id=PAD)
  seq = jnp.concatenate([tokens, out.tokens], axis=1)
  seq_mask = jnp.concatenate([mask, out.mask], axis=1)
  logits_bnv = model(seq, attention_mask=seq_mask)[:, T - 1:-1]
  ref = jnp.take_along_axis(jax.nn.log_softmax(logits_bnv / (temperature or 1.0), axis=-1),
                            out.tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(out.logprobs * out.mask, ref * out.mask, atol=1e-4)


def _hf_kept(scaled_bv, top_k, top_p):
  """transformers' top-k then top-p warpers: which tokens stay samplable [B, V] bool."""
  scores = torch.tensor(np.asarray(scaled_bv))
  if top_k:
    scores = logits_process.TopKLogitsWarper(top_k)(None, scores)
  if top_p < 1:
    scores = logits_process.TopPLogitsWarper(top_p)(None, scores)
  return torch.isfinite(scores).numpy()


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.9), (1, 0.5), (0, 1e-6)])
def test_truncation_keeps_the_transformers_set(top_k, top_p):
  scaled_bv = 2.0 * jax.random.normal(jax.random.key(0), (32, 40))
  kept = np.isfinite(sampler.truncate_logits(scaled_bv, top_k, top_p))
  np.testing.assert_array_equal(kept, _hf_kept(scaled_bv, top_k, top_p))
  assert kept.sum(-1).min() >= 1


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.0, 0, 0.8), (1.3, 6, 0.9)])
def test_sampling_frequencies_follow_truncated_distribution(temperature, top_k, top_p):
  draws, v = 20_000, 8
  logits_v = jnp.linspace(2.0, -1.5, v)[jax.random.permutation(jax.random.key(1), v)]
  kept_v = _hf_kept((logits_v / temperature)[None], top_k, top_p)[0]
  expected_v = np.where(kept_v, np.exp(np.asarray(logits_v / temperature)), 0.0)
  expected_v /= expected_v.sum()

  tokens, logprobs = jax.jit(lambda key: sampler.sample_token(
      jnp.broadcast_to(logits_v, (draws, v)), key, temperature=temperature, top_k=top_k,
      top_p=top_p))(jax.random.key(2))
  counts_v = np.bincount(np.asarray(tokens), minlength=v)
  assert counts_v[~kept_v].sum() == 0
  chi2 = np.sum((counts_v[kept_v] - draws * expected_v[kept_v]) ** 2 / (draws * expected_v[kept_v]))
  p_value = float(jax.scipy.special.gammaincc((kept_v.sum() - 1) / 2, chi2 / 2))
  assert p_value > 1e-3, (counts_v, draws * expected_v)
  np.testing.assert_allclose(logprobs, jax.nn.log_softmax(logits_v / temperature)[tokens], atol=1e-6)


def test_one_compile_per_prompt_bucket(tiny, monkeypatch):
  _, model = tiny
  traces = []
  inner = sampler.generate_from
  monkeypatch.setattr(sampler, "generate_from", lambda *a: traces.append(1) or inner(*a))
  rng = np.random.RandomState(0)
  for step, t in enumerate((3, 9, 17, 30, 40)):
    tokens = rng.randint(5, model.config.vocab_size, size=(3, t)).astype(np.int32)
    tokens, mask = sampler.pad_prompts(tokens, np.ones_like(tokens), sampler.bucket_length(t, (32, 64)))
    sampler.generate(model, tokens, mask, jax.random.key(step), max_new_tokens=3)
    assert len(traces) == (1 if t <= 32 else 2)


def test_bucket_length_and_pad_prompts():
  assert [sampler.bucket_length(t, (16, 64)) for t in (1, 16, 17, 64)] == [16, 16, 64, 64]
  with pytest.raises(UserError, match="longer than the largest prompt bucket 64"):
    sampler.bucket_length(65, (16, 64))
  tokens, mask = sampler.pad_prompts(np.array([[7, 8], [0, 9]]), np.array([[1, 1], [0, 1]]), 4,
                                     pad_token_id=2)
  np.testing.assert_array_equal(tokens, [[2, 2, 7, 8], [2, 2, 0, 9]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError):
    sampler.pad_prompts(tokens, mask, 3)


@pytest.mark.parametrize("temperature,stop_at_eos", [(1.0, True), (0.0, False)])
def test_samples_per_prompt_equal_sampling_repeated_prompts(tiny, temperature, stop_at_eos):
  """S samples of each of P prompts (one prefill per prompt) are the rows that sampling the
  prompts repeated S times gives with the same key: same tokens, masks and log-probs."""
  _, model = tiny
  s = 3
  tokens, mask = _prompts(model.config.vocab_size, seed=2)
  free = sampler.generate(model, tokens, mask, jax.random.key(0), max_new_tokens=N,
                          temperature=0.0, stop_at_eos=False)
  kw = dict(max_new_tokens=N, temperature=temperature, pad_token_id=PAD, stop_at_eos=stop_at_eos,
            eos_token_ids=(int(free.tokens[1, 3]), int(free.tokens[3, 6])))
  key = jax.random.key(7)
  shared = sampler.generate(model, tokens, mask, key, samples_per_prompt=s, **kw)
  repeated = sampler.generate(model, np.repeat(tokens, s, 0), np.repeat(mask, s, 0), key, **kw)
  assert shared.tokens.shape == (len(PADS) * s, N)
  np.testing.assert_array_equal(shared.tokens, repeated.tokens)
  np.testing.assert_array_equal(shared.mask, repeated.mask)
  np.testing.assert_allclose(shared.logprobs, repeated.logprobs, atol=1e-5)
  if temperature:  # the samples of one prompt differ from each other, and some stop early
    assert len({tuple(row) for row in np.asarray(shared.tokens[:s])}) > 1
    assert np.asarray(shared.mask).sum(1).min() < N
