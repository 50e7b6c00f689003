"""Causal attention over padded rows and a KV cache: one mask, four implementations.

The mask is described, never passed in: query t of T sits at slot query_offset + t, and it
sees key slot s of S iff s <= its slot, key_valid[b, s], and (with a sliding window W)
s > its slot - W. That covers every layout the model uses: a full forward or prefill
(query_offset 0, S = T), the log-prob passes (completion queries at slots T.. over a
prompt's copied keys, query_offset = T, S > T) and decoding (one query per row at a traced
slot of a cache of S slots). Scores are q k^T * scale in float32, then s -> tanh(s / cap) *
cap with a soft cap (Gemma 2), then the mask and a float32 softmax. A query that sees no key
(a left-padding position) gets a finite output that nothing may rely on: its row of the
"xla" form is the mean of all S values, of the others zero or a mean over what they visited.

Implementations (`attend(..., impl=)`):
  "xla"        the einsum form: [B, H, T, S] float32 scores; every option, any offset.
  "blockwise"  flash attention in pure JAX, every backend: query blocks, an online softmax
               over the key blocks that a block can see (the causal bound and the window
               skip the rest), and a hand-written backward (the flash one: saves the output
               and the log-sum-exp, recomputes scores per block), so that memory is linear
               in T forward and backward. Every option, any offset (traced too).
  "splash"     the Pallas TPU splash kernel: a static CausalMask / LocalMask with the
               offset, key padding as segment ids (valid keys 1, queries 1, invalid keys 0),
               the soft cap inside the kernel, GQA by the kernel's grouped heads. T and S are
               padded to multiples of 128. Under a mesh set by jax.set_mesh it runs in
               shard_map (rows over the batch axes, heads over tensor), as XLA does not
               partition a Pallas kernel. Off TPU it runs in Pallas interpret mode (tests).
  "cudnn"      `jax.nn.dot_product_attention(implementation="cudnn")` (GPU; elsewhere the
               same call with implementation="xla", which is how it is tested). cuDNN
               takes causal masks from slot 0 and right padding only, so each row is rolled
               to put its first valid key at slot 0 and its valid keys (one contiguous run:
               left padding, then a completion cut at EOS) become a sequence length.
               Rows whose valid keys have a hole come out NaN rather than wrong.

Fallback (`impl_for_call`): "splash" needs a static query_offset; "cudnn" needs
query_offset == 0, T == S and no soft cap, and on a GPU bf16/fp16 inputs and a head dim
that is a multiple of 8 up to 128 (256 from Hopper). A call that does not fit runs
"blockwise", which fits every call.

`resolve` turns model.attention into an implementation for a backend: "auto" is "splash"
on TPU (fused, block-sparse, the kernel MaxText trains with), "cudnn" on GPU (cuDNN's fused
kernel where a call fits, "blockwise" where not), and "blockwise" on CPU and elsewhere: on
CPU it is no slower than "xla" at the demo's shapes and faster at long ones (BENCHMARKS.md),
with memory linear in T. "xla" stays bit for bit the attention the model had before.

`decode_attend` is the decode step's attention: the blockwise forward over only the key
blocks up to the last query's slot, so its cost follows the filled length of the cache,
not the allocated one; a traced slot keeps one compile for every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from grpo_jax import config as config_lib
from grpo_jax import mesh as mesh_lib
from grpo_jax.errors import UserError

IMPLEMENTATIONS = config_lib.ATTENTION
_AUTO = {"tpu": "splash", "gpu": "cudnn", "cpu": "blockwise"}
_MASKED = -1e30  # the "xla" form's score of a masked key: a row with every key masked stays finite
_SPLASH_ALIGN = 128  # splash blocks are multiples of 128 slots
_SPLASH_BLOCKS = (512, 256, 128)
BLOCK_Q = 512  # "blockwise" query and key block sizes (capped at T and S)
BLOCK_KV = 512
DECODE_BLOCK_KV = 128  # decode_attend's key block: the finest step its cost follows


def resolve(name: str, backend: str) -> str:
  """The implementation that model.attention=name runs on backend ("cpu", "gpu", "tpu")."""
  if name not in IMPLEMENTATIONS:
    raise UserError(f"model.attention={name!r} is not allowed; allowed: "
                    f"{', '.join(IMPLEMENTATIONS)}")
  if name == "auto":
    return _AUTO.get(backend, "blockwise")
  needs = {"splash": "tpu", "cudnn": "gpu"}.get(name)
  if needs is not None and backend != needs:
    raise UserError(f"model.attention={name!r} needs a {needs.upper()} but this backend is "
                    f"{backend}; use auto, xla or blockwise")
  return name


def impl_for_call(impl: str, *, dtype: jnp.dtype, num_queries: int, num_keys: int,
                  head_dim: int, query_offset: jax.Array | int,
                  soft_cap: float | None) -> str:
  """The implementation attend runs for impl and one call's shapes: impl where it fits,
  else "blockwise" (module docstring)."""
  static_offset = isinstance(query_offset, numbers.Integral)
  if impl == "splash" and not static_offset:
    return "blockwise"
  if impl == "cudnn":
    fits = static_offset and query_offset == 0 and num_queries == num_keys and soft_cap is None
    if jax.default_backend() == "gpu":
      max_dim = 256 if float(jax.devices()[0].compute_capability) >= 9.0 else 128
      fits &= (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
               and head_dim <= max_dim)
    return "cudnn" if fits else "blockwise"
  return impl


def attend(q_bthk: jax.Array, k_bhsk: jax.Array, v_bhsk: jax.Array, *, key_valid_bs: jax.Array,
           query_offset: jax.Array | int = 0, impl: str = "xla", scale: float | None = None,
           window: int | None = None, soft_cap: float | None = None) -> jax.Array:
  """Causal grouped-query attention [B, T, H, K] of queries over S key/value slots.

  q_bthk [B, T, H, K]; k_bhsk, v_bhsk [B, Hkv, S, K] (the cache's layout), query head h
  reading kv head h // (H / Hkv); key_valid_bs [B, S] bool. query_offset: the slot of query
  0 (an int, or a traced int32 scalar for "xla" / "blockwise"; the others then fall back).
  impl: "xla" | "blockwise" | "splash" | "cudnn" (see resolve for "auto"). scale: default
  K^-0.5. window: W, each query sees its slot and the W - 1 before it. soft_cap: Gemma 2's.
  """
  t, k_dim = q_bthk.shape[1], q_bthk.shape[3]
  scale = k_dim**-0.5 if scale is None else scale
  impl = impl_for_call(impl, dtype=q_bthk.dtype, num_queries=t, num_keys=k_bhsk.shape[2],
                       head_dim=k_dim, query_offset=query_offset, soft_cap=soft_cap)
  if impl == "xla":
    return _xla(q_bthk, k_bhsk, v_bhsk, key_valid_bs, query_offset, scale, window, soft_cap)
  if impl == "splash":
    splash_rows = functools.partial(_splash, query_offset=query_offset, scale=scale,
                                    window=window, soft_cap=soft_cap)
    return _on_shards(splash_rows, q_bthk, k_bhsk, v_bhsk, key_valid_bs)
  if impl == "cudnn":
    return _cudnn(q_bthk, k_bhsk, v_bhsk, key_valid_bs, scale, window)
  if impl != "blockwise":
    raise ValueError(f"attention implementation {impl!r} is not one of {IMPLEMENTATIONS[1:]}")
  opts = _Options(scale, window, soft_cap, BLOCK_Q, BLOCK_KV)
  out = _blockwise(_grouped(q_bthk, k_bhsk.shape[1]), k_bhsk, v_bhsk, key_valid_bs,
                   jnp.asarray(query_offset, jnp.int32), opts)
  return _ungrouped(out)


def decode_attend(q_bthk: jax.Array, k_bhsk: jax.Array, v_bhsk: jax.Array, *,
                  key_valid_bs: jax.Array, query_offset: jax.Array | int,
                  scale: float | None = None, window: int | None = None,
                  soft_cap: float | None = None, block_kv: int = DECODE_BLOCK_KV) -> jax.Array:
  """attend for decoding (no gradient): reads only the key blocks of block_kv slots from the
  first a query can see up to the last query's slot query_offset + T - 1 (the filled length),
  in a loop whose trip count is traced, so one compile serves every step."""
  k_dim = q_bthk.shape[-1]
  opts = _Options(k_dim**-0.5 if scale is None else scale, window, soft_cap, q_bthk.shape[1],
                  block_kv)
  out, _ = _flash_forward(_grouped(q_bthk, k_bhsk.shape[1]), k_bhsk, v_bhsk, key_valid_bs,
                          jnp.asarray(query_offset, jnp.int32), opts)
  return _ungrouped(out)


def _grouped(q_bthk: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, T, H, K] -> [B, Hkv, R, T, K]: the R query heads of each kv head together."""
  b, t, h, k_dim = q_bthk.shape
  return q_bthk.reshape(b, t, num_kv_heads, h // num_kv_heads, k_dim).transpose(0, 2, 3, 1, 4)


def _ungrouped(o_bhrtk: jax.Array) -> jax.Array:
  """[B, Hkv, R, T, K] -> [B, T, H, K]."""
  b, hkv, r, t, k_dim = o_bhrtk.shape
  return o_bhrtk.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * r, k_dim)


def _first_valid(key_valid_bs: jax.Array) -> jax.Array:
  """[B] int32: each row's first valid slot, S where it has none."""
  slots = jnp.arange(key_valid_bs.shape[1], dtype=jnp.int32)
  return jnp.min(jnp.where(key_valid_bs, slots, key_valid_bs.shape[1]), axis=1)


def _visible(query_slots: jax.Array, key_slots: jax.Array, key_valid_bs: jax.Array,
             window: int | None) -> jax.Array:
  """[B, T, S] bool: which key slots each query slot sees (causal, window, valid keys)."""
  seen = key_slots[None, None, :] <= query_slots[None, :, None]
  if window is not None:
    seen &= key_slots[None, None, :] > query_slots[None, :, None] - window
  return seen & key_valid_bs[:, None, :]


def _scores(q_bhrtk: jax.Array, k_bhsk: jax.Array, scale: float,
            soft_cap: float | None) -> jax.Array:
  """q k^T * scale, soft-capped: [B, Hkv, R, T, S] float32."""
  s = jnp.einsum("bhrtk,bhsk->bhrts", q_bhrtk, k_bhsk, preferred_element_type=jnp.float32)
  s = s * scale
  return s if soft_cap is None else jnp.tanh(s / soft_cap) * soft_cap


def _xla(q_bthk, k_bhsk, v_bhsk, key_valid_bs, query_offset, scale, window, soft_cap):
  """The einsum form: softmax over all S slots of the [B, Hkv, R, T, S] masked scores."""
  t, s = q_bthk.shape[1], k_bhsk.shape[2]
  scores = _scores(_grouped(q_bthk, k_bhsk.shape[1]), k_bhsk, scale, soft_cap)
  mask = _visible(query_offset + jnp.arange(t, dtype=jnp.int32), jnp.arange(s, dtype=jnp.int32),
                  key_valid_bs, window)
  scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bhsk.dtype)
  return _ungrouped(jnp.einsum("bhrts,bhsk->bhrtk", probs, v_bhsk))


# ---------------------------------------------------------------------------------------------
# blockwise: flash attention in pure JAX

@dataclasses.dataclass(frozen=True)
class _Options:
  """The static settings of one blockwise call."""
  scale: float
  window: int | None
  soft_cap: float | None
  block_q: int
  block_kv: int


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """x padded with value at the end of axis to size."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
  """x's axis split into blocks, block index first: [.., n*block, ..] -> [n, .., block, ..]."""
  shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x: jax.Array, axis: int) -> jax.Array:
  """The inverse of _blocks."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


class _Layout:
  """Block sizes and the key blocks of each query block of one call. The queries are padded
  to whole blocks; the keys never are (that would copy a decode step's whole cache): the last
  key block starts at S - bk and masks the slots of the block before it."""

  def __init__(self, k_bhsk, v_bhsk, key_valid_bs, query_offset, num_queries, opts: _Options):
    self.s, self.t, self.opts = k_bhsk.shape[2], num_queries, opts
    self.bq, self.bk = min(opts.block_q, num_queries), min(opts.block_kv, self.s)
    self.nq, self.nk = -(-num_queries // self.bq), -(-self.s // self.bk)
    self.k, self.v, self.valid, self.offset = k_bhsk, v_bhsk, key_valid_bs, query_offset

  def pad_queries(self, x: jax.Array, axis: int, value=0) -> jax.Array:
    return _pad_axis(x, axis, self.nq * self.bq, value)

  def key_blocks(self, i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the key blocks query block i sees (causal and window; padded queries none)."""
    first = self.offset + i * self.bq
    last = self.offset + jnp.minimum(i * self.bq + self.bq, self.t) - 1
    hi = jnp.minimum(last // self.bk, self.nk - 1) + 1
    if self.opts.window is None:
      return jnp.int32(0), hi
    return jnp.maximum((first - self.opts.window + 1) // self.bk, 0), hi

  def over_key_blocks(self, i: jax.Array, body, init):
    """fori_loop of body over the key blocks query block i sees; with one key block just
    body(0, init) (its mask has the same effect), no loop and no slicing."""
    if self.nk == 1:
      return body(0, init)
    return jax.lax.fori_loop(*self.key_blocks(i), body, init)

  def key_block(self, j: jax.Array):
    """Key block j: (its first slot, k, v [B, Hkv, bk, K], key_valid [B, bk] with the slots
    of block j - 1 masked, its slots [bk])."""
    start = jnp.minimum(j * self.bk, self.s - self.bk)
    slots = start + jnp.arange(self.bk, dtype=jnp.int32)
    k = jax.lax.dynamic_slice_in_dim(self.k, start, self.bk, axis=2)
    v = jax.lax.dynamic_slice_in_dim(self.v, start, self.bk, axis=2)
    valid = jax.lax.dynamic_slice_in_dim(self.valid, start, self.bk, axis=1)
    return start, k, v, valid & (slots >= j * self.bk)[None], slots

  def block_mask(self, i: jax.Array, key_slots: jax.Array, valid_bs: jax.Array) -> jax.Array:
    """[B, 1, 1, bq, bk] bool: what query block i sees of a key block."""
    query_slots = self.offset + i * self.bq + jnp.arange(self.bq, dtype=jnp.int32)
    return _visible(query_slots, key_slots, valid_bs, self.opts.window)[:, None, None]


def _scan_blocks(f, carry, xs, n: int):
  """lax.scan(f, carry, xs) over n blocks; with one block a plain call of f.

  The loop's zero-filled outputs [n, ...] and carry pass an optimization barrier with xs, so
  XLA makes them only once xs exist. Without it, XLA placed the zero-filled buffers of every
  layer's loops before the first layer ran (their values are constants): in a rematerialised
  backward over unrolled layers they were all live at once (one H100, 1.5B, 8,192 new tokens:
  27 float32 dq buffers and 26 output buffers, 15 GiB of the step's 64)."""
  if n == 1:
    carry, ys = f(carry, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda y: y[None], ys)
  x0 = jax.tree.map(lambda x: x[0], xs)
  y_shapes = jax.eval_shape(lambda c, x: f(c, x)[1], carry, x0)
  ys = jax.tree.map(lambda y: jnp.zeros((n, *y.shape), y.dtype), y_shapes)
  carry, ys, xs = jax.lax.optimization_barrier((carry, ys, xs))

  def body(i, state):
    carry, ys = state
    carry, y = f(carry, jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False), xs))
    return carry, jax.tree.map(lambda b, y: jax.lax.dynamic_update_index_in_dim(b, y, i, 0), ys, y)

  return jax.lax.fori_loop(0, n, body, (carry, ys))


def _flash_forward(q_bhrtk, k_bhsk, v_bhsk, key_valid_bs, query_offset, opts: _Options):
  """(output [B, Hkv, R, T, K] in q's dtype, log-sum-exp [B, Hkv, R, T] float32; +inf where a
  query sees no key) by an online softmax over the key blocks each query block sees."""
  lay = _Layout(k_bhsk, v_bhsk, key_valid_bs, query_offset, q_bhrtk.shape[3], opts)
  q_blocks = _blocks(lay.pad_queries(q_bhrtk, 3), 3, lay.bq)  # [nq, B, Hkv, R, bq, K]

  def query_block(_, args):
    i, q = args

    def key_step(j, carry):
      m, l, acc = carry
      _, k, v, valid, key_slots = lay.key_block(j)
      s = jnp.where(lay.block_mask(i, key_slots, valid), _scores(q, k, opts.scale, opts.soft_cap),
                    -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet: exp(-inf) = 0
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      pv = jnp.einsum("bhrts,bhsk->bhrtk", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
      return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

    rows = q.shape[:-1]
    init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = lay.over_key_blocks(i, key_step, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    return None, (out.astype(q.dtype), lse)

  _, (out, lse) = _scan_blocks(query_block, None, (jnp.arange(lay.nq, dtype=jnp.int32), q_blocks),
                               lay.nq)
  return _unblocks(out, 3)[:, :, :, :lay.t], _unblocks(lse, 3)[..., :lay.t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q_bhrtk, k_bhsk, v_bhsk, key_valid_bs, query_offset, opts: _Options):
  """Blockwise attention [B, Hkv, R, T, K] with the flash backward."""
  return _flash_forward(q_bhrtk, k_bhsk, v_bhsk, key_valid_bs, query_offset, opts)[0]


def _blockwise_fwd(q_bhrtk, k_bhsk, v_bhsk, key_valid_bs, query_offset, opts):
  out, lse = _flash_forward(q_bhrtk, k_bhsk, v_bhsk, key_valid_bs, query_offset, opts)
  return out, (q_bhrtk, k_bhsk, v_bhsk, key_valid_bs, query_offset, out, lse)


def _blockwise_bwd(opts: _Options, residuals, dout_bhrtk):
  """dq, dk, dv from the saved output and log-sum-exp, the scores recomputed per block:
  p = exp(s - lse), dv = p^T do, ds = p (do v^T - rowsum(do o)), dq = ds k, dk = ds^T q
  (ds times the soft cap's derivative and the scale first)."""
  q_bhrtk, k_bhsk, v_bhsk, key_valid_bs, query_offset, out, lse = residuals
  lay = _Layout(k_bhsk, v_bhsk, key_valid_bs, query_offset, q_bhrtk.shape[3], opts)
  d_bhrt = jnp.sum(dout_bhrtk.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  xs = (jnp.arange(lay.nq, dtype=jnp.int32),
        _blocks(lay.pad_queries(q_bhrtk, 3), 3, lay.bq),
        _blocks(lay.pad_queries(dout_bhrtk, 3), 3, lay.bq),
        _blocks(lay.pad_queries(lse, 3, jnp.inf), 3, lay.bq),
        _blocks(lay.pad_queries(d_bhrt, 3), 3, lay.bq))

  def query_block(dkv, args):
    i, q, do, lse_i, d_i = args

    def key_step(j, carry):
      dq, dk, dv = carry
      start, k, v, valid, key_slots = lay.key_block(j)
      s = _scores(q, k, opts.scale, opts.soft_cap)
      p = jnp.where(lay.block_mask(i, key_slots, valid), jnp.exp(s - lse_i[..., None]), 0.0)
      dp = jnp.einsum("bhrtk,bhsk->bhrts", do, v, preferred_element_type=jnp.float32)
      ds = p * (dp - d_i[..., None])
      if opts.soft_cap is not None:
        ds = ds * (1.0 - jnp.square(s / opts.soft_cap))
      ds = ds * opts.scale
      dq = dq + jnp.einsum("bhrts,bhsk->bhrtk", ds.astype(k.dtype), k,
                           preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("bhrts,bhrtk->bhsk", ds.astype(q.dtype), q,
                        preferred_element_type=jnp.float32)
      dv_j = jnp.einsum("bhrts,bhrtk->bhsk", p.astype(do.dtype), do,
                        preferred_element_type=jnp.float32)
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
          acc, jax.lax.dynamic_slice_in_dim(acc, start, lay.bk, axis=2) + x, start, axis=2)
      return dq, add(dk, dk_j), add(dv, dv_j)

    dq, dk, dv = lay.over_key_blocks(i, key_step, (jnp.zeros(q.shape, jnp.float32), *dkv))
    return (dk, dv), dq

  zeros = jnp.zeros(k_bhsk.shape, jnp.float32)
  (dk, dv), dq = _scan_blocks(query_block, (zeros, zeros), xs, lay.nq)
  return (_unblocks(dq, 3)[:, :, :, :lay.t].astype(q_bhrtk.dtype), dk.astype(k_bhsk.dtype),
          dv.astype(v_bhsk.dtype), None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---------------------------------------------------------------------------------------------
# splash (Pallas, TPU) and cuDNN (GPU)

def _splash_block(length: int) -> int:
  return next(b for b in _SPLASH_BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, num_queries: int, num_keys: int, query_offset: int,
                   window: int | None, soft_cap: float | None, interpret: bool):
  """The splash kernel for one shape (its block-sparsity tables are built here, once)."""
  shape = (num_queries, num_keys)
  if window is None:
    mask = splash_mask.CausalMask(shape, offset=query_offset)
  else:
    mask = splash_mask.LocalMask(shape, window_size=(window - 1, 0), offset=query_offset)
  bq, bk = _splash_block(num_queries), _splash_block(num_keys)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                             block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                             block_kv_dq=bk)
  return splash.make_splash_mha(splash_mask.MultiHeadMask([mask] * num_heads),
                                block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                attn_logits_soft_cap=soft_cap, interpret=interpret)


def _on_shards(fn, q_bthk, k_bhsk, v_bhsk, key_valid_bs):
  """fn(q, k, v, key_valid) on each device's rows and heads under the mesh set by
  jax.set_mesh (XLA does not partition a Pallas kernel): rows over the batch axes and heads
  over the tensor axis, each where it divides them; with no mesh, fn itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q_bthk, k_bhsk, v_bhsk, key_valid_bs)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  rows = tuple(a for a in mesh_lib.BATCH_AXES if sizes.get(a, 1) > 1)
  if q_bthk.shape[0] % math.prod(sizes[a] for a in rows):
    rows = ()
  heads = mesh_lib.LOGICAL_RULES["heads"]
  if sizes.get(heads, 1) == 1 or k_bhsk.shape[1] % sizes[heads]:
    heads = None
  rows = rows or None
  q_spec, kv_spec = P(rows, None, heads, None), P(rows, heads, None, None)
  return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, P(rows, None)), out_specs=q_spec,
                       check_vma=False)(q_bthk, k_bhsk, v_bhsk, key_valid_bs)


def _splash(q_bthk, k_bhsk, v_bhsk, key_valid_bs, *, query_offset: int, scale, window,
            soft_cap):
  """The splash kernel per row: queries and keys padded to multiples of 128, key padding as
  segment ids (queries 1, valid keys 1, invalid and padded keys 0)."""
  b, t, h, _ = q_bthk.shape
  s = k_bhsk.shape[2]
  tp, sp = -(-t // _SPLASH_ALIGN) * _SPLASH_ALIGN, -(-s // _SPLASH_ALIGN) * _SPLASH_ALIGN
  q_bhtk = _pad_axis((q_bthk * scale).astype(q_bthk.dtype).transpose(0, 2, 1, 3), 2, tp)
  k_bhsk, v_bhsk = _pad_axis(k_bhsk, 2, sp), _pad_axis(v_bhsk, 2, sp)
  segments = splash.SegmentIds(q=jnp.ones((b, tp), jnp.int32),
                               kv=_pad_axis(key_valid_bs.astype(jnp.int32), 1, sp))
  kernel = _splash_kernel(h, tp, sp, int(query_offset), window, soft_cap,
                          jax.default_backend() != "tpu")
  out_bhtk = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(
      q_bhtk, k_bhsk, v_bhsk, segments)
  return out_bhtk[:, :, :t].transpose(0, 2, 1, 3)


def _roll_rows(x: jax.Array, shift_b: jax.Array) -> jax.Array:
  """Row b of x [B, L, ...] rolled by shift_b[b] along L (slot l moves to l + shift)."""
  return jax.vmap(lambda xb, sb: jnp.roll(xb, sb, axis=0))(x, shift_b)


def _cudnn(q_bthk, k_bhsk, v_bhsk, key_valid_bs, scale, window):
  """jax.nn.dot_product_attention on rows rolled so that their valid keys start at slot 0:
  then the causal mask is cuDNN's and the padding its sequence lengths (query_offset 0,
  T = S). Rows whose valid keys are not one run come out NaN."""
  t = q_bthk.shape[1]
  count_b = key_valid_bs.sum(axis=1, dtype=jnp.int32)
  first_b = jnp.where(count_b > 0, _first_valid(key_valid_bs), 0)
  last_b = t - 1 - _first_valid(key_valid_bs[:, ::-1])
  one_run_b = (count_b == 0) | (count_b == last_b - first_b + 1)
  to_bshk = lambda x: _roll_rows(x.transpose(0, 2, 1, 3), -first_b)
  out_bthk = jax.nn.dot_product_attention(
      _roll_rows(q_bthk, -first_b), to_bshk(k_bhsk), to_bshk(v_bhsk), scale=scale,
      is_causal=True, query_seq_lengths=t - first_b, key_value_seq_lengths=count_b,
      local_window_size=None if window is None else (window - 1, 0),
      implementation="cudnn" if jax.default_backend() == "gpu" else "xla")
  out_bthk = _roll_rows(out_bthk, first_b)
  return jnp.where(one_run_b[:, None, None, None], out_bthk, jnp.nan).astype(q_bthk.dtype)
