"""ModelConfig: the architecture of one decoder-only model, read from and written to HF config.json."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from grpo_jax.errors import UserError

FAMILIES = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DEFAULT_ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable description of a Llama / Qwen2 / Qwen3 decoder.

  rope_scaling is None or the sorted items of a "llama3" scaling dict (including
  ("rope_type", "llama3")). attention_bias is the q/k/v bias; o_proj carries a bias too
  for llama and qwen3 when it is set (as in transformers), never for qwen2.
  """

  family: str
  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # H
  num_kv_heads: int
  head_dim: int  # K
  rope_theta: float = _DEFAULT_ROPE_THETA
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise UserError(f"model family {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise UserError(f"model {name} {getattr(self, name)!r} is not allowed; allowed: {', '.join(DTYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise UserError(f"head_dim {self.head_dim} must be even for rotary embeddings")
    if self.family == "qwen2" and not self.attention_bias:
      raise UserError("qwen2 models always have q/k/v bias; attention_bias must be True")
    if self.qk_norm != (self.family == "qwen3"):
      raise UserError(f"qk_norm={self.qk_norm} does not match family {self.family!r}; only qwen3 has q/k norm")
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      missing = [k for k in _LLAMA3_KEYS if k not in scaling]
      if scaling.get("rope_type") != "llama3" or missing:
        raise UserError(f"rope_scaling {scaling} is not a llama3 scaling with keys {', '.join(_LLAMA3_KEYS)}")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def out_bias(self) -> bool:
    """Whether o_proj has a bias (llama / qwen3 with attention_bias)."""
    return self.attention_bias and self.family != "qwen2"

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str | None = None,
              remat: bool = False) -> ModelConfig:
    """Reads a HF config.json dict, in the rope_theta/rope_scaling or rope_parameters layout."""
    family = hf.get("model_type")
    if family not in FAMILIES:
      raise UserError(f"model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    if hf.get("hidden_act", "silu") != "silu":
      raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu'")
    if hf.get("mlp_bias", False):
      raise UserError("mlp_bias=true is not supported; only bias-free MLPs")
    if hf.get("use_sliding_window", False):
      raise UserError("use_sliding_window=true is not supported; only full attention")
    num_heads = hf["num_attention_heads"]
    rope_theta, rope_scaling = _read_rope(hf)
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return cls(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=True if family == "qwen2" else hf.get("attention_bias", False),
        qk_norm=family == "qwen3",
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        remat=remat,
    )

  def to_hf(self) -> dict[str, Any]:
    """The config.json dict in the layout transformers 5 writes (rope_parameters)."""
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling is not None:
      rope.update(dict(self.rope_scaling))
    hf = {
        "architectures": [_ARCHITECTURES[self.family]],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_parameters": rope,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        "pad_token_id": self.pad_token_id,
        "dtype": self.param_dtype,
    }
    if self.family != "qwen2":
      hf["attention_bias"] = self.attention_bias
    return hf


def _read_rope(hf: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
  """(rope_theta, llama3 scaling items or None) from either config layout."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(params.pop("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA)))
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise UserError(f"rope_type {rope_type!r} is not supported; supported: default, llama3")
  params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
  missing = [k for k in _LLAMA3_KEYS if k not in params]
  if missing:
    raise UserError(f"llama3 rope scaling lacks {', '.join(missing)}")
  items = {k: params[k] for k in _LLAMA3_KEYS}
  items["rope_type"] = "llama3"
  return theta, tuple(sorted(items.items()))
