"""Decoder-only transformer (Llama / Qwen2 / Qwen3 / Mistral / Gemma 2 / Gemma 3) in Flax NNX.

Every parameter carries logical axis names in its `out_sharding` metadata ("vocab",
"embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "lora_rank"); mapping them to a mesh
is a rule table elsewhere. Weights are stored input-axis first: q [D, H, K], o [H, K, D],
gate/up [D, F], down [F, D], embed [V, D], lm_head [D, V]. R = H // Hkv is the number of
query heads that share one key/value head. With config.lora, the targeted projections carry
LoRA adapters (lora.py) and the projection weights may be stored quantized (quantize.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax import logprobs as logprobs_lib
from grpo_jax.models import attention as attention_lib
from grpo_jax.models import layer_scan
from grpo_jax.models import lora as lora_lib
from grpo_jax.models import quantize
from grpo_jax.models.config import FULL, SLIDING, ModelConfig
from grpo_jax.models.kv_cache import KVCache
from grpo_jax.models.rope import apply_rope, rope_angles

_INIT_STD = 0.02

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def _param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: tuple[str, ...],
           dtype: jnp.dtype) -> nnx.Param:
  """A parameter tagged with logical axis names (no sharding is applied here)."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


_normal = nnx.initializers.normal(_INIT_STD)
_ones = nnx.initializers.ones
_zeros = nnx.initializers.zeros
Weight = nnx.Param | quantize.QuantizedWeight


def _weight(config: ModelConfig, rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...],
            num_in: int) -> Weight:
  """A projection weight [*in, *out] (num_in input axes): a float parameter, or quantized
  codes when config.lora has a quantized base."""
  if config.lora is None or not config.lora.quantized:
    return _param(rngs, _normal, shape, axes, config.base_param_dtype)
  return quantize.QuantizedWeight(_normal(rngs.params(), shape, jnp.float32),
                                  config.lora.base_dtype, num_in, axes)


def _adapter(config: ModelConfig, rngs: nnx.Rngs, target: str, shape: tuple[int, ...],
             axes: tuple[str, ...], num_in: int) -> lora_lib.LoRA | None:
  """The LoRA adapter of the projection `target` (its PEFT name), or None when not targeted."""
  if not config.lora_target(target):
    return None
  return lora_lib.LoRA(shape[:num_in], shape[num_in:], axes, config.lora,
                       jnp.dtype(config.param_dtype), rngs=rngs)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in x's dtype.

  offset (Gemma): the weight is stored as scale - 1 (zero-initialised), as in HF checkpoints.
  """

  def __init__(self, dim: int, eps: float, dtype: jnp.dtype, *, offset: bool = False, rngs: nnx.Rngs):
    self.scale = _param(rngs, _zeros if offset else _ones, (dim,), ("norm",), dtype)
    self.eps = eps
    self.offset = offset

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (y * (1 + scale if self.offset else scale)).astype(x.dtype)


def _norm(config: ModelConfig, dim: int, *, rngs: nnx.Rngs) -> RMSNorm:
  """An RMSNorm of the config's eps, parameter dtype and (Gemma) weight offset."""
  return RMSNorm(dim, config.rms_norm_eps, config.base_param_dtype, offset=config.is_gemma,
                 rngs=rngs)


class Attention(nnx.Module):
  """Grouped-query attention with RoPE; optional q/k/v bias, o bias and per-head q/k RMSNorm."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, h, hkv, k = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    pd = config.base_param_dtype
    shapes = {"q": ((d, h, k), ("embed", "heads", "head_dim"), 1),
              "k": ((d, hkv, k), ("embed", "kv_heads", "head_dim"), 1),
              "v": ((d, hkv, k), ("embed", "kv_heads", "head_dim"), 1),
              "o": ((h, k, d), ("heads", "head_dim", "embed"), 2)}
    for name, (shape, axes, num_in) in shapes.items():
      setattr(self, name, _weight(config, rngs, shape, axes, num_in))
    for name, (shape, axes, num_in) in shapes.items():
      setattr(self, name + lora_lib.SUFFIX,
              _adapter(config, rngs, name + "_proj", shape, axes, num_in))
    if config.attention_bias:
      self.q_bias = _param(rngs, _zeros, (h, k), ("heads", "head_dim"), pd)
      self.k_bias = _param(rngs, _zeros, (hkv, k), ("kv_heads", "head_dim"), pd)
      self.v_bias = _param(rngs, _zeros, (hkv, k), ("kv_heads", "head_dim"), pd)
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    self.o_bias = _param(rngs, _zeros, (d,), ("embed",), pd) if config.out_bias else None
    if config.qk_norm:
      self.q_norm = _norm(config, k, rngs=rngs)
      self.k_norm = _norm(config, k, rngs=rngs)
    else:
      self.q_norm = self.k_norm = None
    self.scale = config.attention_scale
    self.soft_cap = config.attn_logit_softcap
    self.impl = config.attention

  def _project(self, x_btd: jax.Array, w: Weight, bias: nnx.Param | None,
               adapter: lora_lib.LoRA | None, dropout_key: jax.Array | None) -> jax.Array:
    """x W (+ b) (+ the adapter's x A B): [B, T, D] -> [B, T, heads, K]."""
    cd = x_btd.dtype
    y = jnp.einsum("btd,dhk->bthk", x_btd, quantize.weight(w, cd))
    if bias is not None:
      y = y + bias[...].astype(cd)
    return y if adapter is None else y + adapter(x_btd, dropout_key)

  def __call__(self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array, key_valid_bs: jax.Array,
               cache: KVCache | None, layer: int, cache_index: jax.Array | int,
               window: int | None, dropout_key: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """Attention of x's T tokens at slots cache_index.. over the key_valid_bs [B, S] slots
    (window: a sliding layer's W). A traced cache_index is a decode step: its attention
    reads only the cache's filled blocks (attention.decode_attend). dropout_key: LoRA
    dropout (the training forward); None: none."""
    key = lambda i: lora_lib.fold(dropout_key, i)
    q = self._project(x_btd, self.q, self.q_bias, self.q_lora, key(0))
    k = self._project(x_btd, self.k, self.k_bias, self.k_lora, key(1))
    v = self._project(x_btd, self.v, self.v_bias, self.v_lora, key(2))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, K]
    if cache is not None:
      def write(layers, x_bhtk):  # this layer's slots [cache_index, +T) <- x
        new = jax.lax.dynamic_update_slice(
            layers[layer], x_bhtk.astype(layers[layer].dtype), (0, 0, cache_index, 0))
        return layers[:layer] + (new,) + layers[layer + 1:]

      cache = cache.replace(k=write(cache.k, k), v=write(cache.v, v))
      k, v = cache.k[layer], cache.v[layer]
    options = dict(key_valid_bs=key_valid_bs, query_offset=cache_index, scale=self.scale,
                   window=window, soft_cap=self.soft_cap)
    if cache is not None and not isinstance(cache_index, int):
      out = attention_lib.decode_attend(q, k, v, **options)
    else:
      out = attention_lib.attend(q, k, v, impl=self.impl, **options)
    y = jnp.einsum("bthk,hkd->btd", out, quantize.weight(self.o, out.dtype))
    if self.o_bias is not None:
      y = y + self.o_bias[...].astype(y.dtype)
    if self.o_lora is not None:
      y = y + self.o_lora(out, key(3))
    return y, cache


class MLP(nnx.Module):
  """down(act(x gate) * (x up)): SwiGLU (silu), or GeGLU (tanh gelu) for Gemma."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    shapes = {"gate": ((d, f), ("embed", "mlp")), "up": ((d, f), ("embed", "mlp")),
              "down": ((f, d), ("mlp", "embed"))}
    for name, (shape, axes) in shapes.items():
      setattr(self, name, _weight(config, rngs, shape, axes, 1))
    for name, (shape, axes) in shapes.items():
      setattr(self, name + lora_lib.SUFFIX, _adapter(config, rngs, name + "_proj", shape, axes, 1))
    self.gelu = config.is_gemma

  def _project(self, x_flat: jax.Array, name: str, dropout_key: jax.Array | None) -> jax.Array:
    """x W (+ the adapter's x A B) of the weight `name`: [B*T, in] -> [B*T, out]."""
    y = x_flat @ quantize.weight(getattr(self, name), x_flat.dtype)
    adapter = getattr(self, name + lora_lib.SUFFIX)
    return y if adapter is None else y + adapter(x_flat, dropout_key)

  def __call__(self, x_btd: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    # On [B*T, D] rather than [B, T, D]: the same matmuls, but XLA CPU then computes the
    # weight gradients without transposing the [B, T, F] activations (1.6x faster backward).
    key = lambda i: lora_lib.fold(dropout_key, i)
    x_flat = x_btd.reshape(-1, x_btd.shape[-1])  # [B*T, D]
    gate = self._project(x_flat, "gate", key(0))
    act = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
    h_flat = act * self._project(x_flat, "up", key(1))
    return self._project(h_flat, "down", key(2)).reshape(x_btd.shape)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); Gemma normalises the
  attention and MLP outputs too: x + norm(attn(norm(x))), then x + norm(mlp(norm(x)))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d = config.hidden_size
    self.attn_norm = _norm(config, d, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = _norm(config, d, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)
    self.post_attn_norm = _norm(config, d, rngs=rngs) if config.is_gemma else None
    self.post_mlp_norm = _norm(config, d, rngs=rngs) if config.is_gemma else None

  def __call__(self, x_btd, cos, sin, key_valid_bs, cache, layer, cache_index, window,
               dropout_key=None):
    y, cache = self.attn(self.attn_norm(x_btd), cos, sin, key_valid_bs, cache, layer, cache_index,
                         window, lora_lib.fold(dropout_key, 0))
    if self.post_attn_norm is not None:
      y = self.post_attn_norm(y)
    x_btd = x_btd + y
    y = self.mlp(self.mlp_norm(x_btd), lora_lib.fold(dropout_key, 1))
    if self.post_mlp_norm is not None:
      y = self.post_mlp_norm(y)
    return x_btd + y, cache


def _run_block(block: Block, x_btd, cos, sin, key_valid_bs, cache, layer: int,
               cache_index: jax.Array | int, window: int | None, dropout_key=None):
  return block(x_btd, cos, sin, key_valid_bs, cache, layer, cache_index, window, dropout_key)


def _run_block_remat(block: Block, x_btd, cos, sin, key_valid_bs, cache, layer: int,
                     cache_index: jax.Array | int, window: int | None, dropout_key=None):
  """_run_block, rematerialised in the backward pass. The block runs as a pure function of
  its state (jax.checkpoint over nnx.split / merge): nnx.remat writes the block's variables
  back, which fails when some of them come from an outer trace (a LoRA run's frozen base,
  closed over by the gradient of the adapters). Layer, cache index (an int wherever there is
  a backward pass) and window stay static, so the attention kernels see a static offset."""
  graphdef, state = nnx.split(block)

  def run(state, x_btd, cos, sin, key_valid_bs, cache, dropout_key):
    return _run_block(nnx.merge(graphdef, state), x_btd, cos, sin, key_valid_bs, cache, layer,
                      cache_index, window, dropout_key)

  return jax.checkpoint(run)(state, x_btd, cos, sin, key_valid_bs, cache, dropout_key)


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
  """Positions [B, T] int32 of left-padded rows: max(cumsum(mask) - 1, 0), first real token at 0."""
  return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


class Transformer(nnx.Module):
  """Token embedding (times sqrt(D) for Gemma), L blocks, final RMSNorm, tied or untied
  unembedding (then Gemma's final soft cap, if any). With config.scan_layers the blocks are
  stored stacked and run by lax.scan (layer_scan.py); the same rng draws give the same
  weights either way."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    pd = config.base_param_dtype
    self.config = config
    self.embed = _param(rngs, _normal, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pd)
    blocks = [Block(config, rngs=rngs) for _ in range(config.num_layers)]
    self.layers = layer_scan.stack(blocks) if config.scan_layers else nnx.List(blocks)
    self.final_norm = _norm(config, config.hidden_size, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else _param(
        rngs, _normal, (config.hidden_size, config.vocab_size), ("embed", "vocab"), pd)

  def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] float32 of tokens [B, T]; left padding allowed (positions_from_mask)."""
    mask = jnp.ones(tokens.shape, jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
    h, _ = self.hidden(tokens, positions=positions_from_mask(mask), attention_mask=mask)
    return self.logits(h)

  def hidden(self, tokens: jax.Array, *, positions: jax.Array, attention_mask: jax.Array,
             cache: KVCache | None = None, cache_index: jax.Array | int = 0,
             remat: bool | None = None,
             activation_sharding=None,
             dropout_key: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states [B, T, D] (compute dtype) and the updated cache.

    Token t of these T occupies slot cache_index + t and attends to the valid slots at or
    before it (in a sliding layer, the last sliding_window of those slots): without a cache
    the slots are these T tokens, with one they are the cache's S slots after the T new
    keys/values and validities are written at [cache_index, +T).
    remat: rematerialise each block in the backward pass; None means config.remat without a
    cache and no remat with one (decoding has no backward pass, and nnx.remat cannot run
    inside the sampler's while_loop).
    activation_sharding: the sharding of the [B, T, D] activations (rows over the batch axes),
    kept after the embedding and every block. Without it, under FSDP the activations follow
    the embedding table's layout (model width over fsdp), and every device computes every
    row's MLP as partial sums ([B * T, F] per device instead of [B * T / devices, F]).
    dropout_key: LoRA dropout (the training forward); None: none.
    """
    constrain = (lambda y: y) if activation_sharding is None else (
        lambda y: jax.lax.with_sharding_constraint(y, activation_sharding))
    config = self.config
    x = jnp.take(self.embed[...], tokens, axis=0, mode="clip")  # [B, T, D]
    if config.is_gemma:  # sqrt(D) in the parameter dtype, as transformers rounds it
      x = x * jnp.asarray(config.hidden_size**0.5, x.dtype)
    x = constrain(x.astype(config.compute_dtype))
    rope = {FULL: rope_angles(config, positions)}
    rope[SLIDING] = rope[FULL] if config.rope_local_theta is None else rope_angles(
        config, positions, local=True)
    key_valid = attention_mask.astype(jnp.bool_)  # [B, S]
    if cache is not None:
      if not isinstance(cache_index, int):
        cache_index = jnp.asarray(cache_index, jnp.int32)
      key_valid = jax.lax.dynamic_update_slice(cache.valid, key_valid, (0, cache_index))
      cache = cache.replace(valid=key_valid)
    windows = {FULL: None, SLIDING: config.sliding_window}
    if remat is None:
      remat = config.remat and cache is None
    run = _run_block_remat if remat else _run_block
    if config.scan_layers:
      return self._scanned_blocks(x, rope, windows, key_valid, cache, cache_index, run, constrain,
                                  dropout_key)
    for layer, block in enumerate(self.layers):
      kind = config.layer_type(layer)
      x, cache = run(block, x, *rope[kind], key_valid, cache, layer, cache_index, windows[kind],
                     lora_lib.fold(dropout_key, layer))
      x = constrain(x)
    return self.final_norm(x), cache

  def _scanned_blocks(self, x, rope, windows, key_valid, cache, cache_index, run, constrain,
                      dropout_key) -> tuple[jax.Array, KVCache | None]:
    """hidden's blocks when they are stacked: a lax.scan per run of layer kinds
    (layer_scan.runs) whose step applies the run's pattern to a slice of the stacked
    variables and, with a cache, of the stacked keys and values (a one-layer cache each)."""
    config = self.config
    if cache is not None and not isinstance(cache_index, int):
      raise ValueError("a scanned model does not decode: sample with layer_scan.unscanned(model)")
    graphdef, state = nnx.split(self.layers)
    kinds = [config.layer_type(i) for i in range(config.num_layers)]
    layers = jnp.arange(config.num_layers, dtype=jnp.int32)  # each step's layer ids (dropout)
    new_k, new_v = [], []
    for start, period, reps in layer_scan.runs(kinds):

      def step(x, xs, start=start, period=period):
        state_p, layers_p, k_p, v_p = xs  # [period, ...] each
        k_out, v_out = [], []
        for j in range(period):
          kind = kinds[start + j]
          block = nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], state_p))
          one = None if cache is None else cache.replace(k=(k_p[j],), v=(v_p[j],))
          x, one = run(block, x, *rope[kind], key_valid, one, 0, cache_index, windows[kind],
                       lora_lib.fold(dropout_key, layers_p[j]))
          x = constrain(x)
          if one is not None:
            k_out.append(one.k[0])
            v_out.append(one.v[0])
        return x, (None if cache is None else (jnp.stack(k_out), jnp.stack(v_out)))

      xs = layer_scan.run_slices(
          (state, layers, None if cache is None else cache.k, None if cache is None else cache.v),
          start, period, reps)
      x, kv = jax.lax.scan(step, x, xs)
      if kv is not None:
        new_k.append(kv[0].reshape(-1, *kv[0].shape[2:]))
        new_v.append(kv[1].reshape(-1, *kv[1].shape[2:]))
    if cache is not None:
      join = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts)
      cache = cache.replace(k=join(new_k), v=join(new_v))
    return self.final_norm(x), cache

  def unembed(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (tied: the embedding transposed).

    Logits are h @ unembed() only without config.final_logit_softcap; `logits` and
    `token_logprobs` apply the cap.
    """
    w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    return w.astype(self.config.compute_dtype)

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """cap(h W_out) accumulated in float32: [B, T, D] -> [B, T, V]."""
    logits_btv = jnp.einsum("btd,dv->btv", h_btd, self.unembed(), preferred_element_type=jnp.float32)
    return logprobs_lib.soft_cap(logits_btv, self.config.final_logit_softcap)

  def token_logprobs(self, h_btd: jax.Array, targets_bt: jax.Array, *, temperature: float = 1.0,
                     chunk_size: int = logprobs_lib.DEFAULT_CHUNK_SIZE) -> jax.Array:
    """log softmax(logits(h) / temperature)[targets] [B, T] float32, never holding [B, T, V]
    logits (logprobs.chunked_token_logprobs with this model's output projection and cap)."""
    return logprobs_lib.chunked_token_logprobs(
        h_btd, self.unembed(), targets_bt, temperature=temperature,
        soft_cap=self.config.final_logit_softcap, chunk_size=chunk_size)

  def token_logprobs_and_entropy(self, h_btd: jax.Array, targets_bt: jax.Array, *,
                                 temperature: float = 1.0,
                                 chunk_size: int = logprobs_lib.DEFAULT_CHUNK_SIZE
                                 ) -> tuple[jax.Array, jax.Array]:
    """token_logprobs, and the entropy [B, T] float32 (under stop_gradient) of
    softmax(logits(h) / temperature) at each position, from the same logit chunks
    (logprobs.chunked_token_logprobs_and_entropy)."""
    return logprobs_lib.chunked_token_logprobs_and_entropy(
        h_btd, self.unembed(), targets_bt, temperature=temperature,
        soft_cap=self.config.final_logit_softcap, chunk_size=chunk_size)


def init(config: ModelConfig, *, seed: int = 0) -> Transformer:
  """A model with random weights: normal(0.02) matrices, unit norms, zero biases."""
  return Transformer(config, rngs=nnx.Rngs(seed))
