"""Tests for the data layer: sources, synthetic tasks, streams, tokenizer and encoding."""

import ast
import fractions
import json
import operator
import re
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
import transformers

from grpo_jax import data
from grpo_jax.data import synthetic
from grpo_jax.data import tokenizer as tokenizer_lib
from grpo_jax.errors import UserError

from tests import tiny_hf

# ---------------------------------------------------------------- synthetic tasks


@pytest.mark.parametrize("source", ["synthetic:arithmetic", "synthetic:countdown",
                                    "synthetic:arithmetic:digits=1,ops=+"])
def test_synthetic_deterministic_and_splits_disjoint(source):
  train = data.load_rows(source, split="train", seed=3, num_rows=300)
  assert train == data.load_rows(source, split="train", seed=3, num_rows=300)
  assert train != data.load_rows(source, split="train", seed=4, num_rows=300)
  eval_prompts = set()
  for seed in (3, 4):
    rows = data.load_rows(source, split="eval", seed=seed, num_rows=100)
    eval_prompts |= {r["prompt"] for r in rows}
  assert not eval_prompts & {r["prompt"] for r in train}
  assert len(data.load_rows(source, split="eval")) == 1000


_COLUMN = re.compile(r"^(\d+)([+*-])(\d+)(?:([+-])(\d+))?=(\d+)(?:, (carry|borrow) (\d+))?$")


def _check_columns(lines, op):
  """Checks each column line and rebuilds the result from the written digits."""
  value, carry = 0, 0
  for i, line in enumerate(lines):
    x, line_op, y, in_op, in_carry, out, kind, out_carry = _COLUMN.match(line).groups()
    assert line_op == op
    assert int(in_carry or 0) == carry and (in_op is None) == (carry == 0)
    lhs = int(x) + int(y) if op == "+" else int(x) - int(y) if op == "-" else int(x) * int(y)
    lhs = lhs + carry if op in "+*" else lhs - carry
    assert lhs == int(out)
    if op == "-":
      assert 0 <= int(out) <= 9 and (kind == "borrow") == (int(x) >= 10)
      value += int(out) * 10**i
      carry = int(kind == "borrow")
    else:
      assert int(out_carry or 0) == int(out) // 10
      value += int(out) % 10 * 10**i
      carry = int(out) // 10
  assert op != "-" or carry == 0
  return value + carry * 10 ** len(lines)


def test_arithmetic_reasoning_reaches_the_answer():
  rows = data.load_rows("synthetic:arithmetic:digits=4,ops=+-*", num_rows=400, seed=1)
  assert {re.search(r"\d([+*-])\d", r["prompt"])[1] for r in rows} == set("+-*")
  for row in rows:
    a, op, b = re.match(r"Compute (\d+)([+*-])(\d+)\.\n", row["prompt"]).groups()
    truth = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](int(a), int(b))
    assert row["answer"] == str(truth) and row["task"] == "arithmetic"
    *columns, last = row["reasoning"].split("\n")
    assert last == f"{a}{op}{b}={truth}"
    assert _check_columns(columns, op) == truth
    assert data.sft_target(row) == (
        f"<think>\n{row['reasoning']}\n</think>\n<answer>\n{truth}\n</answer>")


def _evaluate(node):
  """Exact value of an expression tree of + - * / over integer constants."""
  if isinstance(node, ast.Constant):
    return fractions.Fraction(node.value)
  ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
         ast.Div: operator.truediv}
  return ops[type(node.op)](_evaluate(node.left), _evaluate(node.right))


def test_arithmetic_wrong_answers_corrupt_only_the_sft_target():
  clean = data.load_rows("synthetic:arithmetic:digits=2", num_rows=400)
  noisy = data.load_rows("synthetic:arithmetic:digits=2,wrong_answers=40", num_rows=2000)
  assert not any("sft_answer" in r for r in clean)
  wrong = [r for r in noisy if "sft_answer" in r]
  assert 0.35 < len(wrong) / len(noisy) < 0.45
  for r in wrong[:50]:
    # The reward's answer stays true; the worked solution stays right; only the final
    # answer of the SFT target is off by 1 or 10.
    assert r["reasoning"].endswith("=" + r["answer"])
    assert abs(int(r["sft_answer"]) - int(r["answer"])) in (1, 10)
    assert data.sft_target(r).endswith(f"<answer>\n{r['sft_answer']}\n</answer>")
  with pytest.raises(UserError, match="wrong_answers"):
    data.load_rows("synthetic:arithmetic:wrong_answers=101")


def test_arithmetic_unworked_rows_skip_the_columns_and_keep_the_rows():
  mixed = data.load_rows("synthetic:arithmetic:digits=2,ops=+,unworked=60", num_rows=1000)
  unworked = [r for r in mixed if "\n" not in r["reasoning"]]
  assert 0.55 < len(unworked) / len(mixed) < 0.65
  for r in mixed:
    # Every row is right: the one line of an unworked row is the sum with its true answer,
    # a worked row's columns reach it; the SFT target answers with it.
    a, b = map(int, r["prompt"].split()[1].rstrip(".").split("+"))
    *columns, last = r["reasoning"].split("\n")
    assert last == f"{a}+{b}={a + b}" and r["answer"] == str(a + b)
    if columns:
      assert _check_columns(columns, "+") == a + b
    assert data.sft_target(r).endswith(f"<answer>\n{a + b}\n</answer>")
  # The options' repr seeds the rows; the option is left out of it, so the rows of every
  # source written before it existed stay as they were.
  assert repr(synthetic.ArithmeticOptions(unworked=60)) == repr(synthetic.ArithmeticOptions())
  with pytest.raises(UserError, match="unworked"):
    data.load_rows("synthetic:arithmetic:unworked=-1")


def test_countdown_targets_reachable():
  rows = data.load_rows("synthetic:countdown", num_rows=300, seed=2)
  assert {len(r["numbers"]) for r in rows} == {3, 4}
  for row in rows:
    tree = ast.parse(row["solution"], mode="eval").body
    used = sorted(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant))
    assert used == sorted(row["numbers"])
    assert _evaluate(tree) == int(row["answer"]) > 0
    steps = row["reasoning"].split("\n")
    assert len(steps) == len(row["numbers"]) - 1
    for step in steps:
      lhs, rhs = step.split("=")
      assert _evaluate(ast.parse(lhs, mode="eval").body) == int(rhs)
    assert steps[-1].endswith(f"={row['answer']}")
    assert f"to make {row['answer']}." in row["prompt"]
    assert data.sft_target(row).endswith(f"<answer>\n{row['solution']}\n</answer>")


@pytest.mark.parametrize("source, words", [
    ("synthetic:sudoku", ["synthetic:arithmetic", "synthetic:countdown"]),
    ("synthetic:arithmetic:digits=0", ["1..9"]),
    ("synthetic:arithmetic:ops=/", ["+ - *"]),
    ("synthetic:arithmetic:level=2", ["digits=", "ops="]),
    ("synthetic:countdown:max_number=x", ["integer"]),
    ("parquet:rows.parquet", ["synthetic:<task>", "jsonl:<file>", "tfds:<name>"]),
    ("jsonl", ["synthetic:<task>"]),
])
def test_bad_sources_are_user_errors(source, words):
  with pytest.raises(UserError) as e:
    data.load_rows(source, num_rows=2)
  assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_sft_target_needs_reasoning():
  with pytest.raises(UserError, match="reasoning"):
    data.sft_target({"prompt": "p", "answer": "1"})


# ---------------------------------------------------------------- JSONL


def _write(tmp_path, lines, name="rows.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_jsonl_rows_keep_columns(tmp_path):
  path = _write(tmp_path, [json.dumps({"prompt": "2+2?", "answer": 4, "level": "easy"}), "",
                           json.dumps({"prompt": "3+3?", "answer": "6"}),
                           json.dumps({"prompt": "4+4?", "answer": "8"})])
  rows = data.load_rows(f"jsonl:{path}")
  assert rows[0] == {"prompt": "2+2?", "answer": "4", "level": "easy"}
  assert [r["answer"] for r in rows] == ["4", "6", "8"]
  assert len(data.load_rows(f"jsonl:{path}", num_rows=2)) == 2
  assert data.load_rows(f"jsonl:{path}", split="eval") == rows  # a file is one split


def test_jsonl_required_columns(tmp_path):
  path = _write(tmp_path, [json.dumps({"prompt": "p", "response": "r"}),
                           json.dumps({"prompt": "p", "response": 3})])
  with pytest.raises(UserError, match=r":2: \"response\" must be a string;"):
    data.load_rows(f"jsonl:{path}", required=("prompt", "response"))
  assert data.load_rows(f"jsonl:{path}", required=("prompt", "response"), skip_bad_rows=True) == [
      {"prompt": "p", "response": "r"}]
  with pytest.raises(UserError, match=r":1: row has no \"answer\" field"):
    data.load_rows(f"jsonl:{path}")


@pytest.mark.parametrize("line, why", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "p"}', '"answer"'),
    ('{"answer": "1"}', '"prompt"'),
    ('["prompt", "answer"]', "expected an object"),
    ('{"prompt": "p", "answer": null}', "string or a number"),
    ('{"prompt": "", "answer": "1"}', "empty"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, why):
  good = json.dumps({"prompt": "p", "answer": "1"})
  path = _write(tmp_path, [good, good, line, good])
  with pytest.raises(UserError) as e:
    data.load_rows(f"jsonl:{path}")
  assert f"{path}:3:" in str(e.value) and why in str(e.value)
  stats = {}
  rows = data.load_rows(f"jsonl:{path}", skip_bad_rows=True, stats=stats)
  assert len(rows) == 3 and stats == {"skipped_rows": 1}


def test_jsonl_missing_empty_and_all_bad(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    data.load_rows(f"jsonl:{tmp_path}/nope.jsonl")
  with pytest.raises(UserError, match="no usable rows"):
    data.load_rows(f"jsonl:{_write(tmp_path, [''], 'empty.jsonl')}")
  with pytest.raises(UserError, match="no usable rows"):
    data.load_rows(f"jsonl:{_write(tmp_path, ['{}', '[]'], 'bad.jsonl')}", skip_bad_rows=True)


# ---------------------------------------------------------------- GSM8K and TFDS

_GSM8K = [
    {"question": " Tom has 1,200 apples and buys 34 more. How many now? ",
     "answer": "He has 1,200+34 = <<1200+34=1234>>1234.\n#### 1,234"},
    {"question": "What is 6 times 7?", "answer": "6*7=42\n####42"},
]


def test_gsm8k_rows():
  first, second = map(data.gsm8k_row, _GSM8K)
  assert first == {"prompt": "Tom has 1,200 apples and buys 34 more. How many now?",
                   "answer": "1234", "reasoning": "He has 1,200+34 = <<1200+34=1234>>1234.",
                   "task": "gsm8k"}
  assert second["answer"] == "42" and second["reasoning"] == "6*7=42"


def test_tfds_gsm8k_through_tfds_mock():
  seen = {}

  def as_data_source(builder, split, **kwargs):
    del kwargs
    seen.update(name=builder.name, split=split)
    encoded = [{k: v.encode() for k, v in ex.items()} for ex in _GSM8K]
    return encoded + [{"question": b"q", "answer": b"no final line"}]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    with pytest.raises(UserError, match=r"tfds:gsm8k:test:2: GSM8K answer has no"):
      data.load_rows("tfds:gsm8k:test")
    stats = {}
    rows = data.load_rows("tfds:gsm8k", split="test", skip_bad_rows=True, stats=stats)
  assert seen == {"name": "gsm8k", "split": "test"}
  assert rows == [data.gsm8k_row(ex) for ex in _GSM8K] and stats == {"skipped_rows": 1}


class GrpoJaxTinyPrompts(tfds.core.GeneratorBasedBuilder):
  """A local TFDS dataset with prompt/answer features, prepared in the test."""

  # tfds resolves a builder's code path through its top-level package; for `tests` that
  # path needs the importlib_resources backport, which py3.11 installs lack. A one-part
  # module name takes tfds' other route.
  __module__ = "grpo_jax_test_builders"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"prompt": text, "answer": text, "level": np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"prompt": f"{i}+1?", "answer": str(i + 1), "level": i}


def test_tfds_reads_a_prepared_dataset_offline(tmp_path):
  name = GrpoJaxTinyPrompts.name
  with pytest.raises(UserError, match=f"tfds build {name} --file_format=array_record"):
    data.load_rows(f"tfds:{name}", data_dir=str(tmp_path))
  GrpoJaxTinyPrompts(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  rows = data.load_rows(f"tfds:{name}:test", data_dir=str(tmp_path))
  assert sorted(rows, key=lambda r: r["level"]) == [
      {"prompt": "0+1?", "answer": "1", "level": 0}, {"prompt": "1+1?", "answer": "2", "level": 1}]
  assert len(data.load_rows(f"tfds:{name}", data_dir=str(tmp_path))) == 5
  assert len(data.load_rows(f"tfds:{name}", split="eval", data_dir=str(tmp_path))) == 2
  with pytest.raises(UserError, match="Unknown split 'dev'"):
    data.load_rows(f"tfds:{name}:dev", data_dir=str(tmp_path))
  with pytest.raises(UserError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
    data.load_rows("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))


# ---------------------------------------------------------------- splits and streams


def test_split_eval():
  rows = [{"prompt": str(i), "answer": str(i)} for i in range(50)]
  train, held = data.split_eval(rows, 10, seed=0)
  assert (train, held) == data.split_eval(rows, 10, seed=0)
  assert held != data.split_eval(rows, 10, seed=1)[1]
  assert len(held) == 10 and sorted(train + held, key=lambda r: int(r["prompt"])) == rows
  assert train == sorted(train, key=lambda r: int(r["prompt"]))
  assert data.split_eval(rows, 0, seed=0) == (rows, [])
  assert data.split_eval(rows, 50, seed=0)[0] == []
  with pytest.raises(UserError, match="allowed 0..50"):
    data.split_eval(rows, 51, seed=0)


def _prompts(batch):
  return [r["prompt"] for r in batch]


def test_stream_epochs_are_permutations_and_resume_is_exact():
  rows = [{"prompt": str(i), "answer": ""} for i in range(7)]
  stream = data.PromptStream(rows, batch_size=3, seed=5)
  first = [_prompts(stream.next()) for _ in range(7)]  # 21 rows: exactly 3 epochs
  flat = sum(first, [])
  epochs = [flat[i:i + 7] for i in range(0, 21, 7)]
  assert all(sorted(e, key=int) == [str(i) for i in range(7)] for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3

  stream = data.PromptStream(rows, batch_size=3, seed=5)
  for _ in range(2):
    stream.next()
  saved = json.loads(json.dumps(stream.state()))
  assert saved == {"epoch": 0, "index": 6, "num_rows": 7}
  rest = [_prompts(stream.next()) for _ in range(5)]
  assert rest == first[2:]
  resumed = data.PromptStream(rows, batch_size=3, seed=5)
  resumed.restore(saved)
  assert [_prompts(next(resumed)) for _ in range(5)] == rest


def test_stream_shards_split_each_global_batch():
  rows = [{"prompt": str(i), "answer": ""} for i in range(10)]
  stream = data.PromptStream(rows, batch_size=4, seed=0)
  stream.next()
  shards = [stream.shard(i, 2) for i in range(2)]
  for _ in range(4):
    whole = _prompts(stream.next())
    parts = [_prompts(s.next()) for s in shards]
    assert parts == [whole[0::2], whole[1::2]]
  assert shards[0].state() == shards[1].state() == stream.state()
  with pytest.raises(UserError, match="divisible"):
    stream.shard(0, 3)
  with pytest.raises(UserError, match="same data.source"):
    data.PromptStream(rows[:9], batch_size=4, seed=0).restore(stream.state())


# ---------------------------------------------------------------- tokenizer and encoding


@pytest.fixture(scope="module")
def tok():
  return data.demo_tokenizer()


def test_demo_tokenizer_round_trip_and_single_special_ids(tok):
  assert data.demo_tokenizer().get_vocab() == tok.get_vocab()
  assert len(tok) == 10 + 256 and (tok.pad_token_id, tok.eos_token_id) == (0, 1)
  texts = [r["prompt"] for r in data.load_rows("synthetic:countdown", num_rows=5)]
  texts += [data.sft_target(r) for r in data.load_rows("synthetic:arithmetic", num_rows=5)]
  texts += ["  tabs\tand CRLF\r\n ~`{}|\n", "Café, 日本語 🙂"]
  for text in texts:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
  assert len(tok("a + b\n", add_special_tokens=False)["input_ids"]) == 6  # one id per byte
  for special in ["<think>", "</think>", "<answer>", "</answer>", "<|pad|>", "<|eos|>",
                  "<|user|>", "<|assistant|>", "<|system|>"]:
    assert len(tok(f"a{special}b", add_special_tokens=False)["input_ids"]) == 3
  ids = tok("<think>x</think>")["input_ids"]
  assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think>"


@pytest.mark.parametrize("model_type", [None, "qwen2", "qwen3", "llama"])
def test_demo_tokenizer_reloads_the_same_beside_any_model_config(tok, tmp_path, model_type):
  # AutoTokenizer picks the class from the files beside the tokenizer: a qwen2 config.json
  # makes it a Qwen2Tokenizer (byte level) whatever tokenizer_config.json says, which once
  # dropped every space and newline of the demo's character-level tokenizer.
  if model_type:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
  data.save_tokenizer(tok, str(tmp_path))
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  text = data.format_prompt(tok, "Compute 1 + 2.\nShow\tyour work.", system_prompt="Be brief.")
  assert data.format_prompt(loaded, "Compute 1 + 2.\nShow\tyour work.",
                            system_prompt="Be brief.") == text
  assert loaded(text)["input_ids"] == tok(text)["input_ids"]
  assert loaded.decode(tok(text)["input_ids"]) == text
  assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
  assert tokenizer_lib.reload_differences(tok, str(tmp_path)) == []


def test_save_tokenizer_warns_when_the_reload_differs(tmp_path):
  # tiny_hf's byte-level BPE merges digits, which Qwen2Tokenizer's pre-split keeps apart.
  tok = tiny_hf.make_tokenizer(tmp_path / "src")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
  assert tokenizer_lib.reload_differences(tok, str(tmp_path / "src")) == []
  with mock.patch.object(tokenizer_lib.logging, "warning") as warning:
    data.save_tokenizer(tok, str(tmp_path / "out"))
  assert "encodes to other ids" in warning.call_args[0][-1]


def test_format_prompt(tok):
  assert data.format_prompt(tok, "Hi there") == "<|user|>Hi there<|eos|><|assistant|>"
  assert data.format_prompt(tok, "Hi", system_prompt="S") == (
      "<|system|>S<|eos|><|user|>Hi<|eos|><|assistant|>")
  assert data.format_prompt(tok, "Hi", use_chat_template=False, system_prompt="S") == "S\n\nHi"
  plain = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
  assert data.format_prompt(plain, "Hi") == "Hi"
  with pytest.raises(UserError, match="no chat template"):
    data.format_prompt(plain, "Hi", use_chat_template=True)


def test_encode_prompts_left_pads_to_a_bucket(tok):
  texts = [data.format_prompt(tok, p) for p in ["1+1", "x" * 40, "abc"]]
  lengths = [len(t) - len("<|user|><|eos|><|assistant|>") + 3 for t in texts]
  tokens, mask = data.encode_prompts(tok, texts)
  assert tokens.shape == mask.shape == (3, 64) and tokens.dtype == mask.dtype == np.int32
  assert mask.sum(1).tolist() == lengths
  for row, row_mask, text, n in zip(tokens, mask, texts, lengths):
    assert row_mask.tolist() == [0] * (64 - n) + [1] * n
    assert (row[:64 - n] == tok.pad_token_id).all()
    assert tok.decode(row[64 - n:]) == text
  tokens, _ = data.encode_prompts(tok, texts, buckets=(8, 16))
  assert tokens.shape == (3, max(lengths))
  stats = {}
  tokens, mask = data.encode_prompts(tok, texts, max_prompt_len=10, stats=stats)
  assert tokens.shape == (3, 32) and stats == {"truncated_prompts": 1}
  assert tokens[1][mask[1] == 1].tolist() == tok(texts[1])["input_ids"][-10:]


def test_encode_prompts_adds_bos_once(tok):
  backend = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
  backend.add_special_tokens([tokenizers.AddedToken("<|bos|>", special=True)])
  bos = backend.token_to_id("<|bos|>")
  backend.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
  llama_like = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>")
  tokens, mask = data.encode_prompts(llama_like, ["ab", "<|bos|>cd"])
  assert [row[m == 1].tolist()[:2] for row, m in zip(tokens, mask)] == [
      [bos, llama_like.convert_tokens_to_ids("a")], [bos, llama_like.convert_tokens_to_ids("c")]]
  assert (tokens[mask == 0] == llama_like.eos_token_id).all()  # no pad token: EOS pads
  tokens, mask = data.encode_prompts(tok, ["ab"])
  assert mask.sum() == 2


def test_encode_sft_masks(tok):
  prompts = [data.format_prompt(tok, "1+1"), data.format_prompt(tok, "22+22")]
  targets = ["<think>\nadd\n</think>\n<answer>\n2\n</answer>", "44"]
  tokens, loss_mask, attention = data.encode_sft(tok, prompts, targets, max_len=48)
  assert tokens.shape == loss_mask.shape == attention.shape == (2, 48)
  for row, loss, att, p, t in zip(tokens, loss_mask, attention, prompts, targets):
    n_p = len(tok(p)["input_ids"])
    n = n_p + len(tok(t)["input_ids"]) + 1
    assert att.tolist() == [1] * n + [0] * (48 - n)
    assert loss.tolist() == [0] * n_p + [1] * (n - n_p) + [0] * (48 - n)
    assert row[n - 1] == tok.eos_token_id and (row[n:] == tok.pad_token_id).all()
    assert tok.decode(row[n_p:n - 1]) == t
  stats = {}
  tokens, loss_mask, attention = data.encode_sft(tok, prompts, targets, max_len=16, stats=stats)
  assert stats == {"truncated_examples": 1} and attention[0].all() and loss_mask[0, -1] == 1


def test_decode_completions(tok):
  eos, pad = tok.eos_token_id, tok.pad_token_id
  texts = ["<think>\nok\n</think>\n<answer>\n7\n</answer>", "<answer>x"]
  rows = [tok(t)["input_ids"] + [eos] for t in texts]
  n = max(map(len, rows)) + 2
  tokens = np.array([r + [pad] * (n - len(r)) for r in rows], np.int32)
  mask = np.array([[1] * len(r) + [0] * (n - len(r)) for r in rows], np.int32)
  assert data.decode_completions(tok, tokens, mask) == texts
  x_id = tok.convert_tokens_to_ids("x")
  assert data.decode_completions(tok, tokens, mask, eos_token_ids=[x_id]) == [texts[0], "<answer>"]
