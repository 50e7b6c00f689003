"""The demo tokenizer: character level, built in code, so the demo downloads nothing."""

from __future__ import annotations

import tokenizers
import transformers
from tokenizers import decoders, models

# Ids are positions in this order, so they are the same on every run.
SPECIAL_TOKENS = ("<|pad|>", "<|eos|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
CHARACTERS = ("\n",) + tuple(chr(c) for c in range(32, 127))
# Each message is <|role|>content<|eos|>; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('roles are system, user and assistant') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")


def demo_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """Printable ASCII and newline one id each, the tags and role markers single tokens.

  <think>, </think>, <answer>, </answer> are ordinary added tokens (decoding keeps them
  even with skip_special_tokens); pad, eos, unk and the role markers are special.
  save_pretrained(dir) writes a tokenizer that AutoTokenizer loads back.
  """
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + TAG_TOKENS + CHARACTERS)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in SPECIAL_TOKENS])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>", unk_token="<|unk|>",
      extra_special_tokens=list(SPECIAL_TOKENS[3:]), chat_template=CHAT_TEMPLATE)
