"""ModelConfig: the architecture of one decoder-only model (hf_config.py reads and writes it as
HF config.json)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from grpo_jax.config import ATTENTION, DTYPES
from grpo_jax.errors import UserError

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")
GEMMA_FAMILIES = ("gemma2", "gemma3_text")
QK_NORM_FAMILIES = ("qwen3", "gemma3_text")
ATTENTION_IMPLS = ATTENTION[1:]  # what models/attention.resolve turns "auto" into
FULL, SLIDING = "full_attention", "sliding_attention"  # layer types, as HF names them
ROPE_SCALING_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
}
DEFAULT_ROPE_THETA = 10000.0
# LoRA targets by their PEFT names (target_modules), and the base storage LoRA allows.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZED = ("int8", "nf4")
BASE_DTYPES = DTYPES + QUANTIZED


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """Low-rank adapters on some projections: W x + (alpha / rank) B A x, as PEFT's LoRA.

  The base weights are frozen and stored in base_dtype: a float dtype, or "int8" / "nf4"
  for the targeted projections (QLoRA; see quantize.py), the other base weights then in the
  compute dtype. dropout applies to the adapters' input in the training forward only.
  """

  rank: int  # r
  alpha: float
  targets: tuple[str, ...] = LORA_TARGETS  # PEFT names
  dropout: float = 0.0
  base_dtype: str = "float32"

  def __post_init__(self):
    if self.rank < 1:
      raise UserError(f"LoRA rank {self.rank} must be at least 1")
    if not self.targets or set(self.targets) - set(LORA_TARGETS):
      raise UserError(f"LoRA targets {', '.join(self.targets) or '(none)'} are not allowed; "
                      f"choose among {', '.join(LORA_TARGETS)}")
    if not 0 <= self.dropout < 1:
      raise UserError(f"LoRA dropout {self.dropout} must be in [0, 1)")
    if self.base_dtype not in BASE_DTYPES:
      raise UserError(f"LoRA base dtype {self.base_dtype!r} is not allowed; allowed: "
                      f"{', '.join(BASE_DTYPES)}")

  @property
  def scale(self) -> float:
    """alpha / rank, the factor on B A x."""
    return self.alpha / self.rank

  @property
  def quantized(self) -> bool:
    return self.base_dtype in QUANTIZED


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable description of a Llama / Qwen2 / Qwen3 / Mistral / Gemma 2 / Gemma 3 decoder.

  rope_scaling is None or the sorted items of a "llama3" or "linear" scaling dict (including
  ("rope_type", ...)). attention_bias is the q/k/v bias; o_proj carries a bias too when it is
  set (as in transformers), except for qwen2.

  Sliding-window attention: a layer whose layer_types entry is "sliding_attention" lets the
  query in cache slot i see the key slots j with i - sliding_window < j <= i (transformers'
  window); layer_types () means every layer attends to all earlier slots.

  The Gemma families also scale the embedding by sqrt(D), multiply each RMSNorm by
  (1 + weight), use GeGLU (tanh gelu) and normalise the attention and MLP outputs too; those
  follow from the family, the fields below them are read from config.json.
  """

  family: str
  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # H
  num_kv_heads: int
  head_dim: int  # K
  rope_theta: float = DEFAULT_ROPE_THETA
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # Sliding-window attention (Mistral, Gemma, Qwen2 / Qwen3 with use_sliding_window).
  sliding_window: int | None = None  # W slots, the query's own included
  layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; () = all FULL
  # Gemma only.
  query_pre_attn_scalar: float | None = None  # scores are scaled by its -1/2 power, not K's
  attn_logit_softcap: float | None = None  # attention scores s -> cap * tanh(s / cap) (Gemma 2)
  final_logit_softcap: float | None = None  # output logits l -> cap * tanh(l / cap)
  rope_local_theta: float | None = None  # rope base of the sliding layers, unscaled (Gemma 3)
  dtype: str = "float32"
  param_dtype: str = "float32"  # of the trained parameters: all of them, or the LoRA adapters
  remat: bool = False
  scan_layers: bool = False  # blocks stacked and run by lax.scan (layer_scan.py)
  attention: str = "xla"  # the implementation (attention.py): xla | blockwise | splash | cudnn
  lora: LoRASpec | None = None  # None: every weight is trained

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise UserError(f"model family {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise UserError(f"model {name} {getattr(self, name)!r} is not allowed; allowed: {', '.join(DTYPES)}")
    if self.attention not in ATTENTION_IMPLS:
      raise UserError(f"model attention {self.attention!r} is not allowed; allowed: "
                      f"{', '.join(ATTENTION_IMPLS)}")
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise UserError(f"head_dim {self.head_dim} must be even for rotary embeddings")
    if self.family == "qwen2" and not self.attention_bias:
      raise UserError("qwen2 models always have q/k/v bias; attention_bias must be True")
    if self.qk_norm != (self.family in QK_NORM_FAMILIES):
      raise UserError(f"qk_norm={self.qk_norm} does not match family {self.family!r}; "
                      f"only {', '.join(QK_NORM_FAMILIES)} have q/k norm")
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      keys = ROPE_SCALING_KEYS.get(scaling.get("rope_type"))
      if keys is None or set(scaling) != {"rope_type", *keys}:
        raise UserError(f"rope_scaling {scaling} is not one of: "
                        + "; ".join(f"{t} with {', '.join(k)}" for t, k in ROPE_SCALING_KEYS.items()))
    self._check_sliding_window()
    self._check_gemma_fields()

  def _check_sliding_window(self):
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise UserError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
    if set(self.layer_types) - {FULL, SLIDING}:
      raise UserError(f"layer_types {self.layer_types} may only hold {FULL!r} and {SLIDING!r}")
    if SLIDING in self.layer_types and not (self.sliding_window or 0) > 0:
      raise UserError(f"sliding layers need a sliding_window >= 1, not {self.sliding_window}")
    if self.family == "mistral" and len(set(self.layer_types)) > 1:
      raise UserError("mistral layers are all sliding or all full; per-layer types are not supported")

  def _check_gemma_fields(self):
    gemma_only = ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta")
    if self.family not in GEMMA_FAMILIES:
      set_here = [name for name in gemma_only if getattr(self, name) is not None]
      if set_here:
        raise UserError(f"{', '.join(set_here)} are Gemma settings; family {self.family!r} has none")
    if self.family == "gemma2" and self.rope_local_theta is not None:
      raise UserError("gemma2 uses one rope base for all layers; rope_local_theta must be None")
    if self.family == "gemma3_text" and self.attn_logit_softcap is not None:
      raise UserError("gemma3_text attention has no logit soft cap; attn_logit_softcap must be None")
    for name in gemma_only:
      if (getattr(self, name) or 1) <= 0:
        raise UserError(f"{name} must be positive, not {getattr(self, name)}")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def base_param_dtype(self) -> jnp.dtype:
    """The dtype of the parameters that are not LoRA adapters: param_dtype without LoRA; with
    LoRA the float base_dtype, or the compute dtype beside a quantized base."""
    if self.lora is None:
      return jnp.dtype(self.param_dtype)
    return jnp.dtype(self.dtype if self.lora.quantized else self.lora.base_dtype)

  def lora_target(self, name: str) -> bool:
    """Whether the projection of PEFT name `name` ("q_proj", ...) carries an adapter."""
    return self.lora is not None and name in self.lora.targets

  @property
  def out_bias(self) -> bool:
    """Whether o_proj has a bias (attention_bias, except qwen2)."""
    return self.attention_bias and self.family != "qwen2"

  @property
  def is_gemma(self) -> bool:
    """Scaled embedding, (1 + w) norms, GeGLU and post-attention / post-MLP norms."""
    return self.family in GEMMA_FAMILIES

  @property
  def attention_scale(self) -> float:
    """The factor on q.k: query_pre_attn_scalar^-1/2, else K^-1/2."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def layer_type(self, layer: int) -> str:
    """FULL or SLIDING: how layer `layer` attends."""
    return self.layer_types[layer] if self.layer_types else FULL

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str | None = None,
              remat: bool = False, scan_layers: bool = False, attention: str = "xla",
              lora: LoRASpec | None = None) -> ModelConfig:
    """Reads a HF config.json dict (hf_config.py says which layouts and fields)."""
    from grpo_jax.models import hf_config  # pylint: disable=g-import-not-at-top
    return cls(**hf_config.read(hf), dtype=dtype, param_dtype=param_dtype or dtype, remat=remat,
               scan_layers=scan_layers, attention=attention, lora=lora)

  def to_hf(self) -> dict[str, Any]:
    """The config.json dict in the layout transformers 5 writes (rope_parameters, layer_types)."""
    from grpo_jax.models import hf_config  # pylint: disable=g-import-not-at-top
    return hf_config.write(self)
