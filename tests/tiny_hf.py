"""Tiny local Hugging Face tokenizers and checkpoints for tests (nothing is downloaded).

  tok = tiny_hf.make_tokenizer(dir)                 # byte-level BPE, ~384 tokens, chat template
  tiny_hf.make_checkpoint("qwen3", dir, vocab_size=len(tok))   # random torch weights + tokenizer
  tiny_hf.make_checkpoint("gemma3", dir)   # Gemma3ForConditionalGeneration, Gemma-style tokenizer
"""

from __future__ import annotations

import pathlib
import random

# <|endoftext|> is there because transformers' AutoTokenizer loads a qwen2 dir as
# Qwen2Tokenizer, which adds it as unk when missing (an id past the model's vocab).
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Gemma-style: BOS added to every text, turns end with <end_of_turn>, no system role (as
# Gemma 2's template), the assistant is "model".
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('Gemma turns are user or model, not system') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
_FAMILY_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "gemma3")
_GEMMA_TYPES = ("gemma2", "gemma3_text", "gemma3")
# Settings that make each family's features matter at test sizes (a window shorter than the
# test sequences, caps that bend the scores, a query scale that is not K's, distinct rope bases).
_GEMMA3_TEXT = dict(
    sliding_window=4, query_pre_attn_scalar=24, sliding_window_pattern=2,
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
FAMILY_SETTINGS = {
    "mistral": dict(sliding_window=4),
    "gemma2": dict(sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0),
    "gemma3_text": _GEMMA3_TEXT,
    "gemma3": _GEMMA3_TEXT,
}
_TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    image_size=28, patch_size=14)
_WORDS = ("the answer is what how many apples has she he they gives takes buys sells left total each "
          "step first then so because think reasoning solve add subtract multiply divide equals number "
          "sum of and are in a an to for with").split()


def _corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
  """Arithmetic word problems, tagged reasoning and plain word salad, deterministic."""
  rng = random.Random(seed)
  lines = []
  for i in range(num_lines):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op, val = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
    kind = i % 3
    if kind == 0:
      lines.append(f"What is {a} {op} {b}? The answer is {val}.")
    elif kind == 1:
      lines.append(f"<think>{a} {op} {b} = {val}, {words}</think> <answer>{val}</answer>")
    else:
      lines.append(f"{words.capitalize()}. Then {a} and {b} make {val}.")
  return lines


def make_tokenizer(directory: str | pathlib.Path, *, vocab_size: int = 384, gemma: bool = False):
  """Trains a byte-level BPE on a local corpus; saves tokenizer.json + tokenizer_config.json.

  Specials: <pad> (0), <eos> (1), <bos> (2), <|im_start|>, <|im_end|>, <|endoftext|>; a
  ChatML-like template. gemma: <pad>, <eos>, <bos>, <start_of_turn>, <end_of_turn>, BOS
  before every text and GEMMA_CHAT_TEMPLATE instead.
  Returns the transformers.PreTrainedTokenizerFast. Next to a qwen2
  config, AutoTokenizer gives a Qwen2Tokenizer over the same vocab that pre-splits digits,
  so its ids for the same text can differ; load with PreTrainedTokenizerFast(tokenizer_file=...)
  where exact ids matter.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(GEMMA_SPECIAL_TOKENS if gemma else SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(_corpus(), trainer=trainer)
  if gemma:
    bos = ("<bos>", tokenizer.token_to_id("<bos>"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[bos])
  tokenizer.save(str(directory / "tokenizer.json"))
  fast = PreTrainedTokenizerFast(
      tokenizer_file=str(directory / "tokenizer.json"), pad_token="<pad>", eos_token="<eos>",
      bos_token="<bos>")
  fast.chat_template = GEMMA_CHAT_TEMPLATE if gemma else CHAT_TEMPLATE
  fast.save_pretrained(directory)
  return fast


def checkpoint_maker(cases: dict, tmp_path_factory):
  """name -> checkpoint dir of cases[name] = (family, make_checkpoint's kwargs), each built on
  first use (for a module-scoped fixture)."""
  made = {}

  def get(name):
    if name not in made:
      family, kwargs = cases[name]
      made[name] = make_checkpoint(family, tmp_path_factory.mktemp(name), **kwargs)
    return made[name]

  return get


def make_checkpoint(family: str, directory: str | pathlib.Path, *, vocab_size: int | None = None,
                    hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, tie: bool = False,
                    seed: int = 0, **overrides) -> pathlib.Path:
  """A random-weight transformers model of `family` saved (float32) with its tokenizer in directory.

  family is a model_type; "gemma3" is a Gemma3ForConditionalGeneration (a tiny vision tower
  beside the text model). Gemma families get the Gemma-style tokenizer and a
  generation_config.json whose EOS ids are [<eos>, <end_of_turn>], as published.
  vocab_size defaults to the tokenizer's size. Weights are redrawn after HF's init so
  that biases and norm scales are not trivially 0 / 1: embeddings, matrices and biases
  ~ N(0, 0.2^2), norm scales ~ 1 + N(0, 0.1^2) (Gemma stores scale - 1). overrides go to the
  HF config over FAMILY_SETTINGS (e.g. rope_parameters=..., intermediate_size=...).
  """
  import torch
  import transformers

  if family not in _FAMILY_TYPES:
    raise ValueError(f"family {family!r} not in {_FAMILY_TYPES}")
  directory = pathlib.Path(directory)
  gemma = family in _GEMMA_TYPES
  tokenizer = make_tokenizer(directory, gemma=gemma)
  kwargs = dict(
      vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
      head_dim=hidden // heads, tie_word_embeddings=tie, max_position_embeddings=512,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  kwargs.update(FAMILY_SETTINGS.get(family, {}))
  kwargs.update(overrides)
  torch.manual_seed(seed)
  if family == "gemma3":
    config = transformers.Gemma3Config(text_config=kwargs, vision_config=_TINY_VISION,
                                       tie_word_embeddings=tie)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
  else:
    config = transformers.AutoConfig.for_model(family, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_((0 if gemma else 1) + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  if gemma:
    model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                            tokenizer.convert_tokens_to_ids("<end_of_turn>")]
  model.save_pretrained(directory)
  return directory
