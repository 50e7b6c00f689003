"""Rule-based rewards: the DeepSeek-R1 recipe's built-ins, a registry, a safe runner.

A reward function has the shape `fn(prompts, completions, **columns) -> list[float |
None]` and ignores the columns it does not know; None means "no score" for that row.
"""

from grpo_jax.rewards.extract import extract_answer
from grpo_jax.rewards.registry import REGISTRY, RewardFn, parse_spec, resolve
from grpo_jax.rewards.runner import RewardResult, RewardSpec, compute

__all__ = ["REGISTRY", "RewardFn", "RewardResult", "RewardSpec", "compute",
           "extract_answer", "parse_spec", "resolve"]
