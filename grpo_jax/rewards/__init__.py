"""Rule-based rewards: the DeepSeek-R1 recipe's built-ins, a registry, a safe runner.

A reward function has the shape `fn(prompts, completions, **columns) -> list[float |
None]` and ignores the columns it does not know; None means "no score" for that row.
A step reward function (process supervision) has the shape `fn(prompts, completions,
**columns) -> list[list[tuple[int, float]] | None]`: per completion, (character offset
where a step ends, reward) pairs; see `rewards.steps`.
"""

from grpo_jax.rewards.extract import extract_answer
from grpo_jax.rewards.registry import (OUTCOME_STEP, REGISTRY, STEP_REGISTRY, RewardFn,
                                       StepSpecs, parse_spec, parse_step_spec, resolve)
from grpo_jax.rewards.runner import RewardResult, RewardSpec, StepResult, compute, compute_steps

__all__ = ["OUTCOME_STEP", "REGISTRY", "RewardFn", "RewardResult", "RewardSpec",
           "STEP_REGISTRY", "StepResult", "StepSpecs", "compute", "compute_steps",
           "extract_answer", "parse_spec", "parse_step_spec", "resolve"]
