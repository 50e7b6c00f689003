"""Reward functions by name: the built-ins, "module:function", and "name:weight" specs.

Outcome rewards (`rewards`) and step rewards (`step_rewards`, process supervision) have
registries of their own.
"""

from __future__ import annotations

import dataclasses
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
from grpo_jax.rewards.steps import arithmetic_steps, countdown_steps

RewardFn = Callable[..., Sequence[Any]]

REGISTRY: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "format": format_strict,
    "format_lenient": format_lenient,
    "language_consistency": language_consistency,
    "overlong": overlong,
    "exact_match": exact_match,
}

# Step reward functions (process supervision), kept apart from the outcome ones above.
STEP_REGISTRY: dict[str, RewardFn] = {
    "arithmetic_steps": arithmetic_steps,
    "countdown_steps": countdown_steps,
}
# In `step_rewards`, the outcome total (`rewards`) as one more step at the last token.
OUTCOME_STEP = "outcome"


@dataclasses.dataclass(frozen=True)
class StepSpecs:
  """What `step_rewards` names: step reward functions with their weights, and the weight
  of the outcome step (0.0: none)."""
  functions: tuple[RewardSpec, ...]
  outcome_weight: float = 0.0


def _kind(registry: dict[str, RewardFn]) -> str:
  return "step reward" if registry is STEP_REGISTRY else "reward"


def _allowed(registry: dict[str, RewardFn]) -> str:
  names = [*registry, OUTCOME_STEP] if registry is STEP_REGISTRY else list(registry)
  return (f"allowed: built-in {_kind(registry)}s {', '.join(names)}, or a user function "
          "as module:function")


def resolve(name: str, registry: dict[str, RewardFn] = REGISTRY) -> RewardFn:
  """A built-in reward of `registry` by name, or a user function as "module:function"."""
  if name in registry:
    return registry[name]
  kind = _kind(registry)
  module_name, _, attr = name.partition(":")
  if not module_name or not attr:
    raise UserError(f"unknown {kind} {name!r}; {_allowed(registry)}")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    raise UserError(f"{kind} {name!r}: cannot import module {module_name!r} ({e}); "
                    f"{_allowed(registry)}") from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise UserError(f"{kind} {name!r}: module {module_name!r} has no function {attr!r}; "
                    f"{_allowed(registry)}")
  return fn


def _weight(text: str) -> float | None:
  """The number `text` spells, or None when it is not a number."""
  try:
    return float(text)
  except ValueError:
    return None


def _names_and_weights(spec: str, known: Sequence[str]) -> list[tuple[str, float]]:
  """"accuracy:1,format:0.5,pkg.mod:fn:2" -> [(name, weight)]; weights default to 1.

  "module:function" names hold a colon, so a weight is read from the right: the text
  after the last colon is the weight when it is a number, else part of the name.
  """
  items: list[tuple[str, float]] = []
  for item in spec.split(","):
    item = item.strip()
    if not item:
      raise UserError(f"rewards {spec!r} has an empty entry; expected name[:weight] "
                      "separated by commas, e.g. accuracy:1,format:0.5")
    name, _, tail = item.rpartition(":")
    weight = _weight(tail) if name else None
    if weight is None and name.strip() in known:
      raise UserError(f"reward {item!r} has weight {tail!r}; allowed: a number, "
                      "e.g. accuracy:0.5")
    if weight is None:
      name, weight = item, 1.0
    name = name.strip()
    if not math.isfinite(weight):
      raise UserError(f"reward {name!r} has weight {tail!r}; allowed: a finite number")
    if any(n == name for n, _ in items):
      raise UserError(f"reward {name!r} is listed twice in {spec!r}; list each once")
    items.append((name, weight))
  return items


def parse_spec(spec: str) -> tuple[RewardSpec, ...]:
  """"accuracy:1,format:0.5,pkg.mod:fn:2" -> RewardSpecs of outcome reward functions;
  weights default to 1 (see `_names_and_weights`)."""
  return tuple(RewardSpec(name=name, fn=resolve(name), weight=weight)
               for name, weight in _names_and_weights(spec, tuple(REGISTRY)))


def parse_step_spec(spec: str) -> StepSpecs:
  """"arithmetic_steps:1,outcome:0.5,pkg.mod:fn" -> StepSpecs: step reward functions
  (STEP_REGISTRY or "module:function") and the weight of "outcome" (0.0 when absent)."""
  items = _names_and_weights(spec, (*STEP_REGISTRY, OUTCOME_STEP))
  outcome = [weight for name, weight in items if name == OUTCOME_STEP]
  functions = tuple(RewardSpec(name=name, fn=resolve(name, STEP_REGISTRY), weight=weight)
                    for name, weight in items if name != OUTCOME_STEP)
  return StepSpecs(functions=functions, outcome_weight=outcome[0] if outcome else 0.0)
