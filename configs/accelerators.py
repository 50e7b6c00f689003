"""What the accelerator configs (tpu_v4.py, tpu_v5e.py, tpu_v6e.py, gpu.py) share.

Each takes configs/hf.py's arguments, optionally led by a model size, "lora" and "long"; they
scan their layers (model.scan_layers, README "Layers compiled once"), but gpu.py's 1.5b:

  --config=configs/tpu_v4.py:model=DIR,data=FILE.jsonl       # a Qwen2.5-1.5B-class model
  --config=configs/tpu_v4.py:7b,model=DIR,data=FILE.jsonl    # a Qwen2.5-7B-class model
  --config=configs/tpu_v5e.py:0.5b,model=DIR,data=FILE.jsonl  # a Qwen2.5-0.5B-class one (TPU)
  --config=configs/tpu_v5e.py:gemma3-1b,model=DIR,data=FILE.jsonl  # Gemma 3 1B (TPU)
  --config=configs/tpu_v5e.py:7b,lora,model=DIR,data=FILE.jsonl   # LoRA rank 64 on it
  --config=configs/tpu_v5e.py:long,model=DIR,data=FILE.jsonl  # 8,192 new tokens (7b: 4,096)

What each needs per chip is the compiler's word, not arithmetic: every config's comment gives
the peak that `python -m grpo_jax.aot --config=... --topology=SLICE` reported for its slice
(README "Will it fit?"), with the date and versions, or says that it has not been compiled
yet; run it for another slice or another setting before a run. What the memory holds, for P
parameters with float32 master weights: the train state, 16P bytes (params, AdamW's two
moments, the reference params) split over every chip, and during the update about 8P of
gradients; sampling gathers the weights in bfloat16 (2P, split by tensor only) and a KV cache
of S = T + N = 1024 slots a row.

"lora": rank-64 adapters on q, k, v, o, gate, up, down over a frozen bfloat16 base (LORA
below): no reference copy (pi_ref is the base with the adapters off), AdamW's moments for the
adapters only (2.1% of P at rank 64 on a 7B). The compiler's figures: the configs' docstrings.
"long": see LONG below; the compiler's figures: the configs' docstrings.
"""

import ml_collections

from configs import hf
from grpo_jax.errors import UserError

DEFAULT_SIZE = "1.5b"
OPTIONS = frozenset({"lora", "long"})
LORA = dict(rank=64, alpha=64.0, base_dtype="bfloat16", learning_rate=1e-5)
# "long": chains of thought of N = 8,192 new tokens (4,096 for 7B), G = 8 as ever, B / 4
# prompts (tpu_v6e.py's full 7B: B / 8; a micro-batch holds a quarter of the rows, each 8.25
# times longer at 1.5B), and evaluation on 8 prompts (k = 4 rows each, every row's KV cache
# 8,448 slots long).
LONG = dict(new_tokens={"7b": 4096, "*": 8192}, fewer_prompts=4, eval_prompts=8)


def split_size(arg: str | None, sizes: tuple[str, ...]) -> tuple[str, frozenset[str], str]:
  """(one of sizes, default 1.5b; the OPTIONS given; the k=v items for hf.parse_arg) from
  "[size,][lora,][long,]k=v,k=v"."""
  items = [item.strip() for item in (arg or "").split(",") if item.strip()]
  flags = [item for item in items if "=" not in item]
  named = [item for item in flags if item not in OPTIONS]
  if (len(named) > 1 or (named and named[0] not in sizes)
      or any(flags.count(option) > 1 for option in OPTIONS)):
    raise UserError(f"config argument {','.join(flags)!r} is not allowed: at most one model "
                    f"size ({' | '.join(sizes)}), \"lora\" and \"long\" before "
                    "model=DIR,data=FILE.jsonl")
  return ((named[0] if named else DEFAULT_SIZE), frozenset(flags) & OPTIONS,
          ",".join(i for i in items if "=" in i))


def make_config(arg: str | None, *, prompts_per_step: int,
                mesh_shape: dict[str, tuple[int, int, int]],
                grad_accum_steps: dict[str, int]) -> tuple[str, ml_collections.ConfigDict]:
  """(size, configs/hf.py's config with the sequence lengths above, B and the size's
  mesh.shape and gradient accumulation, the sizes being mesh_shape's keys; with "lora",
  LORA's adapters and rate, and the accumulation of grad_accum_steps["<size>,lora"] where
  there is one; with "long", LONG's lengths and prompts)."""
  size, options, rest = split_size(arg, tuple(mesh_shape))
  cfg = hf.get_config(rest)
  cfg.data.prompts_per_step = prompts_per_step  # B
  cfg.data.max_prompt_len = 256  # T
  cfg.sampler.max_new_tokens = 768  # N; S = T + N = 1024
  cfg.grpo.num_generations = 8  # G
  cfg.mesh.shape = mesh_shape[size]
  cfg.train.grad_accum_steps = grad_accum_steps[size]
  # Blocks stacked and scanned: compiled once, and each block's rematerialised activations
  # live only inside its own loop step (README "Layers compiled once").
  cfg.model.scan_layers = True
  if "long" in options:
    cfg.sampler.max_new_tokens = LONG["new_tokens"].get(size, LONG["new_tokens"]["*"])
    cfg.data.prompts_per_step = prompts_per_step // LONG["fewer_prompts"]
    cfg.eval.num_prompts = LONG["eval_prompts"]
  if "lora" in options:
    cfg.train.grad_accum_steps = grad_accum_steps.get(f"{size},lora", grad_accum_steps[size])
    cfg.model.lora.rank = LORA["rank"]
    cfg.model.lora.alpha = LORA["alpha"]
    cfg.model.lora.base_dtype = LORA["base_dtype"]
    cfg.train.learning_rate = LORA["learning_rate"]
  return size, cfg


# Every TPU generation: B * G = 256 rows per step; 1.5b: FSDP over every chip; 7b: FSDP
# across chips and heads / MLP / vocab over 4; 7b,lora: 16 micro-batches (at 8 the v5e-8
# train step needed 16.30 GiB of 15.75 by the compiler, tpu_v5e.py).
TPU = dict(prompts_per_step=32,
           mesh_shape={"0.5b": (1, -1, 1), "1.5b": (1, -1, 1), "gemma3-1b": (1, -1, 1),
                       "7b": (1, -1, 4)},
           grad_accum_steps={"0.5b": 4, "1.5b": 4, "gemma3-1b": 4, "7b": 8, "7b,lora": 16})
