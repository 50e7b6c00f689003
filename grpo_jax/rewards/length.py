"""overlong: DAPO's soft punishment of completions that run into the length limit."""

from __future__ import annotations

from grpo_jax.errors import UserError


def overlong(prompts: list[str], completions: list[str], *,
             completion_lengths: list[int] | None = None,
             max_completion_length: int | None = None,
             overlong_buffer: int | None = None, **unused) -> list[float]:
  """DAPO eq. 13, with L = completion length, L_max = max_completion_length and
  L_cache = overlong_buffer (default L_max // 4):

      0                              if L <= L_max - L_cache
      (L_max - L_cache - L) / L_cache  if L_max - L_cache < L <= L_max
      -1                             if L > L_max
  """
  del prompts, unused
  if completion_lengths is None or max_completion_length is None:
    raise UserError("reward 'overlong' needs columns 'completion_lengths' and "
                    "'max_completion_length' (the trainer adds them)")
  l_max = int(max_completion_length)
  l_cache = l_max // 4 if overlong_buffer is None else int(overlong_buffer)
  if not 0 <= l_cache <= l_max:
    raise UserError(f"overlong_buffer={l_cache} is out of range; allowed: 0 to "
                    f"max_completion_length ({l_max})")
  if len(completion_lengths) != len(completions):
    raise ValueError("completion_lengths and completions differ in length")
  scores = []
  for length in completion_lengths:
    if length <= l_max - l_cache:
      scores.append(0.0)
    elif length <= l_max:
      scores.append((l_max - l_cache - length) / l_cache)
    else:
      scores.append(-1.0)
  return scores
