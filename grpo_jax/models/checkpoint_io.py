"""Reading and writing Hugging Face checkpoints: config.json + safetensors, never pickles.

Written as the family's *ForCausalLM; a model with LoRA adapters is written merged (lora.merged).
With a quantized LoRA base, each projection is quantized as it is read, so the float weights
are never all in memory at once. A "gemma3" image-text checkpoint is read through its
text model (tensors under model.language_model. or, as published, language_model.model.);
the vision tower is not read, and the model is written back as a text-only Gemma3ForCausalLM.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from grpo_jax.errors import UserError
from grpo_jax.models import layer_scan
from grpo_jax.models import lora as lora_lib
from grpo_jax.models import quantize
from grpo_jax.models.config import LoRASpec, ModelConfig
from grpo_jax.models.transformer import Transformer

_TOP_NAMES = {
    ("embed",): "model.embed_tokens.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head",): "lm_head.weight",
}
_LAYER_NAMES = {
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",  # Gemma: see _GEMMA_LAYER_NAMES
    ("attn", "q"): "self_attn.q_proj.weight",
    ("attn", "k"): "self_attn.k_proj.weight",
    ("attn", "v"): "self_attn.v_proj.weight",
    ("attn", "o"): "self_attn.o_proj.weight",
    ("attn", "q_bias"): "self_attn.q_proj.bias",
    ("attn", "k_bias"): "self_attn.k_proj.bias",
    ("attn", "v_bias"): "self_attn.v_proj.bias",
    ("attn", "o_bias"): "self_attn.o_proj.bias",
    ("attn", "q_norm", "scale"): "self_attn.q_norm.weight",
    ("attn", "k_norm", "scale"): "self_attn.k_norm.weight",
    ("mlp", "gate"): "mlp.gate_proj.weight",
    ("mlp", "up"): "mlp.up_proj.weight",
    ("mlp", "down"): "mlp.down_proj.weight",
}
# Gemma's blocks have four norms, and the one before the MLP has another name.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    ("post_attn_norm", "scale"): "post_attention_layernorm.weight",
    ("mlp_norm", "scale"): "pre_feedforward_layernorm.weight",
    ("post_mlp_norm", "scale"): "post_feedforward_layernorm.weight",
}
# Where a checkpoint keeps the text model's "model." tensors: *ForCausalLM, then transformers
# 5's Gemma3ForConditionalGeneration, then the published Gemma 3 image-text checkpoints.
_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
_PUBLISHED_LM_HEAD = "language_model.lm_head.weight"
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_MAX_LISTED = 5


def hf_name(path: tuple[Any, ...], config: ModelConfig) -> str:
  """HF tensor name (as *ForCausalLM names it) of the parameter at an NNX state path."""
  if path[0] == "layers":
    names = _GEMMA_LAYER_NAMES if config.is_gemma else _LAYER_NAMES
    return f"model.layers.{path[1]}.{names[tuple(path[2:])]}"
  return _TOP_NAMES[tuple(path)]


def _by_causal_lm_name(files: dict[str, pathlib.Path]) -> dict[str, tuple[str, pathlib.Path]]:
  """*ForCausalLM tensor name -> (stored name, file) for the text model's tensors."""
  prefix = next((p for p in _TEXT_PREFIXES if p + "embed_tokens.weight" in files), "model.")
  located = {"model." + name[len(prefix):]: (name, file) for name, file in files.items()
             if name.startswith(prefix)}
  for head in ("lm_head.weight", _PUBLISHED_LM_HEAD):
    if head in files:
      located["lm_head.weight"] = (head, files[head])
  return located


def _input_axes(name: str) -> int:
  """How many leading axes of our layout a HF linear weight [out, in] has as `in` (0: not linear)."""
  if name.endswith("o_proj.weight"):
    return 2  # [H, K, D]
  return 1 if name.endswith("_proj.weight") or name == "lm_head.weight" else 0


def _to_ours(hf_tensor: np.ndarray, name: str, shape: tuple[int, ...], dtype: jnp.dtype) -> np.ndarray:
  """HF layout -> ours in one copy: linear [out, in] is transposed, heads are split out."""
  src = hf_tensor.T if _input_axes(name) else hf_tensor
  if src.size != math.prod(shape):
    raise UserError(f"tensor {name} has shape {tuple(hf_tensor.shape)}, which does not fit config.json "
                    f"(expected {math.prod(shape)} values as {shape})")
  return np.array(src, dtype=dtype, order="C").reshape(shape)


def _to_hf(value: np.ndarray, name: str) -> np.ndarray:
  """Ours -> HF layout (the inverse of _to_ours)."""
  n_in = _input_axes(name)
  if n_in:
    return np.ascontiguousarray(value.reshape(math.prod(value.shape[:n_in]), -1).T)
  return value.reshape(-1) if name.endswith(".bias") else value


def _tensor_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> safetensors file holding it (single file or sharded index)."""
  single, index = path / _SINGLE_FILE, path / _INDEX_FILE
  if single.is_file():
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: path / file for name, file in weight_map.items()}
  raise UserError(f"no {_SINGLE_FILE} or {_INDEX_FILE} in {path}; only safetensors weights are read")


def read_hf_config(path: pathlib.Path) -> dict[str, Any]:
  """config.json, with eos/bos/pad ids completed from generation_config.json when present."""
  config_file = path / "config.json"
  if not config_file.is_file():
    raise UserError(f"no config.json in {path}; expected a local Hugging Face checkpoint directory")
  hf = json.loads(config_file.read_text())
  gen_file = path / "generation_config.json"
  if gen_file.is_file():
    gen = json.loads(gen_file.read_text())
    eos = [hf.get("eos_token_id"), gen.get("eos_token_id")]
    ids = [i for e in eos if e is not None for i in (e if isinstance(e, list) else [e])]
    hf["eos_token_id"] = list(dict.fromkeys(ids)) or None
    for key in ("bos_token_id", "pad_token_id"):
      if hf.get(key) is None:
        hf[key] = gen.get(key)
  return hf


def _params(model: Transformer) -> Iterator[tuple[str, nnx.Param]]:
  """(HF tensor name, parameter) for every float parameter of the model but the adapters."""
  base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  for path, var in nnx.to_flat_state(base):
    yield hf_name(path, model.config), var


def _weights(model: Transformer) -> Iterator[tuple[str, nnx.Param | quantize.QuantizedWeight]]:
  """(HF tensor name, parameter or quantized weight) for every base weight of the model."""
  yield from _params(model)
  for path, module, name in lora_lib.adapted(model):
    weight = getattr(module, name)
    if isinstance(weight, quantize.QuantizedWeight):
      yield hf_name(path + (name,), model.config), weight


def fresh_adapters(config: ModelConfig, seed: int) -> nnx.State:
  """The adapters a new model of config starts with (random A, zero B); the base weights
  that init draws too are never computed (jit drops what it does not return)."""
  return jax.jit(lambda: nnx.state(Transformer(config, rngs=nnx.Rngs(seed)), nnx.LoRAParam))()


def from_pretrained(path: str | pathlib.Path, dtype: str = "float32", *,
                    param_dtype: str | None = None, remat: bool = False,
                    scan_layers: bool = False, attention: str = "xla",
                    lora: LoRASpec | None = None, seed: int = 0) -> Transformer:
  """Loads a local HF checkpoint dir; parameters in param_dtype (default: dtype), compute in
  dtype, attention by the implementation `attention` (models/attention.py); scan_layers: the
  blocks stacked once read (layer_scan.py).

  lora: adds fresh adapters (drawn with `seed`) over the checkpoint's weights, which then are
  stored as lora.base_dtype says.
  """
  path = pathlib.Path(path)
  config = ModelConfig.from_hf(read_hf_config(path), dtype=dtype, param_dtype=param_dtype,
                               remat=remat, attention=attention, lora=lora)
  files = _by_causal_lm_name(_tensor_files(path))
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  weights = list(_weights(model))
  missing = [name for name, _ in weights if name not in files]
  if missing:
    listed = ", ".join(missing[:_MAX_LISTED]) + (f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else "")
    raise UserError(f"checkpoint {path} lacks {len(missing)} tensors that config.json needs: {listed}")
  target = config.base_param_dtype
  for file in sorted({files[name][1] for name, _ in weights}):
    with safe_open(file, framework="numpy") as f:
      for name, weight in weights:
        stored, in_file = files[name]
        if in_file != file:
          continue
        if isinstance(weight, quantize.QuantizedWeight):
          weight.set(_to_ours(f.get_tensor(stored), name, weight.shape, np.float32))
        else:
          weight.set_value(jnp.asarray(_to_ours(f.get_tensor(stored), name, weight.shape, target)))
  if lora is not None:
    nnx.update(model, fresh_adapters(config, seed))
  return layer_scan.scanned(model) if scan_layers else model


def save_pretrained(model: Transformer, out_dir: str | pathlib.Path, *, max_shard_bytes: int = 4 << 30) -> None:
  """Writes config.json and safetensors (sharded with an index above max_shard_bytes) for
  transformers; a LoRA model merged, in the dtype of its base (its compute dtype if quantized).
  A scanned model writes the same files as its unscanned form."""
  model = layer_scan.unscanned(model)
  if model.config.lora is not None:
    model = lora_lib.merged(model, model.config.base_param_dtype)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2, sort_keys=True) + "\n")
  shards: list[list[tuple[str, nnx.Param]]] = [[]]
  shard_bytes = 0
  for name, var in _params(model):
    nbytes = var[...].nbytes
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append((name, var))
    shard_bytes += nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    file = _SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {name: _to_hf(np.asarray(jax.device_get(var[...])), name) for name, var in shard}
    save_file(tensors, out / file, metadata={"format": "pt"})
    weight_map.update({name: file for name in tensors})
  if len(shards) > 1:
    total = sum(var[...].nbytes for shard in shards for _, var in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / _INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
