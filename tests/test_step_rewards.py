"""Process supervision outside the train step: step reward functions, their runner and
registry, character-to-token mapping and the fixed-size step arrays (process_scoring)."""

import random

import numpy as np
import pytest

from grpo_jax import advantages, data, process_scoring, rewards
from grpo_jax.data import sources, synthetic
from grpo_jax.errors import UserError
from grpo_jax.rewards import columns as columns_lib
from grpo_jax.rewards import extract, steps
from tests import tiny_hf

ADD = "Compute 57+68.\n" + synthetic.INSTRUCTION  # 57+68=125: two carries


def think(*lines, answer="125"):
  return "<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>\n{answer}\n</answer>"


def ends_of(completion, *pieces):
  """The offsets just past each piece, found left to right."""
  out, start = [], 0
  for piece in pieces:
    start = completion.index(piece, start) + len(piece)
    out.append(start)
  return out


def arithmetic(completion):
  (got,) = steps.arithmetic_steps([ADD], [completion], task=["arithmetic"])
  return got


def countdown(completion):
  """Steps of a completion for the countdown game 2, 4, 5, 6 -> 24."""
  (got,) = steps.countdown_steps(["P"], [completion], answer=["24"], numbers=[[2, 4, 5, 6]],
                                 task=["countdown"])
  return got


# Column arithmetic and the extraction offsets the step functions rely on.


@pytest.mark.parametrize("op", "+-*")
def test_columns_add_up_to_the_result(op):
  rng = random.Random(op)
  for _ in range(300):
    a, b = rng.randint(0, 10**6), rng.randint(2, 9) if op == "*" else rng.randint(0, 10**6)
    a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
    cols = columns_lib.columns(a, b, op)
    if op == "-":
      value = sum(c.result * 10**k for k, c in enumerate(cols))
    else:
      value = sum(c.result % 10 * 10**k for k, c in enumerate(cols)) + (
          cols[-1].carry_out * 10**len(cols))
    assert value == {"+": a + b, "-": a - b, "*": a * b}[op]


def test_answer_and_reasoning_offsets():
  text = "<think>\n1+1=2\n</think>\n<answer> 2 </answer> tail"
  assert extract.final_answer_at(text) == ("2", ends_of(text, "</answer>")[0])
  assert extract.final_answer_at(r"x \boxed{1,5} y") == ("1,5", len(r"x \boxed{1,5}"))
  assert extract.final_answer_at("a\n#### 7 \nb") == ("7", len("a\n#### 7 "))
  assert extract.extract_answer_at("so 1,250. then") == ("1250", len("so 1,250"))
  assert extract.extract_answer_at("none") is None
  start, end = extract.reasoning_span(text)
  assert text[start:end] == "\n1+1=2\n"
  assert extract.reasoning_span("left open by the prompt</think> x") == (0, 23)


# arithmetic_steps.


def test_arithmetic_steps_right_solution():
  completion = think("7+8=15, carry 1", "5+6+1=12, carry 1", "57+68=125")
  ends = ends_of(completion, "carry 1", "carry 1", "125", "</answer>")
  assert arithmetic(completion) == [(e, 1.0) for e in ends]


@pytest.mark.parametrize("lines, answer, expected", [
    # A wrong column result; the next column is still judged on its own.
    (["7+8=15, carry 1", "5+6+1=13, carry 1", "57+68=125"], "125", [1, 0, 1, 1]),
    # A wrong carry: column 0 states none, column 1 is right as written.
    (["7+8=15", "5+6+1=12, carry 1", "57+68=125"], "125", [0, 1, 1, 1]),
    (["7+8=15, carry 1", "5+6=11, carry 1", "57+68=125"], "125", [1, 0, 1, 1]),
    (["7+8=15, carry 1", "5+6+1=12, borrow 1", "57+68=125"], "125", [1, 0, 1, 1]),
    # Wrong digits for the column (the columns swapped).
    (["5+6+1=12, carry 1", "7+8=15, carry 1", "57+68=125"], "125", [0, 0, 1, 1]),
    # Text lines are not steps; spaces are free.
    (["Let me add by columns.", "7 + 8 = 15, carry 1", "then the tens:",
      "5+6+1 = 12,  carry 1", "57+68=125", "Done."], "125", [1, 1, 1, 1]),
    # Missing steps: the whole problem in the place of column 0.
    (["57+68=125"], "125", [0, 1]),
    # An equation after the whole problem, and a wrong final answer.
    (["7+8=15, carry 1", "5+6+1=12, carry 1", "57+68=125", "1+1=2"], "124", [1, 1, 1, 0, 0]),
    (["7+8=15, carry 1", "5+6+1=12, carry 1", "57+68=126"], "126", [1, 1, 0, 0]),
])
def test_arithmetic_steps_wrong_and_odd_solutions(lines, answer, expected):
  got = arithmetic(think(*lines, answer=answer))
  assert [r for _, r in got] == expected
  assert [e for e, _ in got] == sorted(e for e, _ in got)


def test_arithmetic_steps_other_rows():
  completion = think("7+8=15, carry 1")
  huge = f"Compute {'9' * 5000}+1."
  got = steps.arithmetic_steps([ADD, "no problem here", ADD, huge, ADD],
                               [completion] * 4 + [""], task=["arithmetic"] * 2 + [
                                   "countdown", "arithmetic", "arithmetic"])
  assert got[1:] == [None, None, None, []]
  # Without an answer anywhere, the final step is 0.0 at the end of the completion.
  assert arithmetic("no answer") == [(len("no answer"), 0.0)]


@pytest.mark.parametrize("spec", ["arithmetic:digits=6,ops=+-*", "countdown:max_numbers=6"])
def test_worked_solutions_of_the_synthetic_tasks_score_one_everywhere(spec):
  rows = synthetic.synthetic_rows(spec, num_rows=300, seed=1)
  fn = rewards.STEP_REGISTRY[f"{spec.split(':')[0]}_steps"]
  got = fn([r["prompt"] for r in rows], [sources.sft_target(r) for r in rows],
           answer=[r["answer"] for r in rows], numbers=[r.get("numbers") for r in rows],
           task=[r["task"] for r in rows])
  for row, row_steps in zip(rows, got):
    assert len(row_steps) == len(row["reasoning"].split("\n")) + 1
    assert all(r == 1.0 for _, r in row_steps)


# countdown_steps.


@pytest.mark.parametrize("lines, answer, expected", [
    (["6-2=4", "4*5=20", "20+4=24"], "(6-2)*5+4", [1, 1, 1, 1]),
    (["6 × 4 = 24"], "6*4", [1, 1]),  # not every number is needed
    (["6*4=24", "24-6=18"], "6*4", [1, 0, 1]),  # 6 is used up
    (["6*4*1=24"], "6*4", [0, 1]),  # 1 is not given
    (["6*5=31", "31-2=29"], "6*5", [0, 1, 0]),  # later steps are judged on their own
    (["24=24", "so x = 5, which is fine", "6 ** 2 = 36"], "24", [0, 0]),  # text is no step
    (["(6-2)*(5+4)=36"], "(6-2)*(5+4)", [1, 0]),
])
def test_countdown_steps(lines, answer, expected):
  completion = think(*lines, answer=answer)
  got = countdown(completion)
  assert [r for _, r in got] == expected
  assert got[-1][0] == len(completion)  # the final answer ends with </answer>


def test_countdown_steps_needs_its_columns():
  with pytest.raises(UserError, match="numbers"):
    steps.countdown_steps(["P"], ["x"], answer=["24"])
  got = steps.countdown_steps(["P"] * 2, ["1+1=2"] * 2, answer=["2"] * 2,
                              numbers=[[1, 1], None], task=["arithmetic", "countdown"])
  assert got == [None, None]


def test_hostile_input_is_scored_under_the_timeout():
  huge = "9" * 5000
  nested = "(" * 150 + "6*4" + ")" * 150
  lines = [f"{huge}+1={huge}", "7+8=15, carry 1", f"{huge}*2=1", "1e9999+1=2",
           f"{nested}=24", "+".join(["1"] * 600) + "=600", "x" * 100_000]
  completion = think(*lines, answer=huge)
  specs = rewards.parse_step_spec("arithmetic_steps,countdown_steps")
  result = rewards.compute_steps(specs.functions, [ADD, "P"], [completion] * 2,
                                 {"answer": ["125", "24"], "numbers": [None, [4, 6]],
                                  "task": ["arithmetic", "countdown"]})
  assert result.num_failed == 0
  # Arithmetic: the huge lines take the places of column 0 and of the whole problem, the
  # real column 0 that of column 1, so all are wrong, and so is the final answer.
  assert [r for _, r in result.steps[0]] == [0.0] * 4
  # Countdown: only the nested expression is an equation within the length limit.
  assert [r for _, r in result.steps[1]] == [1.0, 0.0]


# Registry and runner.


def two_steps(prompts, completions, **unused):
  """A user step reward: a step at the first character and one at the end."""
  return [[(1, 1.0), (len(c), -1.0)] for c in completions]


def test_parse_step_spec():
  specs = rewards.parse_step_spec(
      "arithmetic_steps:2, outcome:0.5,tests.test_step_rewards:two_steps")
  assert [(s.name, s.fn, s.weight) for s in specs.functions] == [
      ("arithmetic_steps", steps.arithmetic_steps, 2.0),
      ("tests.test_step_rewards:two_steps", two_steps, 1.0)]
  assert specs.outcome_weight == 0.5
  assert rewards.parse_step_spec("countdown_steps").outcome_weight == 0.0
  assert set(rewards.STEP_REGISTRY) == {"arithmetic_steps", "countdown_steps"}
  assert not set(rewards.STEP_REGISTRY) & set(rewards.REGISTRY)


def _spec(name, fn, weight=1.0):
  return rewards.RewardSpec(name=name, fn=fn, weight=weight)


def test_compute_steps_combines_functions_by_end():
  def other(prompts, completions, **unused):
    return [[(len(completions[0]), 3.0), (2, np.nan)], None]

  def nan_at_one(prompts, completions, **unused):
    return [[(1, np.nan)], [(1, np.nan)]]

  specs = [_spec("two", two_steps, 2.0), _spec("other", other, 0.5),
           _spec("nan", nan_at_one)]
  result = rewards.compute_steps(specs, ["p", "p"], ["abcd", "xy"], {})
  assert result.num_failed == 0
  # End 4 holds 2 * -1 + 0.5 * 3; end 2 only NaN; end 1: 2 * 1 and a NaN skipped.
  np.testing.assert_equal(result.steps, [[(1, 2.0), (2, np.nan), (4, -0.5)],
                                         [(1, 2.0), (2, -2.0)]])
  none = rewards.compute_steps([_spec("none", lambda p, c, **u: [None] * len(c))],
                               ["p"], ["a"], {})
  assert none.steps == [None] and none.num_failed == 0


def test_compute_steps_failures_are_counted():
  def bad_pairs(prompts, completions, **unused):
    return [[(0, 1.0)], [(3, 1.0)], [(True, 1.0)], [(1.0, 1.0)], [(1, "1")], [(1, 1e39)],
            [(1, 1.0, 2)], "x", [(2, 1.0), (1, 0.0)]]

  def raising(prompts, completions, **unused):
    raise RuntimeError("boom")

  def short(prompts, completions, **unused):
    return [[]]

  n = 9
  # Names of their own: the runner warns once per name and kind of failure per process.
  specs = [_spec("bad_steps", bad_pairs), _spec("raising_steps", raising),
           _spec("short_steps", short)]
  result = rewards.compute_steps(specs, ["p"] * n, ["ab"] * n, {})
  assert result.steps == [None] * (n - 1) + [[(1, 0.0), (2, 1.0)]]  # the last one sorted
  assert result.num_failed == (n - 1) + n + n
  with pytest.raises(UserError, match="numbers"):
    rewards.compute_steps(rewards.parse_step_spec("countdown_steps").functions, ["p"],
                          ["a"], {"answer": ["1"]})


# Character ends to token indices.


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  return tiny_hf.make_tokenizer(tmp_path_factory.mktemp("bpe"))


def test_token_ends_on_the_demo_tokenizer():
  tok = data.demo_tokenizer()
  text = "ab é\n<think>x</think>"
  ids = tok.encode(text, add_special_tokens=False)
  assert len(ids) == 9  # one token per byte (é is two), the tags one each
  ends = list(range(1, len(text) + 1))
  # "é" is two tokens: it is written by the second; a step ending in a tag maps to it.
  expected = [0, 1, 2, 4, 5] + [6] * 7 + [7] + [8] * 8
  assert process_scoring.token_ends(tok, ids, text, ends) == expected
  assert process_scoring._bisect_ends(tok, ids, text, ends) == expected
  with pytest.raises(ValueError, match="1..21"):
    process_scoring.token_ends(tok, ids, text, [22])
  with pytest.raises(ValueError, match="not the decoded"):
    process_scoring._bisect_ends(tok, ids, text + "!", [1])


def test_token_ends_on_a_byte_level_bpe_follows_its_offsets(bpe):
  text = "<think>47 + 12 = 59, so the answer is 59.</think> <answer>59</answer> café"
  encoding = bpe.backend_tokenizer.encode(text, add_special_tokens=False)
  ids, offsets = encoding.ids, encoding.offsets
  assert max(end - start for start, end in offsets) > 3  # merges made long tokens
  ends = list(range(1, len(text) + 1))
  # The last token whose span holds character e - 1 (é's bytes are two tokens).
  expected = [max(k for k, (start, end) in enumerate(offsets) if start <= e - 1 < end)
              for e in ends]
  assert process_scoring.token_ends(bpe, ids, text, ends) == expected
  assert process_scoring._bisect_ends(bpe, ids, text, ends) == expected
  # Tokens the tokenizer would not choose (one per byte) map by what they write.
  per_byte = [i for piece in text for i in bpe.encode(piece, add_special_tokens=False)]
  assert process_scoring.token_ends(bpe, per_byte, text, [len(text)]) == [len(per_byte) - 1]


def test_token_ends_falls_back_when_decoding_cleans_up_spaces(bpe, monkeypatch):
  monkeypatch.setattr(bpe, "clean_up_tokenization_spaces", True)
  monkeypatch.setattr(
      bpe, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True)
  ids = bpe.encode("so , it is 5 .", add_special_tokens=False)
  text = data.decode_ids(bpe, ids)
  assert text == "so, it is 5."  # the decoder's pieces no longer make up the text
  assert process_scoring._stream_ends(bpe, ids, text) is None
  so = len(bpe.encode("so", add_special_tokens=False))
  assert process_scoring.token_ends(bpe, ids, text, [2, len(text)]) == [so - 1, len(ids) - 1]


def test_token_ends_falls_back_when_the_incremental_decoder_fails(monkeypatch):
  class Failing:  # as tokenizers' DecodeStream does on some Llama-3 text (its issue 1705)
    def __init__(self, **unused):
      pass

    def step(self, *unused):
      raise Exception("InvalidPrefix")  # pylint: disable=broad-exception-raised

  monkeypatch.setattr(process_scoring.decoders, "DecodeStream", Failing)
  tok = data.demo_tokenizer()
  ids = tok.encode("1+1=2", add_special_tokens=False)
  assert process_scoring.token_ends(tok, ids, "1+1=2", [3, 5]) == [2, 4]


# Step arrays.


def test_pack_steps_pads_and_merges_the_tail_with_its_smallest_reward():
  rewards_s, ends_s, merged = process_scoring.pack_steps([(1, 1.0), (4, 0.5)], 4)
  np.testing.assert_equal(rewards_s, [1.0, 0.5, np.nan, np.nan])
  np.testing.assert_equal(ends_s, [1, 4, -1, -1])
  assert (rewards_s.dtype, ends_s.dtype, merged) == (np.float32, np.int32, 0)
  tail = [(1, 1.0), (2, 1.0), (3, 0.0), (5, np.nan), (9, 1.0)]
  rewards_s, ends_s, merged = process_scoring.pack_steps(tail, 2)
  np.testing.assert_equal(rewards_s, [1.0, 0.0])
  np.testing.assert_equal(ends_s, [1, 9])
  assert merged == 3
  rewards_s, _, _ = process_scoring.pack_steps([(1, 1.0), (2, np.nan), (3, np.nan)], 2)
  np.testing.assert_equal(rewards_s, [1.0, np.nan])


def _batch(tok, completions, num_tokens):
  """tokens and mask [R, N]: each completion, then EOS, then pad."""
  tokens = np.full((len(completions), num_tokens), data.pad_id(tok), np.int32)
  mask = np.zeros_like(tokens)
  for i, text in enumerate(completions):
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
  return tokens, mask


def _score(tok, spec, completions, *, max_steps, outcome=None):
  tokens, mask = _batch(tok, completions, 160)
  texts = data.decode_completions(tok, tokens, mask)
  assert texts == completions
  n = len(completions)
  scorer = process_scoring.StepScorer(tok, rewards.parse_step_spec(spec), max_steps=max_steps)
  out = scorer([ADD] * n, texts, {"answer": ["125"] * n, "task": ["arithmetic"] * n},
               tokens, mask, np.zeros(n, np.float32) if outcome is None else outcome)
  return out, tokens, mask


def test_step_scorer_arrays(bpe):
  right = think("7+8=15, carry 1", "5+6+1=12, carry 1", "57+68=125")
  long = think("7+8=15, carry 1", "5+6+1=12, carry 1", "57+68=125", "1+1=2", "2+2=4")
  for tok in (data.demo_tokenizer(), bpe):
    out, tokens, mask = _score(tok, "arithmetic_steps", [right, long, ""], max_steps=4)
    assert out.rewards.shape == out.ends.shape == (3, 4)
    assert (out.rewards.dtype, out.ends.dtype, out.num_truncated.dtype) == (
        np.float32, np.int32, np.int32)
    # Each step ends on the token that writes its last character.
    char_ends = ends_of(right, "carry 1", "carry 1", "57+68=125", "</answer>")
    for end, char_end in zip(out.ends[0], char_ends):
      assert data.decode_ids(tok, tokens[0, :end + 1]).startswith(right[:char_end])
      assert not data.decode_ids(tok, tokens[0, :end]).startswith(right[:char_end])
    np.testing.assert_equal(out.rewards[0], [1, 1, 1, 1])
    # Six steps in four slots: the last slot merges columns 4..6 (min 0.0), ends with them.
    np.testing.assert_equal(out.rewards[1], [1, 1, 1, 0])
    assert out.ends[1, 3] == np.flatnonzero(mask[1])[-2]  # "</answer>" before EOS
    np.testing.assert_equal(out.num_truncated, [0, 2, 0])
    np.testing.assert_equal(out.ends[2], [-1] * 4)  # empty completion: EOS only, no steps
    assert out.num_failed == 0


def test_step_scorer_outcome_step(bpe):
  completions = [think("7+8=15, carry 1", "5+6+1=12, carry 1", "57+68=125", "1+1=2"),
                 think("7+8=15, carry 1")]
  out, _, mask = _score(bpe, "arithmetic_steps,outcome:0.5", completions, max_steps=3,
                        outcome=np.asarray([1.2, 0.2], np.float32))
  last = [np.flatnonzero(m)[-1] for m in mask]
  np.testing.assert_allclose(out.rewards, [[1, 0, 0.6], [1, 1, 0.1]])
  assert list(out.ends[:, -1]) == last  # the outcome step ends on EOS, never merged
  np.testing.assert_equal(out.num_truncated, [3, 0])
  with pytest.raises(UserError, match="max_steps_per_completion=1"):
    process_scoring.StepScorer(bpe, rewards.parse_step_spec("arithmetic_steps,outcome"),
                               max_steps=1)


def test_one_wrong_step_gives_negative_advantage_up_to_its_end(bpe):
  right = think("7+8=15, carry 1", "5+6+1=12, carry 1", "57+68=125")
  wrong = think("7+8=15, carry 1", "5+6+1=13, carry 1", "57+68=125")
  out, _, mask = _score(bpe, "arithmetic_steps", [right, wrong, right, right], max_steps=8)
  adv = np.asarray(advantages.process_advantages(out.rewards, out.ends, mask.shape[1], 4))
  wrong_end, last_end = out.ends[1, 1], out.ends[1, 3]
  assert np.all(adv[1, :wrong_end + 1] < 0)
  assert np.all(adv[1, wrong_end + 1:last_end + 1] > 0)
  assert np.all(adv[0, :out.ends[0, 3] + 1] > 0)
  for row, row_ends in zip(adv, out.ends):  # after the last step (EOS, pad): nothing
    np.testing.assert_array_equal(row[row_ends.max() + 1:], 0.0)
