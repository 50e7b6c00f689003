"""The data layer: prompt rows from sources, batching, tokenizers and encoding."""

from grpo_jax.data.encoding import (decode_completions, decode_ids, encode_prompts,
                                    encode_row_prompts, encode_sft, format_prompt,
                                    format_row_prompts, pad_id, text_positions)
from grpo_jax.data.sources import gsm8k_row, load_rows, sft_target, split_eval
from grpo_jax.data.stream import PromptStream
from grpo_jax.data.synthetic import INSTRUCTION
from grpo_jax.data.tokenizer import demo_tokenizer, save_tokenizer

__all__ = [
    "INSTRUCTION", "PromptStream", "decode_completions", "decode_ids", "demo_tokenizer",
    "encode_prompts", "encode_row_prompts", "encode_sft", "format_prompt", "format_row_prompts",
    "gsm8k_row", "load_rows", "pad_id", "save_tokenizer", "sft_target", "split_eval",
    "text_positions",
]
