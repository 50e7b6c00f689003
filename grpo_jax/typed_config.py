"""Frozen dataclasses as a typed config schema: to an ml_collections.ConfigDict (a
placeholder for every field that may be None) and back, with each value checked against
its field's type hint. Knows nothing of grpo_jax's keys (config.py holds them)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Mapping

import ml_collections
from ml_collections import config_dict

from grpo_jax.errors import UserError


def _optional_base(hint: Any) -> Any:
  """X for Optional[X], else None."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0]
  return None


def to_config_dict(instance: Any) -> ml_collections.ConfigDict:
  """The dataclass instance as a ConfigDict (None fields: placeholders of their type)."""
  cfg = ml_collections.ConfigDict()
  hints = typing.get_type_hints(type(instance))
  for f in dataclasses.fields(instance):
    value = getattr(instance, f.name)
    base = _optional_base(hints[f.name])
    if dataclasses.is_dataclass(value):
      cfg[f.name] = to_config_dict(value)
    elif value is None and base is not None:
      cfg[f.name] = config_dict.placeholder(base)
    else:
      cfg[f.name] = value
  return cfg


def _type_name(hint: Any) -> str:
  base = _optional_base(hint)
  if base is not None:
    return f"{_type_name(base)} or None"
  if typing.get_origin(hint) is tuple:
    return "a tuple of ints"
  return hint.__name__


def _coerce(key: str, value: Any, hint: Any) -> Any:
  """Checks `value` against the type hint; ints are accepted where floats are."""
  base = _optional_base(hint)
  if base is not None and value is None:
    return None
  expected = hint if base is None else base
  if expected is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif expected is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif typing.get_origin(expected) is tuple:
    ok = isinstance(value, (tuple, list)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
    value = tuple(value) if ok else value
  else:
    ok = isinstance(value, expected)
  if not ok:
    raise UserError(f"config key {key}={value!r}: expected {_type_name(hint)}, "
                    f"got {type(value).__name__}")
  return value


def build(cls: type, values: Mapping[str, Any], prefix: str,
          unknown_key: Callable[[str], Exception]) -> Any:
  """Builds dataclass `cls` from nested `values`; absent keys take their defaults. A key
  that `cls` lacks raises unknown_key(its dotted name)."""
  hints = typing.get_type_hints(cls)
  for name in values:
    if name not in hints:
      raise unknown_key(prefix + name)
  kwargs = {}
  for name, hint in hints.items():
    if name not in values:
      continue
    key, value = prefix + name, values[name]
    if dataclasses.is_dataclass(hint):
      if not isinstance(value, Mapping):
        raise UserError(f"config key {key}={value!r}: expected a section with keys "
                        f"{', '.join(k for k, _ in flat_items(hint()))}")
      kwargs[name] = build(hint, value, key + ".", unknown_key)
    else:
      kwargs[name] = _coerce(key, value, hint)
  return cls(**kwargs)


def flat_items(instance: Any, prefix: str = "") -> list[tuple[str, Any]]:
  """(dotted key, value) of every leaf field of the dataclass instance, in field order."""
  items = []
  for f in dataclasses.fields(instance):
    value = getattr(instance, f.name)
    if dataclasses.is_dataclass(value):
      items += flat_items(value, f"{prefix}{f.name}.")
    else:
      items.append((prefix + f.name, value))
  return items
