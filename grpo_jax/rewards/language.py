"""language_consistency: DeepSeek-R1's reward for reasoning in the prompt's language.

R1 scores the share of the chain of thought written in the target language. Here the
language is approximated by its script, read from Unicode character names: the prompt's
most frequent script is the target (a prompt with kana in it targets Japanese, that is
kana and Han together), and the score is the share of the reasoning's word tokens in it.

Word tokens: runs of letters of one script (combining marks join their letter); in
scripts written without spaces (Han, kana, Thai) each character is a token. Not counted:
digits, punctuation, symbols, LaTeX (`$...$`, `\\(...\\)`, `\\[...\\]`, `\\command`) and
one-letter tokens (math variables such as x or θ). A prompt with no tokens gives 1.0 and
so does reasoning with none. The prompt is taken as given: a long system preamble in
another language than the question moves the target to that language.
"""

from __future__ import annotations

import collections
import functools
import re
import unicodedata

from grpo_jax.rewards import extract

_MATH = re.compile(r"\$\$.*?\$\$|\$.*?\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+", re.DOTALL)
_UNSPACED = frozenset({"Han", "Kana", "Thai"})
_ASCII_WORD = re.compile(r"[A-Za-z]{2,}")


@functools.lru_cache(maxsize=1 << 16)
def script(char: str) -> str | None:
  """The script of a letter ("Latin", "Han", "Kana", "Cyrillic", ...); None if unnamed."""
  words = unicodedata.name(char, "").split()
  if words[:1] in (["FULLWIDTH"], ["HALFWIDTH"]):
    words = words[1:]
  if not words:
    return None
  if words[0] == "CJK":
    return "Han"
  if words[0].startswith(("HIRAGANA", "KATAKANA")):
    return "Kana"
  return words[0].title()


def _run_scripts(text: str) -> list[str]:
  """The script of each counted word token of `text`, character by character."""
  scripts: list[str] = []
  run_script, run_len = None, 0
  for char in text + " ":
    category = unicodedata.category(char)
    if category[0] == "M" and run_script is not None:
      continue
    char_script = script(char) if category[0] == "L" else None
    if char_script != run_script or char_script in _UNSPACED:
      if run_script is not None and (run_len > 1 or run_script in _UNSPACED):
        scripts.append(run_script)
      run_script, run_len = char_script, 0
    run_len += 1
  return scripts


def word_scripts(text: str) -> list[str]:
  """The script of each counted word token of `text`, in order."""
  scripts: list[str] = []
  for chunk in _MATH.sub(" ", text).split():  # No token spans whitespace.
    if chunk.isascii():  # The common case, quickly: ASCII letter runs are Latin tokens.
      scripts += ["Latin"] * len(_ASCII_WORD.findall(chunk))
    else:
      scripts += _run_scripts(chunk)
  return scripts


def target_scripts(prompt: str) -> frozenset[str]:
  """The scripts that count as the prompt's language; empty when it has no words."""
  counts = collections.Counter(word_scripts(prompt))
  if not counts:
    return frozenset()
  dominant = counts.most_common(1)[0][0]
  if dominant in ("Han", "Kana") and "Kana" in counts:
    return frozenset({"Han", "Kana"})
  return frozenset({dominant})


def language_consistency(prompts: list[str], completions: list[str],
                         **unused) -> list[float]:
  """Share of the reasoning's word tokens (inside <think>, else all) in the prompt's script."""
  del unused
  scores = []
  for prompt, completion in zip(prompts, completions, strict=True):
    target = target_scripts(prompt)
    words = word_scripts(extract.reasoning(extract.opened_think(prompt, completion)))
    if not target or not words:
      scores.append(1.0)
    else:
      scores.append(sum(w in target for w in words) / len(words))
  return scores
