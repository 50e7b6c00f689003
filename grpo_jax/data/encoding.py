"""Prompts to token arrays and completions back to text, for any HF tokenizer."""

from __future__ import annotations

from typing import Any, Sequence

import jinja2
import numpy as np
from absl import logging

from grpo_jax.config import DataCfg
from grpo_jax.errors import UserError

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


def format_prompt(tokenizer, prompt: str, *, use_chat_template: bool | None = None,
                  system_prompt: str | None = None) -> str:
  """The prompt as the model sees it: through the chat template when there is one.

  use_chat_template None: use it if the tokenizer has one. Without a template the system
  prompt, if any, goes before the prompt, separated by a blank line; so it does inside the
  user turn when the template refuses a system role (Gemma 2's does).
  """
  has_template = getattr(tokenizer, "chat_template", None) is not None
  if use_chat_template is None:
    use_chat_template = has_template
  if not use_chat_template:
    return prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
  if not has_template:
    raise UserError("use_chat_template is set but the tokenizer has no chat template;"
                    " set it to False or None")
  apply = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=True)
  if system_prompt is None:
    return apply([{"role": "user", "content": prompt}])
  try:
    return apply([{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}])
  except jinja2.TemplateError:
    return apply([{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}])


def pad_id(tokenizer) -> int:
  """The padding id: the pad token, else EOS (Llama-style tokenizers have no pad)."""
  return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _prompt_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of formatted prompts, with BOS only where the tokenizer adds one itself.

  Texts from a chat template already hold their special tokens, so none are added; a
  tokenizer that normally starts with BOS gets it unless the text already starts with it.
  """
  ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  bos = tokenizer.bos_token_id
  if bos is None or tokenizer("a")["input_ids"][:1] != [bos]:
    return ids
  return [row if row[:1] == [bos] else [bos] + row for row in ids]


def encode_prompts(tokenizer, texts: Sequence[str], *, buckets: Sequence[int] = DEFAULT_BUCKETS,
                   max_prompt_len: int | None = None,
                   stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompt tokens [B, T] and mask [B, T], both int32.

  T is the smallest bucket holding the longest prompt (the longest length itself when
  no bucket does). Prompts longer than max_prompt_len keep their last max_prompt_len
  tokens; stats, when given, receives the count as "truncated_prompts".
  """
  ids = _prompt_ids(tokenizer, texts)
  truncated = 0
  if max_prompt_len is not None:
    truncated = sum(len(row) > max_prompt_len for row in ids)
    ids = [row[-max_prompt_len:] for row in ids]
  if truncated:
    logging.warning("truncated %d of %d prompts to their last %d tokens",
                    truncated, len(ids), max_prompt_len)
  if stats is not None:
    stats["truncated_prompts"] = truncated
  longest = max(len(row) for row in ids)
  t = min((b for b in buckets if b >= longest), default=longest)
  tokens_bt = np.full((len(ids), t), pad_id(tokenizer), np.int32)
  mask_bt = np.zeros((len(ids), t), np.int32)
  for b, row in enumerate(ids):
    if row:
      tokens_bt[b, -len(row):] = row
      mask_bt[b, -len(row):] = 1
  return tokens_bt, mask_bt


def format_row_prompts(tokenizer, rows: Sequence[dict[str, Any]], data: DataCfg) -> list[str]:
  """The prompts of dataset rows as the model sees them, as the `data` section says."""
  return [format_prompt(tokenizer, row["prompt"], use_chat_template=data.use_chat_template,
                        system_prompt=data.system_prompt) for row in rows]


def encode_row_prompts(tokenizer, rows: Sequence[dict[str, Any]],
                       data: DataCfg) -> tuple[np.ndarray, np.ndarray]:
  """encode_prompts of format_row_prompts, with the `data` section's buckets and length."""
  return encode_prompts(tokenizer, format_row_prompts(tokenizer, rows, data),
                        buckets=data.prompt_buckets, max_prompt_len=data.max_prompt_len)


def encode_sft(tokenizer, prompts: Sequence[str], targets: Sequence[str], *, max_len: int,
               stats: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded prompt + target + EOS: tokens, loss_mask, attention_mask [B, max_len] int32.

  prompts are formatted text (format_prompt). loss_mask is 1 on the target and EOS
  tokens: the positions whose token the model learns to predict from the one before.
  Longer sequences lose their end; stats, when given, receives "truncated_examples".
  """
  prompt_ids = _prompt_ids(tokenizer, prompts)
  target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
  tokens_bt = np.full((len(prompt_ids), max_len), pad_id(tokenizer), np.int32)
  loss_bt = np.zeros((len(prompt_ids), max_len), np.int32)
  attention_bt = np.zeros((len(prompt_ids), max_len), np.int32)
  truncated = 0
  for b, (p, c) in enumerate(zip(prompt_ids, target_ids, strict=True)):
    row = (p + c + [tokenizer.eos_token_id])[:max_len]
    truncated += len(p) + len(c) + 1 > max_len
    tokens_bt[b, :len(row)] = row
    attention_bt[b, :len(row)] = 1
    loss_bt[b, len(p):len(row)] = 1
  if truncated:
    logging.warning("truncated %d of %d SFT examples to %d tokens", truncated, len(prompt_ids),
                    max_len)
  if stats is not None:
    stats["truncated_examples"] = truncated
  return tokens_bt, loss_bt, attention_bt


def text_positions(tokenizer, tokens: np.ndarray, mask: np.ndarray, *,
                   eos_token_ids: Sequence[int] = ()) -> list[np.ndarray]:
  """Per row of tokens [B, N], the positions (ascending) of the tokens its completion text
  is decoded from: under mask [B, N], neither pad nor EOS."""
  drop = [i for i in {pad_id(tokenizer), tokenizer.eos_token_id, *eos_token_ids}
          if i is not None]
  keep = (np.asarray(mask) > 0) & ~np.isin(np.asarray(tokens), drop)
  return [np.flatnonzero(row) for row in keep]


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
  """The text of token ids as completions are decoded: special tokens kept."""
  return tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray, *,
                       eos_token_ids: Sequence[int] = ()) -> list[str]:
  """Completion texts from tokens [B, N] under mask [B, N], without pad and EOS tokens.

  Other special tokens (<think>, role markers) stay in the text.
  """
  tokens = np.asarray(tokens)
  return [decode_ids(tokenizer, row[positions]) for row, positions in zip(
      tokens, text_positions(tokenizer, tokens, mask, eos_token_ids=eos_token_ids))]
