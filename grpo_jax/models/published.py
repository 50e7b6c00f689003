"""The config.json files of published checkpoints (published_configs.json; where each came
from is in its "_sources"): the model shapes `python -m grpo_jax.aot` compiles for when
model.path names a checkpoint instead of a directory, and the tests' examples of config.json
layouts found in the wild."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from grpo_jax.errors import UserError

PATH = pathlib.Path(__file__).with_name("published_configs.json")


def configs() -> dict[str, dict[str, Any]]:
  """name -> config.json dict, e.g. "Qwen2.5-1.5B", "Llama-3.1-8B", "gemma-3-1b-it"."""
  published = json.loads(PATH.read_text())
  published.pop("_sources")
  return published


def config(name: str) -> dict[str, Any]:
  """The config.json of the checkpoint called name, matched without case, an "org/" prefix or
  an "-Instruct" suffix ("Qwen/Qwen2.5-7B-Instruct" is "Qwen2.5-7B"); a UserError listing
  the known names otherwise."""
  published = configs()
  key = name.strip().rsplit("/", 1)[-1].lower().removesuffix("-instruct")
  for known, hf in published.items():
    if known.lower() == key:
      return hf
  raise UserError(f"model.path={name!r} is neither a checkpoint directory nor a known model "
                  f"shape; known shapes: {', '.join(published)}")
