"""evaluate's vote and scoring, directly: majority vote over extracted answers and the
pass@1 / maj@k figures that come from it."""

import pytest

from grpo_jax import evaluate


@pytest.mark.parametrize("answers, correct, want", [
    (["5", "5", "7"], [True, True, False], True),     # the majority is right
    (["5", "7", "7"], [True, False, False], False),   # the majority is wrong
    (["7", "5", "5", None, None, None], [False, True, True, False, False, False], True),
    # no answer never wins, even when most samples have none
    ([None, None, "5"], [False, False, True], True),
    ([None, None, None], [False, False, False], False),
    (["7", "5"], [False, True], False),               # a tie goes to the first seen
    (["5", "7"], [True, False], True),
])
def test_majority_vote(answers, correct, want):
  assert evaluate.majority_correct(answers, correct) is want
