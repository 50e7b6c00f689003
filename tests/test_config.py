"""Config defaults, validation errors, the demo and hf config files, CLI overrides."""

import dataclasses

from absl import flags
from ml_collections import config_flags
import pytest

from grpo_jax import config
from grpo_jax.errors import UserError

# The keys DESIGN.md promises every config has.
DESIGN_KEYS = (
    "model.path", "model.dtype", "data.source", "data.prompts_per_step",
    "grpo.num_generations", "grpo.num_iterations", "grpo.beta", "grpo.epsilon_low",
    "grpo.epsilon_high", "grpo.loss_type", "grpo.scale_rewards", "grpo.ref_reset_every",
    "sampler.max_new_tokens", "sampler.temperature", "sampler.top_p", "sampler.top_k",
    "sampler.stop_at_eos", "rewards", "train.num_steps", "train.learning_rate",
    "train.warmup_steps", "train.max_grad_norm", "train.seed", "checkpoint.every_steps",
    "checkpoint.keep", "eval.every_steps", "eval.num_prompts", "eval.k", "mesh.shape")


def _flat(cfg, prefix=""):
  out = {}
  for k, v in cfg.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _load(spec: str, *overrides: str):
  """Loads a config file the way the command line does, with --config.x=y overrides."""
  argv = ["prog", f"--config={spec}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_defaults_hold_every_design_key():
  keys = _flat(config.defaults().to_dict())
  missing = [k for k in DESIGN_KEYS if k not in keys]
  assert not missing


def test_defaults_freeze_and_resolve():
  c = config.freeze(config.defaults(), num_devices=8)
  assert c.mesh.shape == (1, 8, 1)
  assert c.grpo.epsilon_high == c.grpo.epsilon_low
  assert c.eval.max_new_tokens == c.sampler.max_new_tokens
  assert c.model.param_dtype == c.model.dtype
  assert c.sft.source == c.data.source
  assert c.data.eval_source is None  # hold out data.num_eval_rows rows of data.source
  hash(c)  # static argument for jit
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.grpo.beta = 1.0  # type: ignore[misc]


def test_describe_lists_every_key_once():
  c = config.freeze(config.defaults(), num_devices=1)
  lines = config.describe(c).splitlines()
  names = [line.split(" = ")[0] for line in lines]
  assert sorted(names) == sorted(_flat(config.defaults().to_dict()))
  assert "grpo.beta = 0.0" in lines
  other = config.freeze(config.defaults().copy_and_resolve_references(), num_devices=1)
  assert config.digest(other) == config.digest(c)
  changed = config.defaults()
  changed.grpo.beta = 0.04
  assert config.digest(config.freeze(changed, num_devices=1)) != config.digest(c)


def test_demo_config_freezes_with_cli_overrides():
  cfg = _load("configs/demo.py", "--config.grpo.epsilon_high=0.3",
              "--config.grpo.delta=2.0", "--config.mesh.shape=(2,2,2)",
              "--config.data.use_chat_template=False")
  c = config.freeze(cfg, num_devices=8)
  assert c.model.path == "" and c.data.source.startswith("synthetic:")
  assert c.sft.num_steps > 0
  assert (c.grpo.epsilon_high, c.grpo.delta) == (0.3, 2.0)
  assert c.mesh.shape == (2, 2, 2)
  assert c.data.use_chat_template is False


@pytest.mark.parametrize("variant", ["think", "copy", "clean", "countdown", "process", "lora"])
def test_demo_variants_leave_room_for_every_worked_solution(variant):
  """Each demo variant's budget of new tokens holds the longest SFT target and EOS (a
  correct answer cut short scores 0), and sft.max_len holds prompt and target."""
  from grpo_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  c = config.freeze(_load(f"configs/demo.py:{variant}"), num_devices=1)
  tokenizer = data_lib.demo_tokenizer()
  rows = data_lib.load_rows(c.data.source, split="train", num_rows=2000)
  prompts = [data_lib.format_prompt(tokenizer, r["prompt"]) for r in rows]
  targets = [data_lib.sft_target({**r, "sft_answer": r["answer"]}) for r in rows]
  target_len = max(len(t) + 1 for t in tokenizer(targets, add_special_tokens=False)["input_ids"])
  prompt_len = max(len(p) for p in tokenizer(prompts, add_special_tokens=False)["input_ids"])
  assert target_len <= c.sampler.max_new_tokens
  assert prompt_len <= c.data.max_prompt_len
  assert prompt_len + target_len <= c.sft.max_len


def test_demo_config_names_its_variants_on_a_wrong_one():
  with pytest.raises(UserError, match=r"configs/demo.py:clear: no such variant; allowed: "
                     r"configs/demo.py or configs/demo.py:think or configs/demo.py:copy or "
                     r"configs/demo.py:clean or "
                     r"configs/demo.py:countdown or configs/demo.py:process or "
                     r"configs/demo.py:lora$"):
    _load("configs/demo.py:clear")


def test_demo_process_variant_is_the_copy_demo_with_step_rewards():
  outcome, process = _flat(_load("configs/demo.py:copy").to_dict()), _flat(
      _load("configs/demo.py:process").to_dict())
  changed = {k: v for k, v in process.items() if outcome[k] != v}
  assert changed == {"grpo.supervision": "process", "step_rewards": "arithmetic_steps"}
  assert config.freeze(_load("configs/demo.py:process"), num_devices=1).grpo.step_slots == 16


def test_hf_config_parses_arguments():
  cfg = _load("configs/hf.py:model=/ckpt/qwen,data=/d/train.jsonl,eval=/d/test.jsonl")
  c = config.freeze(cfg, num_devices=1)
  assert c.model.path == "/ckpt/qwen"
  assert c.model.dtype == "bfloat16"
  assert c.data.source == "jsonl:/d/train.jsonl"
  assert c.data.eval_source == "jsonl:/d/test.jsonl"
  assert c.rewards.startswith("accuracy:1")


@pytest.mark.parametrize("arg, needle", [
    ("model=/m", "data missing"),
    (None, "model, data missing"),
    ("model=/m,data=/d.jsonl,dtype=x", "'dtype=x' is not allowed"),
    ("model=/m,data", "'data' is not allowed"),
])
def test_hf_config_argument_errors(arg, needle):
  hf = pytest.importorskip("configs.hf")
  with pytest.raises(UserError, match=needle) as e:
    hf.get_config(arg)
  assert "\n" not in str(e.value)
  assert "model=DIR,data=FILE.jsonl" in str(e.value)


def _error(num_devices=8, **overrides) -> str:
  cfg = config.defaults().to_dict()  # a plain dict: ConfigDict would refuse bad types
  for key, value in overrides.items():
    section, _, name = key.partition("__")
    if name:
      cfg[section][name] = value
    else:
      cfg[section] = value
  with pytest.raises(UserError) as e:
    config.freeze(cfg, num_devices=num_devices)
  msg = str(e.value)
  assert "\n" not in msg
  return msg


@pytest.mark.parametrize("overrides, needles", [
    # Enumerations.
    (dict(grpo__loss_type="ppo"), ["grpo.loss_type='ppo'", "grpo | bnpo | dr_grpo | dapo"]),
    (dict(grpo__scale_rewards="std"), ["grpo.scale_rewards", "group | batch | none"]),
    (dict(grpo__importance_sampling_level="seq"), ["importance_sampling_level", "token"]),
    (dict(model__dtype="float16"), ["model.dtype='float16'", "float32 | bfloat16"]),
    (dict(data__source="hf:gsm8k"), ["data.source='hf:gsm8k'", "jsonl:<file>"]),
    (dict(data__source="jsonl:"), ["data.source='jsonl:'"]),
    (dict(data__eval_source="test.jsonl"), ["data.eval_source='test.jsonl'"]),
    (dict(train__lr_schedule="linear"), ["train.lr_schedule", "cosine | constant"]),
    # Ranges.
    (dict(grpo__num_generations=1), ["grpo.num_generations=1", ">= 2"]),
    (dict(grpo__beta=-0.1), ["grpo.beta=-0.1", ">= 0"]),
    (dict(grpo__epsilon_low=-0.2), ["grpo.epsilon_low=-0.2"]),
    (dict(grpo__delta=1.1), ["grpo.delta=1.1", "> 1 + epsilon_high"]),
    (dict(sampler__temperature=-1.0), ["sampler.temperature=-1.0"]),
    (dict(sampler__top_p=0.0), ["sampler.top_p=0.0", "0 < top_p <= 1"]),
    (dict(sampler__top_p=1.5), ["sampler.top_p=1.5"]),
    (dict(sampler__top_k=-1), ["sampler.top_k=-1"]),
    (dict(train__num_steps=0), ["train.num_steps=0", ">= 1"]),
    (dict(checkpoint__keep=0), ["checkpoint.keep=0"]),
    (dict(eval__k=0), ["eval.k=0"]),
    (dict(data__prompt_buckets=(64, 32)), ["data.prompt_buckets", "increasing"]),
    (dict(rewards=" "), ["rewards=' '"]),
    (dict(grpo__supervision="steps"), ["grpo.supervision='steps'", "outcome | process"]),
    (dict(grpo__max_steps_per_completion=0), ["grpo.max_steps_per_completion=0", ">= 1"]),
    (dict(grpo__supervision="process"), ["step_rewards=''", "grpo.supervision='process'"]),
    (dict(step_rewards="arithmetic_steps"),
     ["step_rewards='arithmetic_steps'", "'' unless grpo.supervision='process'"]),
    (dict(grpo__supervision="process", step_rewards="arithmetic_steps",
          grpo__scale_rewards="batch"), ["grpo.scale_rewards='batch'", "'group' with"]),
    # Types.
    (dict(train__num_steps=1.5), ["train.num_steps=1.5", "expected int"]),
    (dict(grpo__epsilon_high="x"), ["grpo.epsilon_high='x'", "float or None"]),
    (dict(sampler__stop_at_eos=1), ["sampler.stop_at_eos=1", "expected bool"]),
    (dict(mesh__shape=(1, "a", 1)), ["mesh.shape", "tuple of ints"]),
    # Divisibility.
    (dict(grpo__minibatches_per_iteration=3),
     ["grpo.minibatches_per_iteration=3", "divisor of data.prompts_per_step=4"]),
    (dict(data__prompts_per_step=3, grpo__num_generations=2),
     ["data.prompts_per_step=3", "divisible", "data*fsdp = 8"]),
    (dict(train__grad_accum_steps=8), ["train.grad_accum_steps=8", "data*fsdp = 8"]),
    (dict(grpo__num_generations=2, grpo__oversample=1.25),
     ["grpo.oversample=1.25", "= 10 must be divisible", "data*fsdp = 8"]),
    (dict(grpo__oversample=0.5), ["grpo.oversample=0.5", ">= 1 (1 = no over-sampling)"]),
    (dict(grpo__top_entropy_quantile=1.5), ["grpo.top_entropy_quantile=1.5", "0 <= q <= 1"]),
    (dict(grpo__top_entropy_quantile=-0.1), ["grpo.top_entropy_quantile=-0.1", ">= 0"]),
    (dict(model__demo=dict(num_heads=3)), ["model.demo.hidden_size=128", "num_heads=3"]),
    # Mesh.
    (dict(mesh__shape=(1, -1)), ["mesh.shape=(1, -1)", "at most one -1"]),
    (dict(mesh__shape=(-1, -1, 1)), ["mesh.shape=(-1, -1, 1)"]),
    (dict(mesh__shape=(2, 2, 1)), ["mesh.shape=(2, 2, 1)", "number of devices, 8"]),
    (dict(mesh__shape=(3, -1, 1)), ["mesh.shape=(3, -1, 1)", "number of devices, 8"]),
    (dict(mesh__shape=(1, 0, 1)), ["mesh.shape=(1, 0, 1)"]),
])
def test_invalid_values_name_the_key(overrides, needles):
  msg = _error(**overrides)
  for needle in needles:
    assert needle in msg


def test_unknown_key_suggests_the_closest():
  cfg = config.defaults()
  cfg.grpo.unlock()
  cfg.grpo.epsilon_hgh = 0.28
  with pytest.raises(UserError, match=r"unknown config key grpo\.epsilon_hgh; "
                     r"did you mean grpo\.epsilon_high\?$"):
    config.freeze(cfg, num_devices=1)
  cfg = config.defaults()
  cfg.zzz = 1
  with pytest.raises(UserError, match=r"unknown config key zzz$"):
    config.freeze(cfg, num_devices=1)


def test_section_replaced_by_a_value_is_an_error():
  msg = _error(num_devices=1, sampler=3)
  assert msg.startswith("config key sampler=3: expected a section")


def test_oversample_rounds_the_sampled_prompts():
  c = config.freeze({"data": {"prompts_per_step": 4}, "grpo": {"oversample": 1.5}},
                    num_devices=1)
  assert (c.data.prompts_per_step, c.sampled_prompts_per_step) == (4, 6)
  assert config.freeze(config.defaults(), num_devices=1).sampled_prompts_per_step == 4


def test_missing_keys_take_defaults_and_lists_become_tuples():
  c = config.freeze({"grpo": {"beta": 1}, "mesh": {"shape": [1, 1, -1]}}, num_devices=2)
  assert c.grpo.beta == 1.0 and isinstance(c.grpo.beta, float)
  assert c.mesh.shape == (1, 1, 2)
  assert c.train == config.TrainCfg()


@pytest.mark.parametrize("module, arg, chips, fewer", [
    ("tpu_v4", "long", 4, 4), ("tpu_v4", "7b,long", 16, 4), ("tpu_v4", "7b,long,lora", 4, 4),
    ("tpu_v5e", "long", 8, 4), ("tpu_v5e", "7b,long", 32, 4), ("tpu_v5e", "7b,long,lora", 8, 4),
    ("tpu_v6e", "long", 8, 4), ("tpu_v6e", "7b,long", 8, 8), ("tpu_v6e", "7b,long,lora", 8, 4),
    ("gpu", "long", 1, 4), ("gpu", "long", 8, 4), ("gpu", "7b,long", 8, 4),
    ("gpu", "7b,long,lora", 1, 4)])
def test_the_accelerator_configs_have_long_chain_of_thought_variants(module, arg, chips, fewer):
  """"long": N = 8,192 new tokens (7B: 4,096), G = 8, a quarter of the prompts (an eighth for
  the full 7B on a v6e-8, whose memory holds no more), evaluation on 8 prompts; valid on the
  slices the config names (each micro-batch splits over the rows' shards)."""
  import importlib  # pylint: disable=g-import-not-at-top
  get = importlib.import_module(f"configs.{module}").get_config
  plain = get(arg.replace("long", "").strip(",") + ",model=/m,data=/d.jsonl")
  cfg = get(f"{arg},model=/m,data=/d.jsonl")
  assert cfg.sampler.max_new_tokens == (4096 if "7b" in arg else 8192)
  assert cfg.grpo.num_generations == 8 and cfg.eval.num_prompts == 8
  assert cfg.data.prompts_per_step == plain.data.prompts_per_step // fewer
  assert cfg.model.lora.rank == plain.model.lora.rank
  config.freeze(cfg, num_devices=chips)
  with pytest.raises(UserError, match=r"at most one model size .*, \"lora\" and \"long\""):
    get("long,long,model=/m,data=/d.jsonl")
