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


def _last_boxed_at(text: str) -> tuple[str, int] | None:
  """Content of the last complete `\\boxed{...}` and the offset just past its "}"."""
  for match in reversed(list(_BOXED.finditer(text))):
    depth = 1
    for i in range(match.end(), len(text)):
      if text[i] == "{":
        depth += 1
      elif text[i] == "}":
        depth -= 1
        if depth == 0:
          return text[match.end():i].strip(), i + 1
  return None


def last_boxed(text: str) -> str | None:
  """Content of the last complete `\\boxed{...}` (nested braces balanced), if any."""
  found = _last_boxed_at(text)
  return None if found is None else found[0]


def final_answer_at(text: str) -> tuple[str, int] | None:
  """`final_answer` and the offset in `text` just past where it is written (past the
  closing brace or tag, or the end of the `####` line); None when there is none."""
  found = _last_boxed_at(text)
  if found is not None:
    return found
  for pattern in (_ANSWER_TAG, _HASHES):
    matches = list(pattern.finditer(text))
    if matches:
      return matches[-1].group(1).strip(), matches[-1].end()
  return None


def final_answer(text: str) -> str | None:
  """The model's final answer: last `\\boxed{}`, else last `<answer>`, else last `####`."""
  found = final_answer_at(text)
  return None if found is None else found[0]


def _last_number_at(text: str) -> tuple[str, int] | None:
  """The last number written in `text`, as written, and the offset just past it."""
  numbers = list(_NUMBER.finditer(text))
  return (numbers[-1].group(), numbers[-1].end()) if numbers else None


def last_number(text: str) -> str | None:
  """The last number written in `text`, as written."""
  found = _last_number_at(text)
  return None if found is None else found[0]


def normalize(text: str) -> str:
  """Strips spaces, `$` and a final period, and drops thousands separators."""
  text = text.strip().strip("$").strip().rstrip(".").strip()
  return _THOUSANDS.sub("", text)


def extract_answer_at(text: str) -> tuple[str, int] | None:
  """`extract_answer` and the offset in `text` just past where it is written."""
  found = final_answer_at(text) or _last_number_at(text)
  return None if found is None else (normalize(found[0]), found[1])


def extract_answer(text: str) -> str | None:
  """The normalised final answer (`final_answer`, else `last_number`), for exact
  comparison and majority votes; None when the text has neither."""
  found = extract_answer_at(text)
  return None if found is None else found[0]


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


def reasoning_span(completion: str) -> tuple[int, int]:
  """(start, end) of the text inside `<think>...</think>`; the whole completion when it
  has no think tag, from its start when the tag was opened by the prompt."""
  start = completion.find("<think>")
  start = 0 if start < 0 else start + len("<think>")
  end = completion.find("</think>", start)
  return start, len(completion) if end < 0 else end


def reasoning(completion: str) -> str:
  """The text inside `<think>...</think>`; the whole completion when it has no think tag."""
  start, end = reasoning_span(completion)
  return completion[start:end]
