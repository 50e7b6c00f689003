"""Llama / Qwen2 / Qwen3 / Mistral / Gemma 2 / Gemma 3 decoders in Flax NNX, loaded from and saved to
HF checkpoints, with optional LoRA adapters (read and written in PEFT's format)."""

from grpo_jax.models.checkpoint_io import from_pretrained, save_pretrained
from grpo_jax.models.config import LoRASpec, ModelConfig
from grpo_jax.models.kv_cache import KVCache, expand_cache, init_cache
from grpo_jax.models.peft_io import load_peft_adapter, save_peft_adapter
from grpo_jax.models.transformer import Transformer, init, positions_from_mask

__all__ = [
    "KVCache",
    "LoRASpec",
    "ModelConfig",
    "Transformer",
    "expand_cache",
    "from_pretrained",
    "init",
    "init_cache",
    "load_peft_adapter",
    "positions_from_mask",
    "save_peft_adapter",
    "save_pretrained",
]
