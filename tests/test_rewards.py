"""Rule-based rewards, the registry and the runner (grpo_jax.rewards)."""

import logging
import threading
import time

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from grpo_jax import rewards
from grpo_jax.errors import UserError
from grpo_jax.rewards import accuracy as accuracy_lib
from grpo_jax.rewards import countdown, extract, language

ACCURACY_CASES = [  # (completion, gold, expected reward)
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"first \boxed{3}, then \boxed{\frac{\sqrt{4}}{4}}", r"\frac{1}{2}", 1.0),  # last, nested
    (r"\boxed{\frac{1}{2}} and then \boxed{0.5", "0.5", 1.0),  # unclosed last box is skipped
    ("<think>\n2+2\n</think>\n<answer>\n4\n</answer>", "4", 1.0),
    ("<answer>1/2</answer>", r"$\frac{1}{2}$", 1.0),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", 1.0),
    ("#### 1,000", "1000", 1.0),
    (r"\boxed{\dfrac{2}{4}}", "Half of it is #### 0.5", 1.0),  # gold read the same way
    (r"\boxed{0.51}", "0.5", 0.0),
    ("<answer>5</answer>", "4", 0.0),
    ("The answer is 4.", "4", 0.0),  # no final answer
    (r"\boxed{4}", "", None),  # unparseable gold
    (r"\boxed{4}", None, None),
]


def score(fn, completions, prompts=None, **columns):
  prompts = prompts if prompts is not None else ["Q"] * len(completions)
  return fn(prompts, completions, **columns)


# Extraction.


def test_final_answer_priority_and_braces():
  assert extract.last_boxed(r"\boxed{a} x \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
  assert extract.last_boxed(r"\boxed{1} \boxed{2") == "1"
  assert extract.last_boxed("no box") is None
  assert extract.final_answer(r"<answer>\boxed{3}</answer> <answer>4</answer>") == "3"
  assert extract.final_answer("<answer>1</answer><answer> 2 </answer>\n#### 9") == "2"
  assert extract.final_answer("x\n#### 12 \nmore") == "12"
  assert extract.final_answer("12") is None
  assert extract.last_number("3 apples cost $1,250.50 total") == "1,250.50"
  assert rewards.extract_answer("so it is 1,234.") == "1234"
  assert rewards.extract_answer(r"\boxed{ 1 000 }") == "1000"
  assert rewards.extract_answer("none") is None


# accuracy.


def test_accuracy_hand_written_cases():
  completions, golds, expected = zip(*ACCURACY_CASES)
  assert score(rewards.REGISTRY["accuracy"], list(completions), answer=list(golds)) == list(expected)


def test_accuracy_without_answer_column_is_a_user_error():
  with pytest.raises(UserError, match="answer"):
    score(rewards.REGISTRY["accuracy"], [r"\boxed{1}"])


def test_accuracy_kills_a_runaway_check_and_goes_on(monkeypatch):
  # sympy computes 9^(9^9) holding the GIL: only killing the child process stops it.
  monkeypatch.setattr(accuracy_lib, "CHECK_TIMEOUT_S", 1.0)
  completions = [r"\boxed{9^{9^{9}}}", r"\boxed{3}", r"\boxed{3}", r"\boxed{2}"]
  assert score(rewards.REGISTRY["accuracy"], completions, answer=["3"] * 4) == [0.0, 1.0, 1.0, 0.0]


def test_accuracy_in_compute_from_a_worker_thread():
  completions, golds, expected = zip(*ACCURACY_CASES)
  specs = rewards.parse_spec("accuracy")
  out = {}
  thread = threading.Thread(target=lambda: out.setdefault("r", rewards.compute(
      specs, ["Q"] * len(completions), list(completions), {"answer": list(golds)})))
  thread.start()
  thread.join(60)
  result = out["r"]
  want = np.asarray([np.nan if e is None else e for e in expected], np.float32)
  np.testing.assert_array_equal(result.per_fn["accuracy"], want)
  np.testing.assert_array_equal(result.total, np.nan_to_num(want))
  assert result.num_failed == 0


# format / format_lenient.


@pytest.mark.parametrize("completion, strict, lenient", [
    ("<think>\nreason\n</think>\n<answer>\n42\n</answer>", 1.0, 1.0),
    ("<think>\nreason\n</think>\n<answer>\n42\n</answer>\n", 1.0, 1.0),  # trailing space ok
    ("<think>reason</think><answer>42</answer>", 0.0, 1.0),  # no newlines
    ("<think>\nreason\n</think>\n\n<answer>\n42\n</answer>", 0.0, 1.0),
    ("<think>\nreason\n</think>\nThe answer is \\boxed{42}.", 0.0, 1.0),
    ("<think>\nreason\n</think>\n<answer>\n42\n</answer> extra", 0.0, 1.0),
    ("<think>\n\n</think>\n<answer>\n42\n</answer>", 0.0, 0.0),  # blank reasoning
    ("<think>\nreason\n</think>\n<answer>\n \n</answer>", 0.0, 1.0),  # blank answer, tags count
    ("<think>\nreason\n</think>   ", 0.0, 0.0),  # no answer text
    ("intro <think>\nreason\n</think>\n<answer>\n42\n</answer>", 0.0, 0.0),
    ("<think>\na\n</think>\n<think>\nb\n</think>\n<answer>\n42\n</answer>", 0.0, 0.0),
    ("<think>\na <answer>\n1\n</answer>\n</think>\n<answer>\n42\n</answer>", 0.0, 0.0),
    ("<answer>\n42\n</answer>", 0.0, 0.0),
    ("just 42", 0.0, 0.0),
])
def test_format_strict_and_lenient(completion, strict, lenient):
  assert score(rewards.REGISTRY["format"], [completion]) == [strict]
  assert score(rewards.REGISTRY["format_lenient"], [completion]) == [lenient]


def test_format_reads_a_think_tag_left_open_by_the_prompt():
  prompt = "<|im_start|>assistant\n<think>\n"
  completion = "reason\n</think>\n<answer>\n42\n</answer>"
  assert rewards.REGISTRY["format"]([prompt], [completion]) == [1.0]
  assert rewards.REGISTRY["format_lenient"]([prompt], [completion]) == [1.0]
  assert rewards.REGISTRY["format"](["no tag"], [completion]) == [0.0]


# language_consistency.


def test_word_scripts():
  text = r"Let x be $\frac{a}{b}$ 我们计算 \sqrt{2} 3.5, これは Привет"
  assert language.word_scripts(text) == (
      ["Latin", "Latin"] + ["Han"] * 4 + ["Kana"] * 3 + ["Cyrillic"])
  assert language.word_scripts("नमस्ते दुनिया") == ["Devanagari", "Devanagari"]
  assert language.target_scripts("日本語で答えてください") == {"Han", "Kana"}
  assert language.target_scripts("用中文回答这个问题 please") == {"Han"}
  assert language.target_scripts("2 + 2 = ?") == frozenset()


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.text(alphabet="ab Zé\u0301x1_.,我のДा\u094d\u0915\n$", max_size=40))
def test_word_scripts_fast_path_matches_char_by_char(text):
  assert language.word_scripts(text) == language._run_scripts(language._MATH.sub(" ", text))


@pytest.mark.parametrize("prompt, completion, expected", [
    ("Solve the equation.", "<think>First we add both sides.</think> 4", 1.0),
    ("解这个方程。", "<think>首先两边相加。</think> 4", 1.0),
    ("Solve the equation.", "<think>首先两边相加。</think> 4", 0.0),
    ("解这个方程。", "<think>首先 add 两边 then 相加</think>", 6 / 8),
    ("Solve it.", "<think>We get 好的 result</think>", 3 / 5),
    ("Solve it.", "We get 好的 result", 3 / 5),  # no think tag: the whole completion
    ("Solve it.", "<think>$x^2 = 4$, 2 + 2</think> 中文答案", 1.0),  # nothing counted
    ("Löse die Gleichung für x.", "<think>Für x gilt: größer als drei</think>", 1.0),
    ("Реши уравнение.", "<think>Сначала let us сложим</think>", 2 / 4),
    ("日本語で答えてください。", "<think>答えは四です</think>", 1.0),  # kana and Han
])
def test_language_consistency(prompt, completion, expected):
  assert score(rewards.REGISTRY["language_consistency"], [completion], [prompt]) == [
      pytest.approx(expected)]


# overlong.


def test_overlong_boundaries():
  lengths = [0, 74, 75, 76, 80, 99, 100, 101, 500]
  got = score(rewards.REGISTRY["overlong"], ["c"] * len(lengths), completion_lengths=lengths,
              max_completion_length=100)  # buffer 25: punished from 76 on
  assert got == pytest.approx([0, 0, 0, -1 / 25, -5 / 25, -24 / 25, -1, -1, -1])
  got = score(rewards.REGISTRY["overlong"], ["c"] * 3, completion_lengths=[10, 11, 12],
              max_completion_length=11, overlong_buffer=0)
  assert got == [0.0, 0.0, -1.0]


def test_overlong_matches_trl():
  trl_rewards = pytest.importorskip("trl.rewards")
  lengths = list(range(0, 140, 3))
  for buffer in (1, 20, 64):
    reference = trl_rewards.get_soft_overlong_punishment(128, buffer)([[0] * n for n in lengths])
    got = score(rewards.REGISTRY["overlong"], ["c"] * len(lengths), completion_lengths=lengths,
                max_completion_length=128, overlong_buffer=buffer)
    assert got == pytest.approx(reference)


def test_overlong_user_errors():
  with pytest.raises(UserError, match="completion_lengths"):
    score(rewards.REGISTRY["overlong"], ["c"])
  with pytest.raises(UserError, match="overlong_buffer"):
    score(rewards.REGISTRY["overlong"], ["c"], completion_lengths=[1], max_completion_length=8,
          overlong_buffer=9)


# exact_match and countdown.


def test_exact_match():
  completions = [r"so \boxed{1,234}", "12 then 15", "<answer> 7 </answer> then 8", "#### 7.",
                 "no number", r"\boxed{}"]
  got = score(rewards.REGISTRY["exact_match"], completions,
              answer=["1234", "15", "7", "7", "0", "0"])
  assert got == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("expression, numbers, expected", [  # target 24
    ("(6 - 2) * 5 + 4", [2, 4, 5, 6], True),
    ("4 + 5 * (6 - 2)", [6, 5, 4, 2], True),
    (r"(6 - 2) \times 5 + 4", [2, 4, 5, 6], True),
    ("6 * 4", [2, 4, 5, 6], True),  # not every number is needed
    ("-(-6 * 4)", [4, 6], True),
    ("6 / 2 * 8", [2, 6, 8], True),
    ("(" * 50 + "6 * 4" + ")" * 50, [4, 6], True),
    ("6 * 4 * 1", [2, 4, 5, 6], False),  # 1 is not given
    ("4 * 4 + 4 + 4", [2, 4, 5, 6], False),  # 4 used four times
    ("24", [2, 4, 5, 6], False),
    ("(6 - 2) * 5 + 5", [2, 4, 5, 6], False),  # 25
    ("6 // 2 * 8", [2, 6, 8], False),  # floor division is not allowed
    ("6 ** 2 - 12", [2, 6, 12], False),
    ("4 * 6 = 24", [4, 6, 24], False),
    ("6.0 * 4", [4, 6], False),
    ("True * 24", [24], False),
    ("(lambda: 24)()", [24], False),
    ("__import__('os').getpid() * 0 + 24", [0, 24], False),
    ("6 / (4 - 4) + 24", [4, 4, 6, 24], False),
    ("6 *", [4, 6], False),
])
def test_countdown_solves(expression, numbers, expected):
  assert countdown.solves(expression, numbers, "24") is expected


def test_countdown_uses_exact_fractions():
  assert countdown.solves("(1 / 3 + 1 / 3 + 1 / 3) * 7", [1, 3, 1, 3, 1, 3, 7], "7")
  assert countdown.solves("5 / 3 * 3", [5, 3, 3], "5")
  assert not countdown.solves("5 / 3", [5, 3], "1")


def test_exact_match_dispatches_countdown_rows():
  completions = ["<answer>(6 - 2) * 5 + 4</answer>", "<answer>24</answer>", "#### 24",
                 "<answer>(6 - 2) * 5 + 4</answer>"]
  got = score(rewards.REGISTRY["exact_match"], completions, answer=["24"] * 4,
              task=["countdown", "countdown", "arithmetic", "countdown"],
              numbers=[[2, 4, 5, 6], [2, 4, 5, 6], None, [2, 4, 5]])
  assert got == [1.0, 0.0, 1.0, 0.0]


# Registry.


def demo_reward(prompts, completions, **unused):
  """A user reward for the registry tests: the completion's length."""
  return [float(len(c)) for c in completions]


def test_parse_spec_weights_and_user_functions():
  specs = rewards.parse_spec(
      "accuracy:1, format:0.5,tests.test_rewards:demo_reward:-2,format_lenient")
  assert [(s.name, s.weight) for s in specs] == [
      ("accuracy", 1.0), ("format", 0.5), ("tests.test_rewards:demo_reward", -2.0),
      ("format_lenient", 1.0)]
  assert specs[0].fn is rewards.REGISTRY["accuracy"]
  assert specs[2].fn is demo_reward
  (spec,) = rewards.parse_spec("tests.test_rewards:demo_reward")
  assert (spec.fn, spec.weight) == (demo_reward, 1.0)
  assert rewards.resolve("overlong") is rewards.REGISTRY["overlong"]
  assert set(rewards.REGISTRY) == {"accuracy", "format", "format_lenient",
                                   "language_consistency", "overlong", "exact_match"}


@pytest.mark.parametrize("parse, spec, message", [
    (rewards.parse_spec, "", "empty entry"),
    (rewards.parse_spec, "accuracy,,format", "empty entry"),
    (rewards.parse_spec, "acuracy", "unknown reward 'acuracy'.*exact_match"),
    (rewards.parse_spec, "accuracy:high", "weight 'high'"),
    (rewards.parse_spec, "accuracy:nan", "finite"),
    (rewards.parse_spec, "accuracy,accuracy:2", "listed twice"),
    (rewards.parse_spec, "no_such_module_xyz:fn",
     "cannot import module 'no_such_module_xyz'.*accuracy"),
    (rewards.parse_spec, "tests.test_rewards:no_such_fn", "no function 'no_such_fn'"),
    (rewards.parse_spec, "tests.test_rewards:ACCURACY_CASES", "no function 'ACCURACY_CASES'"),
    (rewards.parse_spec, "arithmetic_steps", "unknown reward 'arithmetic_steps'"),
    (rewards.parse_step_spec, "exact_match",
     "unknown step reward 'exact_match'.*arithmetic_steps, countdown_steps, outcome"),
    (rewards.parse_step_spec, "outcome:x", "weight 'x'"),
    (rewards.parse_step_spec, "outcome,outcome:2", "listed twice"),
    (rewards.parse_step_spec, "arithmetic_steps,,outcome", "empty entry"),
])
def test_parse_spec_errors(parse, spec, message):
  with pytest.raises(UserError, match=message) as info:
    parse(spec)
  assert "\n" not in str(info.value)


# The runner.


def _spec(name, fn, weight=1.0):
  return rewards.RewardSpec(name=name, fn=fn, weight=weight)


def test_compute_failures_become_nan_and_are_counted(caplog):
  def raising(prompts, completions, **unused):
    raise RuntimeError("boom")

  def some_none(prompts, completions, **unused):
    return [None, 2.0, float("nan")]

  def short(prompts, completions, **unused):
    return [1.0]

  def junk(prompts, completions, **unused):
    return ["1.0", 1e39, np.float64(3.0)]

  specs = [_spec("raising", raising), _spec("none", some_none, 0.5), _spec("short", short),
           _spec("junk", junk, 2.0), _spec("len", demo_reward, -1.0)]
  columns = {"answer": ["a", "b", "c"]}
  with caplog.at_level(logging.WARNING):
    result = rewards.compute(specs, ["p"] * 3, ["x", "yy", "zzz"], columns)
    rewards.compute(specs, ["p"] * 3, ["x", "yy", "zzz"], columns)
  nan = np.nan
  np.testing.assert_array_equal(result.per_fn["raising"], [nan] * 3)
  np.testing.assert_array_equal(result.per_fn["none"], [nan, 2.0, nan])
  np.testing.assert_array_equal(result.per_fn["short"], [nan] * 3)
  np.testing.assert_array_equal(result.per_fn["junk"], [nan, nan, 3.0])
  np.testing.assert_array_equal(result.total, [-1.0, 1.0 - 2.0, 6.0 - 3.0])
  assert result.total.dtype == np.float32 and result.per_fn["none"].dtype == np.float32
  assert result.num_failed == 3 + 3 + 2
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 3  # raising, short, junk: once each over both calls
  assert any("boom" in w for w in warnings)


def test_compute_times_out_a_hung_function_and_stops_its_thread():
  stopped = threading.Event()

  def hung(prompts, completions, **unused):
    try:
      while True:
        time.sleep(0.01)
    finally:
      stopped.set()

  specs = [_spec("hung", hung), _spec("len", demo_reward)]
  result = rewards.compute(specs, ["p", "p"], ["a", "bb"], {}, timeout_s=0.3)
  np.testing.assert_array_equal(result.per_fn["hung"], [np.nan, np.nan])
  np.testing.assert_array_equal(result.total, [1.0, 2.0])
  assert result.num_failed == 2
  assert stopped.wait(10)


def test_compute_passes_columns_and_reraises_user_errors():
  seen = {}

  def record(prompts, completions, *, answer, extra, **unused):
    seen.update(prompts=prompts, answer=answer, extra=extra)
    answer.append("mutated")
    return [0.0] * len(completions)

  specs = [_spec("record", record), _spec("record2", record)]
  answers = ["1", "2"]
  rewards.compute(specs, ["p", "q"], ["a", "b"], {"answer": answers, "extra": 7})
  assert seen["prompts"] == ["p", "q"] and seen["extra"] == 7 and answers == ["1", "2"]
  with pytest.raises(UserError, match="answer"):
    rewards.compute(rewards.parse_spec("exact_match"), ["p"], ["a"], {})
