"""GRPO on Cloud TPU v5e (16 GiB HBM per chip; a v5litepod-N slice has N chips).

  python -m grpo_jax.main --config=configs/tpu_v5e.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v5e.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v5e.py:7b,lora,model=DIR,data=FILE.jsonl ...

Arguments as configs/hf.py's, optionally led by the model size; memory arithmetic in
configs/accelerators.py.

1.5b (Qwen2.5-1.5B class), v5litepod-8 and larger, FSDP over every chip. Per chip on 8:
  16P = 24.7 GB / 8 = 3.1 GB, plus during the update gradients 12.3 GB / 8 = 1.5 GB and
  256 / 4 / 8 = 8 rows: 8 * 0.09 = 0.7 GB of block inputs and about 3 * 8 * 0.05 = 1.2 GB
  for one block's attention: about 7 GB. Rollout: 3.1 GB + 3.1 GB of gathered bf16 weights
  + 32 rows of KV cache (0.9 GB): about 7 GB of the 16 GiB.
7b (Qwen2.5-7B class), v5litepod-32, FSDP 8 x tensor 4. Per chip: 121.8 GB / 32 = 3.8 GB,
  plus gradients 60.9 GB / 32 = 1.9 GB and 256 / 8 / 8 = 4 rows (0.8 GB of block inputs):
  about 7 GB. Rollout: 3.8 GB + 15.2 GB / 4 = 3.8 GB of weights + 32 rows of KV cache / 4
  (0.5 GB): about 8 GB. On a v5litepod-16, 7.6 GB + 3.8 GB of gradients before activations.
  Evaluation samples its rows without the rollout layout, so each chip may hold the KV cache
  of all of them (4 * 58.7 MB per prompt at k = 4): 16 prompts keep that to 3.8 GB.
7b,lora (Qwen2.5-7B, rank 64), v5litepod-8: FSDP 2 x tensor 4, estimates by arithmetic. Per chip:
  base 15.2 GB / 8 = 1.9 GB, adapters and moments 1.9 GB split 2 or 4 ways (at most 1.0 GB).
  Update: gradients 1.3 GB / 2 = 0.6 GB and 256 / 8 / 2 = 16 rows: 16 * 0.21 = 3.3 GB of block
  inputs and 3 * 16 * 0.12 / 4 = 1.4 GB for one block's attention: about 8 GB. Rollout: 2.9 GB
  + 15.2 GB / 4 = 3.8 GB of gathered weights + their merged copy 3.8 GB + 128 rows of KV cache
  / 4 (1.9 GB): about 12.4 GB of the 16 GiB (a full fine-tune needs 121.8 GB / 8 = 15.2 GB
  before activations).
"""

import ml_collections

from configs import accelerators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size, cfg = accelerators.make_config(arg, **accelerators.TPU)
  if size == "7b":
    cfg.eval.num_prompts = 16
  return cfg
