"""Hugging Face config.json <-> ModelConfig fields.

Read: the layouts found in the wild (published checkpoints: rope_theta / rope_scaling /
rope_local_base_freq; transformers 5: rope_parameters, per layer type for Gemma 3), a
"gemma3" image-text config through its text_config, and the keys a config.json may omit
filled with transformers' defaults for that model_type. Written: transformers 5's layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from grpo_jax.errors import UserError
from grpo_jax.models.config import (DEFAULT_ROPE_THETA, FAMILIES, FULL, GEMMA_FAMILIES,
                                    ROPE_SCALING_KEYS, SLIDING)

if TYPE_CHECKING:
  from grpo_jax.models.config import ModelConfig

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_IMAGE_TEXT = "gemma3"  # its config.json nests the text model's under "text_config"
_GEMMA_ACTIVATION = "gelu_pytorch_tanh"
# transformers' defaults (Gemma2Config, Gemma3TextConfig, MistralConfig) for the keys that
# published config.json files leave out: gemma-3-4b-it's text_config names only five.
_GEMMA_DEFAULTS = dict(
    hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
    bos_token_id=2, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096)
_DEFAULTS = {
    "gemma2": dict(_GEMMA_DEFAULTS, vocab_size=256000, max_position_embeddings=8192,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_GEMMA_DEFAULTS, vocab_size=262208, max_position_embeddings=131072,
                        rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6),
    "mistral": dict(sliding_window=4096),
}
_QWEN_MAX_WINDOW_LAYERS = 28  # Qwen2Config / Qwen3Config default


def _text_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The text model's config: a "gemma3" config's text_config, with the top level's token ids
  and tying; its logits are never soft-capped (Gemma3ForConditionalGeneration applies no cap)."""
  if hf.get("model_type") != _IMAGE_TEXT:
    return dict(hf)
  text = {**(hf.get("text_config") or {}), "model_type": "gemma3_text", "final_logit_softcapping": None}
  for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
    if hf.get(key) is not None:
      text[key] = hf[key]
  return text


def read(hf: Mapping[str, Any]) -> dict[str, Any]:
  """ModelConfig fields (all but dtype, param_dtype, remat) from a config.json dict."""
  family = hf.get("model_type")
  if family not in FAMILIES and family != _IMAGE_TEXT:
    raise UserError(f"model_type {family!r} is not supported; supported: "
                    f"{', '.join(FAMILIES + (_IMAGE_TEXT,))}")
  hf = _text_config(hf)
  family = hf["model_type"]
  hf = {**_DEFAULTS.get(family, {}), **hf}
  gemma = family in GEMMA_FAMILIES
  act_key, act = ("hidden_activation", _GEMMA_ACTIVATION) if gemma else ("hidden_act", "silu")
  if hf.get(act_key, act) != act:
    raise UserError(f"{act_key} {hf[act_key]!r} is not supported for {family}; only {act!r}")
  if hf.get("mlp_bias", False):
    raise UserError("mlp_bias=true is not supported; only bias-free MLPs")
  if hf.get("use_bidirectional_attention"):
    raise UserError("use_bidirectional_attention=true is not supported; only causal attention")
  num_heads = hf["num_attention_heads"]
  rope_theta, rope_scaling, rope_local_theta = _read_rope(hf)
  window, layer_types = _read_layer_types(hf)
  eos = hf.get("eos_token_id")
  fields = dict(
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
      qk_norm=family in ("qwen3", "gemma3_text"),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
      pad_token_id=hf.get("pad_token_id"),
      sliding_window=window,
      layer_types=layer_types,
  )
  if gemma:
    fields.update(
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        attn_logit_softcap=hf.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_logit_softcap=hf.get("final_logit_softcapping"),
        rope_local_theta=rope_local_theta)
  return fields


def _read_layer_types(hf: Mapping[str, Any]) -> tuple[int | None, tuple[str, ...]]:
  """(sliding_window, layer_types), both empty when no layer slides, as transformers decides:
  Mistral slides on every layer, Qwen2/3 from max_window_layers on when use_sliding_window,
  Gemma 2 on even layers, Gemma 3 on all but every sliding_window_pattern-th; an explicit
  layer_types list wins (except for Mistral, whose attention ignores it)."""
  family, n = hf["model_type"], hf["num_hidden_layers"]
  window = hf.get("sliding_window")
  if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    window = None
  if family == "llama" or window is None:
    return None, ()
  if family == "mistral":
    return window, (SLIDING,) * n
  if hf.get("layer_types"):
    types = tuple(hf["layer_types"])
  elif family == "gemma2":
    types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(n))
  elif family == "gemma3_text":
    pattern = hf["sliding_window_pattern"]
    types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
  else:
    first = hf.get("max_window_layers", _QWEN_MAX_WINDOW_LAYERS)
    types = tuple(SLIDING if i >= first else FULL for i in range(n))
  return (window, types) if SLIDING in types else (None, ())


def _read_rope(hf: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None, float | None]:
  """(rope_theta, scaling items or None, the sliding layers' own base or None) from either layout."""
  params = dict(hf.get("rope_parameters") or {})
  local = None
  if FULL in params:  # transformers 5, Gemma 3: one rope per layer type
    local = dict(params.get(SLIDING) or {})
    params = dict(params[FULL])
  else:
    params = params or dict(hf.get("rope_scaling") or {})
    if "rope_local_base_freq" in hf:
      local = {"rope_theta": hf["rope_local_base_freq"]}
  theta = float(params.pop("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA)))
  if local is not None and local.get("rope_type", "default") != "default":
    raise UserError(f"rope_type {local['rope_type']!r} of the sliding layers is not supported; only default")
  local_theta = None if local is None else float(local.get("rope_theta", DEFAULT_ROPE_THETA))
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  if rope_type == "default":
    return theta, None, local_theta
  if rope_type not in ROPE_SCALING_KEYS:
    raise UserError(f"rope_type {rope_type!r} is not supported; supported: default, "
                    f"{', '.join(ROPE_SCALING_KEYS)}")
  if rope_type == "llama3":
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
  missing = [k for k in ROPE_SCALING_KEYS[rope_type] if k not in params]
  if missing:
    raise UserError(f"{rope_type} rope scaling lacks {', '.join(missing)}")
  items = {k: params[k] for k in ROPE_SCALING_KEYS[rope_type]}
  items["rope_type"] = rope_type
  return theta, tuple(sorted(items.items())), local_theta


def write(config: ModelConfig) -> dict[str, Any]:
  """The config.json dict in the layout transformers 5 writes (rope_parameters, layer_types)."""
  family = config.family
  rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
  if config.rope_scaling is not None:
    rope.update(dict(config.rope_scaling))
  if config.rope_local_theta is not None:
    rope = {FULL: rope, SLIDING: {"rope_theta": config.rope_local_theta, "rope_type": "default"}}
  eos = config.eos_token_ids
  hf = {
      "architectures": [_ARCHITECTURES[family]],
      "model_type": family,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "rope_parameters": rope,
      "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_word_embeddings,
      "max_position_embeddings": config.max_position_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": list(eos) if len(eos) != 1 else eos[0],
      "pad_token_id": config.pad_token_id,
      "dtype": config.param_dtype,
  }
  if family in GEMMA_FAMILIES:
    hf.update(hidden_activation=_GEMMA_ACTIVATION, query_pre_attn_scalar=config.query_pre_attn_scalar,
              final_logit_softcapping=config.final_logit_softcap)
    if family == "gemma2":
      hf["attn_logit_softcapping"] = config.attn_logit_softcap
  else:
    hf["hidden_act"] = "silu"
  if family != "qwen2":
    hf["attention_bias"] = config.attention_bias
  if family in ("qwen2", "qwen3"):
    hf["use_sliding_window"] = bool(config.layer_types)
  if family != "llama":  # explicit: transformers' defaults differ from "no window"
    hf["sliding_window"] = config.sliding_window
  if family in GEMMA_FAMILIES or (family != "mistral" and config.layer_types):
    # Not for Mistral: transformers reads a mistral config with layer_types as Ministral.
    hf["layer_types"] = [config.layer_type(i) for i in range(config.num_layers)]
  return hf
