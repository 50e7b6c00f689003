"""The demo tokenizer (built in code, so the demo downloads nothing) and tokenizer export.

The demo tokenizer is byte level with no merges: every byte is one token, the tags and role
markers are single tokens. It is built the way transformers rebuilds a byte-level BPE
tokenizer (Qwen2Tokenizer: NFC, byte-level pre-tokenizer and decoder, no unknown token), so
`AutoTokenizer` reloads it with the same ids whichever class it picks from the files beside
it: a qwen2 config.json makes it a Qwen2Tokenizer whatever tokenizer_config.json says.
"""

from __future__ import annotations

import os

import tokenizers
import transformers
from absl import logging
from tokenizers import decoders, models, normalizers, pre_tokenizers

# Ids are positions in this order, so they are the same on every run.
SPECIAL_TOKENS = ("<|pad|>", "<|eos|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
# Newline and printable ASCII first (the ids the demo's text uses), then every other byte.
FIRST_BYTES = (10,) + tuple(range(32, 127))
# Each message is <|role|>content<|eos|>; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('roles are system, user and assistant') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")
# What export checks a reloaded tokenizer on: whitespace, digits, tags, role markers, non-ASCII.
PROBE_TEXTS = (
    "<|user|>What is 12 + 34?<|eos|><|assistant|><think>\n 12 + 34:\n  2 + 4 = 6\n</think>\n"
    "<answer>\n46\n</answer><|eos|>",
    "tabs\tand  double  spaces, CRLF\r\n; Café, naïve, 日本語, emoji 🙂 and ~`{}|",
)


def byte_symbols() -> dict[int, str]:
  """The byte-level alphabet: byte -> the printable character that stands for it.

  Printable Latin-1 bytes stand for themselves; the others (controls, space) are shifted past
  255 in order, so space is "Ġ" and newline "Ċ", as in every byte-level BPE vocabulary.
  """
  kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  symbols, shifted = {}, 0
  for byte in range(256):
    if byte in kept:
      symbols[byte] = chr(byte)
    else:
      symbols[byte] = chr(256 + shifted)
      shifted += 1
  return symbols


def demo_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """Every byte one id (printable ASCII and newline first), the tags and role markers one each.

  <think>, </think>, <answer>, </answer> are ordinary added tokens (decoding keeps them
  even with skip_special_tokens); pad, eos, unk and the role markers are special.
  save_pretrained(dir) writes a tokenizer that AutoTokenizer loads back with the same ids.
  """
  symbols = byte_symbols()
  order = FIRST_BYTES + tuple(b for b in range(256) if b not in FIRST_BYTES)
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + TAG_TOKENS)}
  vocab.update({symbols[b]: len(SPECIAL_TOKENS) + len(TAG_TOKENS) + i for i, b in enumerate(order)})
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in SPECIAL_TOKENS])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>", unk_token="<|unk|>",
      extra_special_tokens=list(SPECIAL_TOKENS[3:]), chat_template=CHAT_TEMPLATE)


def reload_differences(tokenizer, directory: str) -> list[str]:
  """How transformers' AutoTokenizer, loading `directory`, differs from `tokenizer` on
  PROBE_TEXTS (ids, decoded text, pad / eos ids); empty when it reloads the same."""
  loaded = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False,
                                                      local_files_only=True)
  problems = []
  for text in PROBE_TEXTS:
    ids, loaded_ids = tokenizer.encode(text), loaded.encode(text)
    if ids != loaded_ids:
      problems.append(f"{text[:24]!r}... encodes to other ids ({type(loaded).__name__})")
    elif loaded.decode(ids) != tokenizer.decode(ids):
      problems.append(f"{text[:24]!r}... decodes to other text ({type(loaded).__name__})")
  for name in ("pad_token_id", "eos_token_id"):
    if getattr(loaded, name) != getattr(tokenizer, name):
      problems.append(f"{name} {getattr(loaded, name)} instead of {getattr(tokenizer, name)}")
  return problems


def save_tokenizer(tokenizer, directory: str) -> None:
  """Writes the tokenizer beside an exported model and checks that it reloads the same.

  Call it after the model's config.json is written: AutoTokenizer picks the class from the
  files beside the tokenizer. A difference is logged as a warning (the files stay written).
  """
  tokenizer.save_pretrained(directory)
  problems = reload_differences(tokenizer, directory)
  if problems:
    logging.warning("the tokenizer saved in %s reloads differently with transformers' "
                    "AutoTokenizer: %s", os.path.abspath(directory), "; ".join(problems))
