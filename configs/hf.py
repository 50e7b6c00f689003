"""GRPO on a local Hugging Face checkpoint and a JSONL file of {"prompt", "answer"} rows.

  python -m grpo_jax.main --config=configs/hf.py:model=DIR,data=FILE.jsonl \
      --workdir=/tmp/run [--config.a.b=value ...]

Arguments (comma separated k=v): model (required, checkpoint dir), data (required,
JSONL file), eval (optional, JSONL file of held-out rows).
"""

import ml_collections

from grpo_jax import config
from grpo_jax.errors import UserError

_REQUIRED = ("model", "data")
_OPTIONAL = ("eval",)


def parse_arg(arg: str | None) -> dict[str, str]:
  """Parses "k=v,k=v" into a dict, checking the names against _REQUIRED/_OPTIONAL."""
  allowed = "configs/hf.py:model=DIR,data=FILE.jsonl[,eval=FILE.jsonl]"
  args = {}
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or key not in _REQUIRED + _OPTIONAL or not value:
      raise UserError(f"config argument {item.strip()!r} is not allowed: use {allowed}")
    args[key] = value
  missing = [k for k in _REQUIRED if k not in args]
  if missing:
    raise UserError(f"config argument {', '.join(missing)} missing: use {allowed}")
  return args


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  cfg = config.defaults()
  cfg.model.path = args["model"]
  cfg.model.dtype = "bfloat16"
  cfg.model.param_dtype = "float32"
  cfg.model.remat = True
  cfg.data.source = "jsonl:" + args["data"]
  if "eval" in args:
    cfg.data.eval_source = "jsonl:" + args["eval"]
  cfg.data.prompts_per_step = 16  # B
  cfg.data.max_prompt_len = 512
  cfg.grpo.num_generations = 8  # G
  cfg.grpo.beta = 0.04
  cfg.sampler.max_new_tokens = 512  # N
  cfg.sampler.temperature = 1.0
  cfg.rewards = "accuracy:1,format:0.2"
  cfg.train.num_steps = 500
  cfg.train.learning_rate = 1e-6
  cfg.train.warmup_steps = 10
  cfg.train.weight_decay = 0.1
  cfg.checkpoint.every_steps = 50
  cfg.eval.every_steps = 50
  cfg.eval.num_prompts = 128
  return cfg
