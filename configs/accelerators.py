"""What the accelerator configs (tpu_v4.py, tpu_v5e.py, gpu.py) share.

Each takes configs/hf.py's arguments, optionally led by a model size and "lora":

  --config=configs/tpu_v4.py:model=DIR,data=FILE.jsonl       # a Qwen2.5-1.5B-class model
  --config=configs/tpu_v4.py:7b,model=DIR,data=FILE.jsonl    # a Qwen2.5-7B-class model
  --config=configs/tpu_v5e.py:7b,lora,model=DIR,data=FILE.jsonl   # LoRA rank 64 on it

Memory arithmetic used by their comments, for P parameters (1.5B: P = 1.54e9; 7B: 7.62e9),
float32 master weights and bfloat16 compute:
  params 4P + AdamW moments 8P + reference params 4P = 16P bytes, kept for the whole run
    (1.5B: 24.7 GB; 7B: 121.8 GB), split over all devices by FSDP (and tensor);
  gradients and their accumulator 8P bytes during the update (1.5B: 12.3 GB; 7B: 60.9 GB);
  rollout weights 2P bytes gathered over (data, fsdp) in bfloat16, split by tensor only
    (1.5B: 3.1 GB; 7B: 15.2 GB);
  KV cache per row of S = 256 + 768 tokens, bfloat16: L * 2 * kv_heads * 128 * 2 bytes * S
    (1.5B: 28 * 2 * 2 * 128 * 2 * 1024 = 29.4 MB; 7B, 4 kv heads: 58.7 MB), split by tensor;
  activations with per-block remat, per row: the L block inputs S * D * 2 bytes each (1.5B:
    0.09 GB; 7B: 0.21 GB) plus one block's float32 attention scores H * S^2 * 4 bytes (1.5B:
    0.05 GB; 7B: 0.12 GB), about three times that with the softmax and its gradient.
The reference log-probs take one forward without gradients over all of a device's rows, one
block at a time. Rollout, that forward and the update do not overlap: the peak is the largest
of the three on top of the 16P.

"lora": rank-64 adapters on q, k, v, o, gate, up, down over a frozen bfloat16 base (LORA
below). Estimates by arithmetic, for the compile tool (grpo_jax.aot) to check:
  base 2P bytes (7B: 15.2 GB; Llama-3.1-8B, P = 8.03e9: 16.1 GB), split like the params above;
  adapters A = r (in + out) per projection, 2.1% of P (7B: 161.5M; 8B: 167.8M), float32 with
    AdamW's moments: 12A bytes (7B: 1.9 GB; 8B: 2.0 GB), and during the update their gradients
    and accumulator 8A (1.3 GB); no reference copy: pi_ref is the base with the adapters off;
  rollout: the base gathered in bfloat16 as above (2P / tensor) and the adapters merged into a
    copy of it (another 2P / tensor where XLA does not write it in place);
  activations and KV cache as above (8B, 8 kv heads: KV 134 MB per row of S = 1024).
"""

import ml_collections

from configs import hf
from grpo_jax.errors import UserError

SIZES = ("1.5b", "7b")
LORA = dict(rank=64, alpha=64.0, base_dtype="bfloat16", learning_rate=1e-5)


def split_size(arg: str | None) -> tuple[str, bool, str]:
  """("1.5b" | "7b", whether "lora" is given, the k=v items for hf.parse_arg) from
  "[size,][lora,]k=v,k=v"."""
  items = [item.strip() for item in (arg or "").split(",") if item.strip()]
  flags = [item for item in items if "=" not in item]
  sizes = [item for item in flags if item != "lora"]
  if len(sizes) > 1 or (sizes and sizes[0] not in SIZES) or flags.count("lora") > 1:
    raise UserError(f"config argument {','.join(flags)!r} is not allowed: at most one model "
                    f"size ({' | '.join(SIZES)}) and \"lora\" before model=DIR,data=FILE.jsonl")
  return ((sizes[0] if sizes else SIZES[0]), "lora" in flags,
          ",".join(i for i in items if "=" in i))


def make_config(arg: str | None, *, prompts_per_step: int,
                mesh_shape: dict[str, tuple[int, int, int]],
                grad_accum_steps: dict[str, int]) -> tuple[str, ml_collections.ConfigDict]:
  """(size, configs/hf.py's config with the sequence lengths of the arithmetic above, B and
  the size's mesh.shape and gradient accumulation; with "lora", LORA's adapters and rate)."""
  size, lora, rest = split_size(arg)
  cfg = hf.get_config(rest)
  cfg.data.prompts_per_step = prompts_per_step  # B
  cfg.data.max_prompt_len = 256  # T
  cfg.sampler.max_new_tokens = 768  # N; S = T + N = 1024
  cfg.grpo.num_generations = 8  # G
  cfg.mesh.shape = mesh_shape[size]
  cfg.train.grad_accum_steps = grad_accum_steps[size]
  if lora:
    cfg.model.lora.rank = LORA["rank"]
    cfg.model.lora.alpha = LORA["alpha"]
    cfg.model.lora.base_dtype = LORA["base_dtype"]
    cfg.train.learning_rate = LORA["learning_rate"]
  return size, cfg


# Both TPU generations: B * G = 256 rows per step; 1.5b: FSDP over every chip; 7b: FSDP
# across chips and heads / MLP / vocab over 4.
TPU = dict(prompts_per_step=32, mesh_shape={"1.5b": (1, -1, 1), "7b": (1, -1, 4)},
           grad_accum_steps={"1.5b": 4, "7b": 8})
