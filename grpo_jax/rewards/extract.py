"""Pieces of a completion: the final answer, the last number, the reasoning."""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# Integers and decimals, optionally signed, with optional thousands separators.
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
# A comma or space between a digit and a group of exactly three digits: 1,000 / 1 000.
_THOUSANDS = re.compile(r"(?<=\d)[, ](?=\d{3}(?!\d))")


def last_boxed(text: str) -> str | None:
  """Content of the last complete `\\boxed{...}` (nested braces balanced), if any."""
  for match in reversed(list(_BOXED.finditer(text))):
    depth = 1
    for i in range(match.end(), len(text)):
      if text[i] == "{":
        depth += 1
      elif text[i] == "}":
        depth -= 1
        if depth == 0:
          return text[match.end():i].strip()
  return None


def final_answer(text: str) -> str | None:
  """The model's final answer: last `\\boxed{}`, else last `<answer>`, else last `####`."""
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed
  tags = _ANSWER_TAG.findall(text)
  if tags:
    return tags[-1].strip()
  hashes = _HASHES.findall(text)
  if hashes:
    return hashes[-1].strip()
  return None


def last_number(text: str) -> str | None:
  """The last number written in `text`, as written."""
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def normalize(text: str) -> str:
  """Strips spaces, `$` and a final period, and drops thousands separators."""
  text = text.strip().strip("$").strip().rstrip(".").strip()
  return _THOUSANDS.sub("", text)


def extract_answer(text: str) -> str | None:
  """The normalised final answer (`final_answer`, else `last_number`), for exact
  comparison and majority votes; None when the text has neither."""
  answer = final_answer(text)
  if answer is None:
    answer = last_number(text)
  return None if answer is None else normalize(answer)


def opened_think(prompt: str, completion: str) -> str:
  """The completion, with the `<think>` that the chat template put at the end of the prompt.

  Templates of reasoning models (DeepSeek-R1, Qwen3) end the prompt with `<think>\\n`, so
  the completion starts inside the reasoning; the tag is put back so the completion can be
  read as a whole.
  """
  tail = prompt.rstrip()
  if tail.endswith("<think>") and not completion.lstrip().startswith("<think>"):
    return prompt[prompt.rindex("<think>"):] + completion
  return completion


def reasoning(completion: str) -> str:
  """The text inside `<think>...</think>`; the whole completion when it has no think tag."""
  start = completion.find("<think>")
  start = 0 if start < 0 else start + len("<think>")
  end = completion.find("</think>", start)
  if end < 0:
    return completion[start:]
  return completion[start:end]
