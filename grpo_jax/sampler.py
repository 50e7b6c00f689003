"""Compiled autoregressive sampling with a KV cache.

One prefill forward over the left-padded prompts fills the cache (once per prompt,
however many completions are drawn from it), then a `lax.while_loop` decodes one
token per iteration and exits as soon as every row has produced an EOS id (or N
tokens). Nothing in the loop returns to the host.

`generate` is the eager entry point (jitted here). `generate_from` is the pure
function behind it, for callers that are already inside a trace (the GRPO train
step merges its model from a params pytree and calls it there).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from grpo_jax import logprobs as logprobs_lib
from grpo_jax import models
from grpo_jax.config import DataCfg, SamplerCfg
from grpo_jax.errors import UserError
from grpo_jax.models import layer_scan
from grpo_jax.models import lora as lora_lib

@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """What sampling depends on (hashable: a jit compiles once per value): the `sampler`
  config section's values and the tokenizer's EOS and pad ids.

  Values are trusted: user input is validated where the config is read.
  """

  max_new_tokens: int  # N
  temperature: float = 1.0  # 0: greedy
  top_p: float = 1.0
  top_k: int = 0  # 0: off
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0
  stop_at_eos: bool = True  # False: exactly N tokens per row

  def __post_init__(self):
    object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

  @classmethod
  def from_config(cls, sampler: SamplerCfg, *, eos_token_ids: Sequence[int],
                  pad_token_id: int) -> SamplingSettings:
    """The settings of a frozen `sampler` config section and the tokenizer's ids."""
    return cls(max_new_tokens=sampler.max_new_tokens, temperature=sampler.temperature,
               top_p=sampler.top_p, top_k=sampler.top_k, eos_token_ids=tuple(eos_token_ids),
               pad_token_id=pad_token_id, stop_at_eos=sampler.stop_at_eos)

  @property
  def logprob_temperature(self) -> float:
    """The temperature log-probs are taken at: the sampling one; 1 for greedy sampling."""
    return self.temperature or 1.0


@struct.dataclass
class SamplerOutput:
  tokens: jax.Array  # [B, N] int32, pad after EOS
  mask: jax.Array  # [B, N] int32, 1 up to and including the first EOS
  logprobs: jax.Array  # [B, N] float32, 0 where mask is 0


@struct.dataclass
class DecodeState:
  step: jax.Array  # int32 scalar: index in [0, N) of the token sampled next
  tokens: jax.Array  # [B, N] int32
  logprobs: jax.Array  # [B, N] float32
  done: jax.Array  # [B] bool: the row has produced an EOS id
  cache: models.KVCache
  key: jax.Array  # the caller's key; step s samples with fold_in(key, s)
  positions: jax.Array  # [B] int32: position of tokens[:, step - 1]


def bucket_length(t: int, buckets: Sequence[int] = DataCfg.prompt_buckets) -> int:
  """The smallest bucket >= t, so prompts of similar length share one compile."""
  for b in sorted(buckets):
    if b >= t:
      return b
  raise UserError(
      f"prompt of {t} tokens is longer than the largest prompt bucket {max(buckets)}; "
      "allowed: shorter prompts or a larger bucket")


def pad_prompts(tokens: jax.Array, mask: jax.Array, length: int,
                pad_token_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Left-pads [B, T] prompts and their mask to [B, length]."""
  t = tokens.shape[1]
  if t > length:
    raise ValueError(f"prompts of {t} tokens do not fit in length {length}")
  widths = ((0, 0), (length - t, 0))
  return (jnp.pad(tokens, widths, constant_values=pad_token_id),
          jnp.pad(mask, widths, constant_values=0))


def truncate_logits(scaled_bv: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets to -inf every logit outside the top-k, then outside the top-p nucleus.

  The nucleus is the smallest set of most likely tokens (under the top-k
  renormalised distribution) whose probability mass reaches top_p; the most
  likely token is always kept. Logits tied with the last kept one are kept too.
  """
  v = scaled_bv.shape[-1]
  use_k = 0 < top_k < v
  if not use_k and top_p >= 1.0:
    return scaled_bv
  if use_k:
    sorted_bk = jax.lax.top_k(scaled_bv, top_k)[0]  # descending
  else:
    sorted_bk = -jnp.sort(-scaled_bv, axis=-1)
  if top_p < 1.0:
    probs_bk = jax.nn.softmax(sorted_bk, axis=-1)
    mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
    n_keep_b = jnp.sum(mass_before_bk < top_p, axis=-1)  # >= 1: mass before the top is 0
    threshold_b = jnp.take_along_axis(sorted_bk, n_keep_b[:, None] - 1, axis=-1)[:, 0]
  else:
    threshold_b = sorted_bk[:, -1]
  return jnp.where(scaled_bv >= threshold_b[:, None], scaled_bv, -jnp.inf)


def first_argmax(x_bv: jax.Array) -> jax.Array:
  """jnp.argmax(x, -1) as int32 (the first maximal index), for x without NaN.

  Written as a max and then a min over the indices that reach it: two plain reductions,
  which XLA CPU vectorises, where jnp.argmax's (value, index) reduction is not (it was a
  tenth of a decode step on CPU).
  """
  v = x_bv.shape[-1]
  index_bv = jnp.arange(v, dtype=jnp.int32)
  at_max_bv = x_bv == jnp.max(x_bv, axis=-1, keepdims=True)
  return jnp.minimum(jnp.min(jnp.where(at_max_bv, index_bv, v), axis=-1), v - 1)


def sample_token(logits_bv: jax.Array, key: jax.Array, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row; returns (tokens [B] int32, logprobs [B] float32).

  With s = logits / temperature, the token is drawn from softmax(s) truncated by
  top-k / top-p, and its log-prob is log softmax(s)[token] under the UNtruncated
  distribution: what TRL and vLLM report, and what a teacher-forced forward at
  the same temperature gives (the GRPO ratio's denominator). Temperature 0 is
  greedy (argmax), with the log-prob at temperature 1.
  """
  if temperature == 0:
    tokens_b = first_argmax(logits_bv)
  else:
    scaled_bv = truncate_logits(logits_bv.astype(jnp.float32) / temperature, top_k, top_p)
    # Gumbel-max: the draw of jax.random.categorical(key, scaled_bv), the same tokens.
    tokens_b = first_argmax(scaled_bv + jax.random.gumbel(key, scaled_bv.shape, scaled_bv.dtype))
  logprobs_b = logprobs_lib.token_logprobs(logits_bv[:, None], tokens_b[:, None],
                                           temperature=temperature or 1.0)[:, 0]
  return tokens_b, logprobs_b


def _eos_ids(settings: SamplingSettings) -> jax.Array:
  return jnp.asarray(settings.eos_token_ids or (-1,), jnp.int32)


def _next_tokens(logits_bv: jax.Array, key: jax.Array, step, done_b: jax.Array,
                 settings: SamplingSettings) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(tokens [B], their log-probs [B], done [B]) of decode step `step`: pad and log-prob 0 for
  the rows already done."""
  tokens_b, logprobs_b = sample_token(
      logits_bv, jax.random.fold_in(key, step), temperature=settings.temperature,
      top_k=settings.top_k, top_p=settings.top_p)
  tokens_b = jnp.where(done_b, settings.pad_token_id, tokens_b)
  logprobs_b = jnp.where(done_b, 0.0, logprobs_b)
  if settings.stop_at_eos:
    done_b = done_b | jnp.isin(tokens_b, _eos_ids(settings))
  return tokens_b, logprobs_b, done_b


def decode_step(model: models.Transformer, s: DecodeState, settings: SamplingSettings,
                prompt_len: int) -> DecodeState:
  """One iteration of the decode loop: the token after tokens[:, step - 1] for every row, its
  keys and values written to cache slot prompt_len + step - 1 (T = prompt_len)."""
  last_b1 = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)
  h_b1d, cache = model.hidden(last_b1, positions=s.positions[:, None],
                              attention_mask=jnp.ones_like(last_b1), cache=s.cache,
                              cache_index=prompt_len + s.step - 1)
  tokens_b, logprobs_b, done_b = _next_tokens(model.logits(h_b1d)[:, 0], s.key, s.step, s.done,
                                              settings)
  return DecodeState(
      step=s.step + 1,
      tokens=s.tokens.at[:, s.step].set(tokens_b),
      logprobs=s.logprobs.at[:, s.step].set(logprobs_b),
      done=done_b,
      cache=cache,
      key=s.key,
      positions=s.positions + 1,
  )


def generate_from(model: models.Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                  key: jax.Array, settings: SamplingSettings,
                  samples_per_prompt: int = 1) -> SamplerOutput:
  """Pure sampling from left-padded prompts [P, T]; traceable inside any jit.

  Returns B = P * samples_per_prompt rows, a prompt's samples consecutive: the rows of
  jnp.repeat(prompt_tokens, samples_per_prompt, axis=0), drawn the same way, but each prompt
  runs through the model once and its keys and values serve all of its samples.
  """
  model = layer_scan.unscanned(model)  # blocks one by one: decoding does not scan
  p, t = prompt_tokens.shape
  b = p * samples_per_prompt
  n = settings.max_new_tokens
  per_row = lambda x: jnp.repeat(x, samples_per_prompt, axis=0)  # [P, ...] -> [B, ...]
  prompt_mask = prompt_mask.astype(jnp.int32)
  eos_ids = _eos_ids(settings)

  # Prefill: one forward over the prompts into a cache of T slots, which then grows to the
  # B rows and T + N slots of decoding; the last column is every prompt's last token.
  prompt_cache = models.init_cache(model.config, p, t)
  h_ptd, cache = model.hidden(prompt_tokens, positions=models.positions_from_mask(prompt_mask),
                              attention_mask=prompt_mask, cache=prompt_cache, cache_index=0)
  cache = models.expand_cache(cache, samples_per_prompt, t + n)
  logits_bv = per_row(model.logits(h_ptd[:, -1:])[:, 0])
  first_b, first_lp_b, done_b = _next_tokens(logits_bv, key, 0, jnp.zeros((b,), bool),
                                             settings)
  state = DecodeState(
      step=jnp.array(1, jnp.int32),
      tokens=jnp.full((b, n), settings.pad_token_id, jnp.int32).at[:, 0].set(first_b),
      logprobs=jnp.zeros((b, n), jnp.float32).at[:, 0].set(first_lp_b),
      done=done_b,
      cache=cache,
      key=key,
      positions=per_row(jnp.sum(prompt_mask, axis=-1)),
  )

  def cond(s: DecodeState):
    return (s.step < n) & ~jnp.all(s.done)

  state = jax.lax.while_loop(cond, lambda s: decode_step(model, s, settings, t), state)
  if settings.stop_at_eos:
    is_eos_bn = jnp.isin(state.tokens, eos_ids).astype(jnp.int32)
    mask_bn = (jnp.cumsum(is_eos_bn, axis=-1) - is_eos_bn == 0).astype(jnp.int32)
  else:
    mask_bn = jnp.ones((b, n), jnp.int32)
  return SamplerOutput(tokens=state.tokens, mask=mask_bn, logprobs=state.logprobs)


@jax.jit(static_argnames=("settings", "samples_per_prompt"))
def generate_jit(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: jax.Array,
                 prompt_mask: jax.Array, key: jax.Array, settings: SamplingSettings,
                 samples_per_prompt: int = 1) -> SamplerOutput:
  """`generate_from` compiled over the split model (graphdef static, params traced); LoRA
  adapters merged into the weights first, as the train step's rollout does."""
  return generate_from(lora_lib.for_rollout(nnx.merge(graphdef, params)), prompt_tokens,
                       prompt_mask, key, settings, samples_per_prompt)


def generate(model: models.Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array,
             key: jax.Array, *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_ids: Sequence[int] = (),
             pad_token_id: int = 0, stop_at_eos: bool = True,
             samples_per_prompt: int = 1) -> SamplerOutput:
  """Samples N = max_new_tokens tokens after left-padded prompts [P, T] (compiled).

  Returns P * samples_per_prompt rows, a prompt's samples consecutive (see `generate_from`).
  Compiles once per (P, T, N, settings, samples_per_prompt); use `bucket_length` /
  `pad_prompts` to keep T to a few values. See `sample_token` for what the log-probs are.
  """
  settings = SamplingSettings(
      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
      eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id, stop_at_eos=stop_at_eos)
  graphdef, params = nnx.split(model)
  return generate_jit(graphdef, params, prompt_tokens, prompt_mask, key, settings,
                      samples_per_prompt)
