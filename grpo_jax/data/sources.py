"""Prompt rows from a data source: synthetic tasks, JSONL files or TFDS datasets.

A row is a dict with at least "prompt" and "answer" (strings); every other column is
kept and reaches the reward functions as a keyword argument.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from absl import logging

from grpo_jax.data.synthetic import synthetic_rows
from grpo_jax.errors import UserError

SOURCE_FORMS = "synthetic:<task>, jsonl:<file>, tfds:<name>[:split]"
REQUIRED = ("prompt", "answer")
# load_rows' split names that differ in TFDS.
_TFDS_SPLITS = {"eval": "test"}
# Modules holding the legacy TFDS text builders (gsm8k among them); tensorflow_datasets
# imports them lazily, so a name lookup fails until they are imported.
_TFDS_TEXT_MODULES = ("text", "question_answering", "summarization", "structured")


def _quoted(keys: Sequence[str]) -> str:
  return " and ".join(f'"{k}"' for k in keys)


class BadRow(ValueError):
  """A row that cannot become a prompt row; the message says why."""


def check_row(row: Any, required: Sequence[str] = REQUIRED) -> dict:
  """Returns row if it holds the required columns as strings (a number "answer" becomes one)."""
  if not isinstance(row, dict):
    raise BadRow(f"expected an object with {_quoted(required)}, got {type(row).__name__}")
  for key in required:
    if key not in row:
      raise BadRow(f"row has no \"{key}\" field")
    value = row[key]
    if key == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
      row = {**row, key: str(value)}
    elif not isinstance(value, str):
      raise BadRow(f"\"{key}\" must be a string" + (" or a number" if key == "answer" else ""))
  if row.get("prompt") == "":
    raise BadRow("\"prompt\" is empty")
  return row


def gsm8k_row(example: dict) -> dict:
  """GSM8K: question -> prompt; answer = text after "####" without thousands commas.

  The worked solution before "####" becomes "reasoning".
  """
  if "question" not in example or "answer" not in example:
    raise BadRow("a GSM8K example needs \"question\" and \"answer\"")
  solution, sep, final = example["answer"].rpartition("####")
  if not sep:
    raise BadRow("GSM8K answer has no \"####\" line")
  return {"prompt": example["question"].strip(), "answer": final.strip().replace(",", ""),
          "reasoning": solution.strip(), "task": "gsm8k"}


# TFDS datasets whose examples need converting into rows; any other dataset must have
# "prompt" and "answer" features.
_TFDS_CONVERTERS = {"gsm8k": gsm8k_row}


def _collect(examples: Iterable[tuple[Any, Any]], convert, *, where: str, required: Sequence[str],
             skip_bad_rows: bool, num_rows: int | None, stats: dict | None) -> list[dict]:
  """Converts (position, example) pairs into rows, skipping or raising on bad ones."""
  rows, skipped = [], 0
  for position, example in examples:
    if num_rows is not None and len(rows) >= num_rows:
      break
    try:
      rows.append(check_row(convert(example), required))
    except BadRow as e:
      if not skip_bad_rows:
        raise UserError(f"{where}:{position}: {e}; fix the row or set skip_bad_rows") from None
      skipped += 1
  if skipped:
    logging.warning("%s: skipped %d bad rows", where, skipped)
  if stats is not None:
    stats["skipped_rows"] = skipped
  if not rows:
    raise UserError(f"{where} holds no usable rows; each needs {_quoted(required)}")
  return rows


def _jsonl_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, text) of every non-blank line."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        yield number, line


def _parse_json(line: str) -> Any:
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    raise BadRow(f"not valid JSON ({e.msg})") from None


def read_jsonl(path: str, **kwargs) -> list[dict]:
  """Rows of a JSONL file, one object per line (blank lines are ignored)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise UserError(f"data file {path} does not exist; data.source jsonl:<file> needs a JSONL file")
  try:
    return _collect(_jsonl_lines(path), _parse_json, where=path, **kwargs)
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text ({e.reason}); JSONL files must be UTF-8") from None


def _to_python(value: Any) -> Any:
  """TFDS feature values (bytes, numpy) -> JSON-able Python values."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
    return [_to_python(v) for v in value.tolist()]
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  return value


def read_tfds(name: str, split: str, *, data_dir: str | None = None, **kwargs) -> list[dict]:
  """Rows of a prepared TFDS dataset, read through tfds.data_source (no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  for module in _TFDS_TEXT_MODULES:
    importlib.import_module(f"tensorflow_datasets.{module}")
  prepare = (f"prepare it with `tfds build {name} --file_format=array_record`"
             " and point data_dir (or TFDS_DATA_DIR) at its data dir")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"unknown TFDS dataset {name!r}; use a name from the TFDS catalog"
                    " (e.g. gsm8k) or a tfds builder you registered") from None
  except (NotImplementedError, KeyError):
    raise UserError(f"TFDS dataset {name!r} is not prepared in array_record format;"
                    f" {prepare}") from None
  except ValueError as e:
    raise UserError(f"TFDS dataset {name!r}: {str(e).splitlines()[0]}") from None
  convert = _TFDS_CONVERTERS.get(name.split("/")[0], lambda example: example)
  examples = ((i, _to_python(source[i])) for i in range(len(source)))
  return _collect(examples, convert, where=f"tfds:{name}:{split}", **kwargs)


def load_rows(source: str, *, split: str = "train", seed: int = 0, num_rows: int | None = None,
              skip_bad_rows: bool = False, required: Sequence[str] = REQUIRED,
              stats: dict | None = None, data_dir: str | None = None) -> list[dict]:
  """Rows of a data source: "synthetic:<task>" | "jsonl:<file>" | "tfds:<name>[:split]".

  split: for synthetic tasks "train" or "eval" (disjoint; use them instead of
  split_eval); for TFDS the split to read when the source names none ("eval" reads
  "test"); a JSONL file is one split whatever the name (hold rows out with split_eval).
  num_rows caps the rows (synthetic default 10000 train, 1000 eval). required: the
  columns every JSONL/TFDS row must hold. skip_bad_rows skips malformed rows instead of
  raising UserError; stats, when given, receives "skipped_rows". data_dir: the TFDS data
  dir (default TFDS_DATA_DIR).
  """
  kind, sep, rest = source.partition(":")
  if not sep or not rest:
    kind = ""
  if kind == "synthetic":
    rows = synthetic_rows(rest, split=split, seed=seed, num_rows=num_rows)
    if stats is not None:
      stats["skipped_rows"] = 0
    return rows
  read_kwargs = dict(required=required, skip_bad_rows=skip_bad_rows, num_rows=num_rows,
                     stats=stats)
  if kind == "jsonl":
    return read_jsonl(rest, **read_kwargs)
  if kind == "tfds":
    name, _, named_split = rest.partition(":")
    split = named_split or _TFDS_SPLITS.get(split, split)
    return read_tfds(name, split, data_dir=data_dir, **read_kwargs)
  raise UserError(f"unknown data.source {source!r}; allowed: {SOURCE_FORMS}")


def split_eval(rows: list[dict], num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
  """Holds out num_eval rows chosen by a seeded permutation; both parts keep row order."""
  if not 0 <= num_eval <= len(rows):
    raise UserError(f"cannot hold out {num_eval} eval rows from {len(rows)} rows;"
                    f" allowed 0..{len(rows)}")
  held = np.zeros(len(rows), bool)
  held[np.random.default_rng(seed).permutation(len(rows))[:num_eval]] = True
  return ([r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h])


def sft_target(row: dict) -> str:
  """The SFT warm-start completion: reasoning in <think>, the answer in <answer>.

  Countdown rows answer with their "solution" expression rather than the target; rows
  with an "sft_answer" (synthetic:arithmetic's wrong_answers option) answer with it.
  """
  if "reasoning" not in row:
    raise UserError("the SFT warm start needs a \"reasoning\" column in every row;"
                    " synthetic tasks and GSM8K have one")
  answer = row.get("solution", row.get("sft_answer", row["answer"]))
  return f"<think>\n{row['reasoning']}\n</think>\n<answer>\n{answer}\n</answer>"
