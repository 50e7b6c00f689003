"""LoRA adapters in PEFT's directory format: adapter_config.json + adapter_model.safetensors.

PEFT names a projection's adapter weights after the *ForCausalLM tensor they adapt, under
"base_model.model.": lora_A.weight [r, in] and lora_B.weight [out, r]; ours are A [*in, r] and
B [r, *out] (lora.py). `peft.PeftModel.from_pretrained(transformers_model, dir)` loads what
`save_peft_adapter` writes, and `load_peft_adapter` reads what PEFT's `save_pretrained` writes
for the LoRA settings PEFT and grpo_jax share (plain LoRA on q/k/v/o/gate/up/down, no bias).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from grpo_jax.errors import UserError
from grpo_jax.models import checkpoint_io
from grpo_jax.models import layer_scan
from grpo_jax.models import lora as lora_lib
from grpo_jax.models.config import LORA_TARGETS, LoRASpec
from grpo_jax.models.transformer import Transformer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# adapter_config.json keys whose non-default values ask for something plain LoRA is not.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
                "alpha_pattern": {}, "lora_bias": False, "exclude_modules": None,
                "trainable_token_indices": None, "target_parameters": None}


def _adapters(model: Transformer) -> Iterator[tuple[str, lora_lib.LoRA]]:
  """(the adapted weight's *ForCausalLM name without ".weight", adapter) of every adapter."""
  for path, module, name in lora_lib.adapted(model):
    adapter = getattr(module, name + lora_lib.SUFFIX)
    if adapter is not None:
      yield checkpoint_io.hf_name(path + (name,), model.config).removesuffix(".weight"), adapter


def save_peft_adapter(model: Transformer, out_dir: str | pathlib.Path, *,
                      base_model_name_or_path: str | None = None) -> None:
  """Writes the model's adapters as a PEFT LoRA adapter directory."""
  model = layer_scan.unscanned(model)
  spec = model.config.lora
  if spec is None:
    raise UserError("the model has no LoRA adapters to save; set model.lora.rank > 0")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for name, adapter in _adapters(model):
    a, b = (np.asarray(jax.device_get(x[...])) for x in (adapter.a, adapter.b))
    r = a.shape[-1]
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
  save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": sorted(spec.targets), "init_lora_weights": True,
            "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
            **_UNSUPPORTED}
  (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_adapter_config(adapter_dir: str | pathlib.Path) -> dict[str, Any]:
  """adapter_config.json of a PEFT LoRA directory, checked for what grpo_jax can load."""
  path = pathlib.Path(adapter_dir) / CONFIG_FILE
  if not path.is_file():
    raise UserError(f"no {CONFIG_FILE} in {adapter_dir}; expected a PEFT LoRA adapter directory")
  config = json.loads(path.read_text())
  if config.get("peft_type") != "LORA":
    raise UserError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; only LORA")
  for key, plain in _UNSUPPORTED.items():
    if config.get(key, plain) not in (plain, None, {}, False):
      raise UserError(f"{path}: {key}={config[key]!r} is not supported; grpo_jax loads plain LoRA "
                      f"adapters ({key}={plain!r})")
  targets = config.get("target_modules")
  if targets == "all-linear":
    targets = list(LORA_TARGETS)
  if not isinstance(targets, list) or set(targets) - set(LORA_TARGETS):
    raise UserError(f"{path}: target_modules={targets!r} is not supported; give a list among "
                    f"{', '.join(LORA_TARGETS)}")
  config["target_modules"] = targets
  return config


def adapter_spec(adapter_dir: str | pathlib.Path, base_dtype: str) -> LoRASpec:
  """The LoRASpec of a PEFT adapter directory, over a base stored in base_dtype."""
  config = read_adapter_config(adapter_dir)
  return LoRASpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                  targets=tuple(t for t in LORA_TARGETS if t in config["target_modules"]),
                  dropout=float(config.get("lora_dropout") or 0.0), base_dtype=base_dtype)


def _stored_names(path: pathlib.Path) -> dict[str, str]:
  """*ForCausalLM-style adapter tensor name -> its name in the file (Gemma 3 image-text
  adapters keep their text model under model.language_model.)."""
  with safe_open(path, framework="numpy") as f:
    names = list(f.keys())
  located = {}
  for stored in names:
    name = stored.removeprefix(_PREFIX).replace(".default.", ".")
    for prefix in ("model.language_model.", "language_model.model."):
      if name.startswith(prefix):
        name = "model." + name[len(prefix):]
    located[name] = stored
  return located


def load_peft_adapter(model: Transformer, adapter_dir: str | pathlib.Path) -> Transformer:
  """The model with the adapters of a PEFT LoRA directory (rank, alpha, targets and dropout
  as its adapter_config.json says), over the same base weights; a new model object."""
  old = model.config.lora
  base_dtype = old.base_dtype if old is not None else model.config.param_dtype
  spec = adapter_spec(adapter_dir, base_dtype)
  config = dataclasses.replace(model.config, lora=spec, scan_layers=False)
  new = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  nnx.update(new, nnx.state(layer_scan.unscanned(model), nnx.Not(nnx.LoRAParam)))
  read_adapters(new, adapter_dir)
  return layer_scan.scanned(new) if model.config.scan_layers else new


def read_adapters(model: Transformer, adapter_dir: str | pathlib.Path) -> None:
  """Sets the model's adapters to those of a PEFT directory with the same targets and rank
  (a model with config.scan_layers: load_peft_adapter)."""
  if model.config.scan_layers:
    raise ValueError("read_adapters sets an unscanned model's adapters; use load_peft_adapter")
  spec = model.config.lora
  path = pathlib.Path(adapter_dir) / WEIGHTS_FILE
  if not path.is_file():
    raise UserError(f"no {WEIGHTS_FILE} in {adapter_dir}; only safetensors adapters are read")
  stored = _stored_names(path)
  wanted = {f"{name}.lora_{ab}.weight": (adapter, ab) for name, adapter in _adapters(model)
            for ab in ("A", "B")}
  missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
  if missing or extra:
    problem = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which is not a LoRA target"
    raise UserError(f"{path} {problem} ({len(missing)} missing, {len(extra)} unexpected tensors "
                    f"for targets {', '.join(spec.targets)})")
  dtype = np.dtype(model.config.param_dtype)
  with safe_open(path, framework="numpy") as f:
    for name, (adapter, ab) in wanted.items():
      var = adapter.a if ab == "A" else adapter.b
      tensor = f.get_tensor(stored[name]).astype(np.float32).T  # [in, r] or [r, out]
      if tensor.size != math.prod(var.shape):
        raise UserError(f"{path}: {name} has shape {tensor.T.shape}, which does not fit the "
                        f"model (expected {math.prod(var.shape)} values as {var.shape})")
      var.set_value(jax.numpy.asarray(tensor.reshape(var.shape).astype(dtype)))
