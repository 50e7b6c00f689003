"""models.attention: every implementation against the einsum form, values and gradients."""

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import models
from grpo_jax.errors import UserError
from grpo_jax.models import attention


def _case(seed, *, b=3, t=24, s=None, h=4, hkv=2, k=8, offset=0, left_pad=(0, 5, 40),
          right_pad=(0, 0, 3)):
  """Random q [B, T, H, K], k / v [B, Hkv, S, K] and key_valid [B, S]: row b's first
  left_pad[b] keys and last right_pad[b] keys invalid (left padding, a completion cut at EOS);
  a row padded past its queries' slots has queries that see no key."""
  s = t + offset if s is None else s
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, h, k)), jnp.float32)
  kk = jnp.asarray(rng.normal(size=(b, hkv, s, k)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, hkv, s, k)), jnp.float32)
  slots = np.arange(s)
  valid = np.stack([(slots >= left_pad[i]) & (slots < s - right_pad[i]) for i in range(b)])
  return q, kk, v, jnp.asarray(valid), offset


def _mask(valid, offset, t, window=None):
  """[B, T, S] numpy bool, built here independently of the module."""
  q_slots = offset + np.arange(t)[:, None]
  k_slots = np.arange(valid.shape[1])[None, :]
  seen = k_slots <= q_slots
  if window is not None:
    seen &= k_slots > q_slots - window
  return seen[None] & np.asarray(valid)[:, None, :]


def _reference(q, k, v, valid, offset, *, window=None, soft_cap=None):
  """Dense attention in float64 numpy; rows that see no key are zero."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  r = q.shape[2] // k.shape[1]
  k, v = np.repeat(k, r, axis=1), np.repeat(v, r, axis=1)  # [B, H, S, K]
  s = np.einsum("bthk,bhsk->bhts", q, k) / np.sqrt(q.shape[-1])
  if soft_cap is not None:
    s = np.tanh(s / soft_cap) * soft_cap
  mask = _mask(valid, offset, q.shape[1], window)[:, None]
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - np.max(np.where(mask, s, 0), axis=-1, keepdims=True)) * mask
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhts,bhsk->bthk", p, v)


def _seen(valid, offset, t, window=None):
  """[B, T, 1, 1] float: 1 where the query sees a key."""
  return jnp.asarray(_mask(valid, offset, t, window).any(-1)[:, :, None, None], jnp.float32)


def _close(actual, expected, tol):
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=0,
                             atol=tol * max(1.0, np.abs(expected).max()))


def _check_against_xla(impl, q, k, v, valid, offset, *, window=None, soft_cap=None):
  """impl's outputs and gradients (q, k, v) equal the "xla" form's on queries that see a key."""
  seen = _seen(valid, offset, q.shape[1], window)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * seen

  def run(name):
    fn = lambda q, k, v: attention.attend(q, k, v, key_valid_bs=valid, query_offset=offset,
                                          impl=name, window=window, soft_cap=soft_cap)
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    return out, vjp(cot)

  (out_x, grads_x), (out_i, grads_i) = run("xla"), run(impl)
  assert np.isfinite(np.asarray(out_i)).all()
  _close(out_i * seen, out_x * seen, 1e-5)
  for g_i, g_x in zip(grads_i, grads_x):
    _close(g_i, g_x, 2e-5)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_the_model_gives_the_same_logits_and_gradients_with_each_implementation(impl):
  """A sliding-window, soft-capped model (Gemma 2-like layers) on left-padded rows."""
  config = models.ModelConfig(
      family="gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=5,
      layer_types=("sliding_attention", "full_attention"), attn_logit_softcap=20.0,
      final_logit_softcap=30.0, query_pre_attn_scalar=8.0, tie_word_embeddings=True)
  tokens = jax.random.randint(jax.random.key(0), (2, 11), 1, 64)
  mask = jnp.asarray(np.arange(11)[None] >= np.array([[0], [4]]), jnp.int32)

  def logits_and_grad(attention_impl):
    model = models.init(dataclasses.replace(config, attention=attention_impl), seed=3)
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, mask) * mask[..., None])
    return nnx.merge(graphdef, params)(tokens, mask), jax.grad(loss)(params)

  (want, want_grad), (got, got_grad) = logits_and_grad("xla"), logits_and_grad(impl)
  valid = np.asarray(mask) == 1
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-4)
  jax.tree.map(lambda a, b: _close(a, b, 1e-4), got_grad, want_grad)


@pytest.mark.parametrize("window,soft_cap", [(None, None), (7, None), (None, 2.0), (5, 1.5)])
def test_xla_matches_a_float64_reference(window, soft_cap):
  q, k, v, valid, offset = _case(1, offset=6, h=6, hkv=3)
  got = attention.attend(q, k, v, key_valid_bs=valid, query_offset=offset, impl="xla",
                         window=window, soft_cap=soft_cap)
  seen = _seen(valid, offset, q.shape[1], window)
  _close(got * seen, _reference(q, k, v, valid, offset, window=window, soft_cap=soft_cap), 2e-6)


@pytest.mark.parametrize("seed,shape,window,soft_cap,blocks", [
    (2, dict(t=24, h=4, hkv=2), None, None, (8, 16)),              # GQA R = 2, padded rows
    (3, dict(t=37, h=6, hkv=1, offset=11), None, None, (5, 7)),    # MQA, offset, S > T
    (4, dict(t=40, h=3, hkv=3, offset=5, s=70), 9, None, (16, 8)),  # window, empty slots
    (5, dict(t=33, h=8, hkv=2, offset=20), None, 3.0, (512, 512)),  # R = 4, soft cap, 1 block
    (6, dict(t=50, h=4, hkv=2, offset=0), 12, 2.5, (7, 5)),        # window and soft cap
])
def test_blockwise_matches_xla(monkeypatch, seed, shape, window, soft_cap, blocks):
  monkeypatch.setattr(attention, "BLOCK_Q", blocks[0])
  monkeypatch.setattr(attention, "BLOCK_KV", blocks[1])
  q, k, v, valid, offset = _case(seed, **shape)
  _check_against_xla("blockwise", q, k, v, valid, offset, window=window, soft_cap=soft_cap)


def test_blockwise_takes_a_traced_offset():
  q, k, v, valid, offset = _case(7, offset=12)
  fn = jax.jit(lambda q, k, v, off: attention.attend(q, k, v, key_valid_bs=valid,
                                                     query_offset=off, impl="blockwise"))
  seen = _seen(valid, offset, q.shape[1])
  _close(fn(q, k, v, jnp.int32(offset)) * seen, _reference(q, k, v, valid, offset) * seen, 1e-5)


def test_blockwise_reads_no_key_block_a_query_cannot_see(monkeypatch):
  """Queries at slots 40..55 with a window of 20 see slots 21..55: in blocks of 8, the keys
  and values before slot 16 and after slot 55 are never loaded, so NaN there (valid keys of
  row 0 included) leaves the output finite."""
  monkeypatch.setattr(attention, "BLOCK_Q", 8)
  monkeypatch.setattr(attention, "BLOCK_KV", 8)
  q, k, v, valid, offset = _case(8, t=16, offset=40, s=96, left_pad=(8, 17, 30))
  poison = ((jnp.arange(96) < 16) | (jnp.arange(96) >= 56))[None, None, :, None]
  k, v = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
  out = attention.attend(q, k, v, key_valid_bs=valid, query_offset=offset, impl="blockwise",
                         window=20)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("seed,shape,window,soft_cap", [
    (9, dict(t=24, h=4, hkv=2), None, None),                # padded to 128, padded rows
    (10, dict(t=130, h=4, hkv=1, offset=60), None, 2.0),    # MQA, offset, 2 blocks, soft cap
    (11, dict(t=40, h=6, hkv=3, offset=100, s=200), 33, None),  # window, empty slots after
])
def test_splash_in_interpret_mode_matches_xla(seed, shape, window, soft_cap):
  q, k, v, valid, offset = _case(seed, **shape)
  _check_against_xla("splash", q, k, v, valid, offset, window=window, soft_cap=soft_cap)


@pytest.mark.parametrize("seed,shape,left_pad,right_pad,window", [
    (12, dict(t=24, h=4, hkv=2), (0, 5, 30), (0, 0, 3), None),  # a row with no valid key
    (13, dict(t=31, h=6, hkv=1), (3, 0, 9), (4, 7, 0), 6),
])
def test_cudnn_call_matches_xla(seed, shape, left_pad, right_pad, window):
  """The cudnn form's arguments (rolled rows, lengths, window), run by the same
  jax.nn.dot_product_attention call with implementation="xla" off GPU."""
  q, k, v, valid, offset = _case(seed, left_pad=left_pad, right_pad=right_pad, **shape)
  assert attention.impl_for_call("cudnn", dtype=q.dtype, num_queries=q.shape[1],
                                 num_keys=k.shape[2], head_dim=q.shape[3], query_offset=0,
                                 soft_cap=None) == "cudnn"
  _check_against_xla("cudnn", q, k, v, valid, offset, window=window)


def test_cudnn_rows_with_a_hole_in_their_keys_are_nan():
  q, k, v, valid, _ = _case(14, left_pad=(0, 3, 0), right_pad=(0, 0, 0))
  valid = valid.at[1, 10].set(False)
  out = np.asarray(attention.attend(q, k, v, key_valid_bs=valid, impl="cudnn"))
  assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("impl,offset,num_keys,soft_cap,expected", [
    ("splash", 0, 24, None, "splash"),
    ("splash", jnp.int32(0), 24, None, "blockwise"),   # traced offset
    ("cudnn", 0, 24, None, "cudnn"),
    ("cudnn", 3, 27, None, "blockwise"),               # the log-prob passes' layout
    ("cudnn", 0, 24, 2.0, "blockwise"),                # soft cap
    ("xla", jnp.int32(5), 29, 2.0, "xla"),
    ("blockwise", 3, 27, None, "blockwise"),
])
def test_impl_for_call_falls_back_to_blockwise(impl, offset, num_keys, soft_cap, expected):
  got = attention.impl_for_call(impl, dtype=jnp.float32, num_queries=24, num_keys=num_keys,
                                head_dim=8, query_offset=offset, soft_cap=soft_cap)
  assert got == expected


def test_resolve():
  assert [attention.resolve("auto", b) for b in ("cpu", "gpu", "tpu")] == ["blockwise", "cudnn",
                                                                            "splash"]
  assert attention.resolve("blockwise", "tpu") == "blockwise"
  for name, backend in (("splash", "cpu"), ("cudnn", "tpu"), ("flash", "cpu")):
    with pytest.raises(UserError, match="model.attention"):
      attention.resolve(name, backend)


@pytest.mark.parametrize("fill", [1, 5, 17, 40, 64])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (9, 2.0)])
def test_decode_attend_equals_the_full_cache_form(fill, window, soft_cap):
  """One query per row at slot fill - 1 of a 64-slot cache (the sampler's decode step), the
  slot traced inside one jitted while_loop for every fill; the slots after it hold NaN,
  which decode_attend never reads."""
  b, h, hkv, k_dim, s = 3, 4, 2, 8, 64
  rng = np.random.default_rng(fill)
  q = jnp.asarray(rng.normal(size=(b, 1, h, k_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, hkv, s, k_dim)), jnp.float32) for _ in range(2))
  valid = jnp.asarray(np.arange(s)[None] >= np.array([[0], [3], [12]]))
  full = attention.attend(q, k, v, key_valid_bs=valid, query_offset=fill - 1, impl="xla",
                          window=window, soft_cap=soft_cap)
  empty = (jnp.arange(s) >= -(-fill // 16) * 16)[None, None, :, None]
  k, v = jnp.where(empty, jnp.nan, k), jnp.where(empty, jnp.nan, v)
  decode = jax.jit(lambda q, k, v, slot: attention.decode_attend(
      q, k, v, key_valid_bs=valid, query_offset=slot, window=window, soft_cap=soft_cap,
      block_kv=16))
  got = decode(q, k, v, jnp.int32(fill - 1))
  seen = _seen(valid, fill - 1, 1, window)
  assert np.isfinite(np.asarray(got)).all()
  _close(got * seen, full * seen, 1e-5)


def test_splash_runs_per_shard_under_a_mesh():
  """Under jax.set_mesh the kernel runs in shard_map: rows over (data, fsdp), heads over
  tensor (8 fake CPU devices, a 2 x 2 x 2 mesh)."""
  from grpo_jax import mesh as mesh_lib
  q, k, v, valid, offset = _case(15, b=4, t=20, h=4, hkv=2, offset=8,
                                 left_pad=(0, 3, 25, 1), right_pad=(0, 2, 0, 0))
  mesh = mesh_lib.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v: attention.attend(q, k, v, key_valid_bs=valid,
                                                   query_offset=offset, impl="splash"))(q, k, v)
  want = attention.attend(q, k, v, key_valid_bs=valid, query_offset=offset, impl="xla")
  seen = _seen(valid, offset, q.shape[1])
  _close(got * seen, want * seen, 1e-5)


# Compiled for one H100 by the CUDA plugin (no GPU needed): the gradient of L unrolled,
# rematerialised layers of blockwise attention after a prompt (query_offset > 0, as the
# training pass runs it); prints the step's temporary bytes at L = 2 and L = 6.
_H100_LAYERS = """
import json
from grpo_jax import aot_targets
s = aot_targets.parse_topology("h100x1")
aot_targets.prepare_environment(s)
import jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding
from grpo_jax.models import attention
device = aot_targets.compile_devices(s)[0]
B, P, T, H, HKV, K, D = 4, 64, 2048, 4, 2, 128, 512

def layer(x, w, prompt_kv):
  q = (x @ w[0]).reshape(B, T, H, K)
  kv = [jnp.concatenate([prompt_kv, (x @ w[i]).reshape(B, T, HKV, K).transpose(0, 2, 1, 3)], 2)
        for i in (1, 2)]
  out = attention.attend(q, *kv, key_valid_bs=jnp.ones((B, P + T), bool), query_offset=P,
                         impl="blockwise")
  return x + out.reshape(B, T, H * K) @ w[0].T

def loss(ws, x, prompt_kv):
  for w in ws:
    x = jax.checkpoint(layer)(x, w, prompt_kv)
  return jnp.sum(jnp.square(x.astype(jnp.float32)))

def temp_bytes(num_layers):
  arg = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16,
                                            sharding=SingleDeviceSharding(device))
  ws = [[arg(D, H * K), arg(D, HKV * K), arg(D, HKV * K)] for _ in range(num_layers)]
  compiled = jax.jit(jax.grad(loss)).lower(ws, arg(B, T, D), arg(B, HKV, P, K)).compile()
  return compiled.memory_analysis().temp_size_in_bytes

print(json.dumps([temp_bytes(2), temp_bytes(6), B * T * D * 2]))
"""


@pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
                    reason="jax-cuda12-plugin is not installed (pip install -e \".[aot]\")")
def test_rematerialised_layers_keep_one_layers_attention_buffers_at_a_time():
  """XLA once placed the zero-filled buffers of every layer's query-block loops before the
  first layer (their values are constants), so the backward held them all: 51 MB more per
  layer here (float32 dq and the output blocks) where only the layer's input, 8 MB, should
  stay. Compiled for an H100, where it cost the 1.5B long-CoT step 15 GiB."""
  repo = pathlib.Path(__file__).resolve().parent.parent
  out = subprocess.run([sys.executable, "-c", _H100_LAYERS], cwd=repo, capture_output=True,
                       text=True, check=True)
  two, six, layer_input = json.loads(out.stdout.strip().splitlines()[-1])
  assert (six - two) / 4 < 1.5 * layer_input, (two, six, layer_input)
