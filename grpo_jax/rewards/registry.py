"""Reward functions by name: the built-ins, "module:function", and "name:weight" specs."""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Sequence

from grpo_jax.errors import UserError
from grpo_jax.rewards.accuracy import accuracy
from grpo_jax.rewards.exact import exact_match
from grpo_jax.rewards.format import format_lenient, format_strict
from grpo_jax.rewards.language import language_consistency
from grpo_jax.rewards.length import overlong
from grpo_jax.rewards.runner import RewardSpec

RewardFn = Callable[..., Sequence[Any]]

REGISTRY: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "format": format_strict,
    "format_lenient": format_lenient,
    "language_consistency": language_consistency,
    "overlong": overlong,
    "exact_match": exact_match,
}

_ALLOWED = ("allowed: built-in rewards " + ", ".join(REGISTRY)
            + ", or a user function as module:function")


def resolve(name: str) -> RewardFn:
  """A built-in reward by name, or a user function given as "module:function"."""
  if name in REGISTRY:
    return REGISTRY[name]
  module_name, _, attr = name.partition(":")
  if not module_name or not attr:
    raise UserError(f"unknown reward {name!r}; {_ALLOWED}")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    raise UserError(f"reward {name!r}: cannot import module {module_name!r} ({e}); "
                    f"{_ALLOWED}") from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise UserError(f"reward {name!r}: module {module_name!r} has no function {attr!r}; "
                    f"{_ALLOWED}")
  return fn


def _weight(text: str) -> float | None:
  """The number `text` spells, or None when it is not a number."""
  try:
    return float(text)
  except ValueError:
    return None


def parse_spec(spec: str) -> tuple[RewardSpec, ...]:
  """"accuracy:1,format:0.5,pkg.mod:fn:2" -> RewardSpecs; weights default to 1.

  "module:function" names hold a colon, so a weight is read from the right: the text
  after the last colon is the weight when it is a number, else part of the name.
  """
  specs = []
  for item in spec.split(","):
    item = item.strip()
    if not item:
      raise UserError(f"rewards {spec!r} has an empty entry; expected name[:weight] "
                      "separated by commas, e.g. accuracy:1,format:0.5")
    name, _, tail = item.rpartition(":")
    weight = _weight(tail) if name else None
    if weight is None and name.strip() in REGISTRY:
      raise UserError(f"reward {item!r} has weight {tail!r}; allowed: a number, "
                      "e.g. accuracy:0.5")
    if weight is None:
      name, weight = item, 1.0
    name = name.strip()
    if not math.isfinite(weight):
      raise UserError(f"reward {name!r} has weight {tail!r}; allowed: a finite number")
    if any(s.name == name for s in specs):
      raise UserError(f"reward {name!r} is listed twice in {spec!r}; list each once")
    specs.append(RewardSpec(name=name, fn=resolve(name), weight=weight))
  return tuple(specs)
