"""GRPO on Cloud TPU v4 (32 GiB HBM per chip; a v4-N slice has N/2 chips, 4 per host).

  python -m grpo_jax.main --config=configs/tpu_v4.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v4.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v4.py:7b,lora,model=DIR,data=FILE.jsonl ...

launch/tpu_vm.sh runs it on every host of a slice. Arguments as configs/hf.py's, optionally
led by the model size; memory arithmetic in configs/accelerators.py.

1.5b (Qwen2.5-1.5B class), v4-8 and larger, FSDP over every chip. Per chip on a v4-8 (4):
  16P = 24.7 GB / 4 = 6.2 GB, plus during the update gradients 12.3 GB / 4 = 3.1 GB and a
  micro-batch of 256 / 4 / 4 = 16 rows: 16 * 0.09 = 1.4 GB of block inputs and about
  3 * 16 * 0.05 = 2.4 GB for one block's attention: about 13 GB. Rollout instead: 6.2 GB +
  3.1 GB of gathered bf16 weights + 64 rows of KV cache (1.9 GB): about 11 GB.
7b (Qwen2.5-7B class), v4-32 (16 chips; v4-16 at a pinch), FSDP x tensor 4. Per chip on 16:
  121.8 GB / 16 = 7.6 GB, plus gradients 60.9 GB / 16 = 3.8 GB and 256 / 8 / 4 = 8 rows of
  activations (8 * 0.21 = 1.6 GB + one block's heads / 4): about 14 GB. Rollout: 7.6 GB +
  15.2 GB / 4 = 3.8 GB of weights + 64 rows of KV cache / 4 (0.9 GB): about 12 GB.
7b,lora (Qwen2.5-7B, rank 64), v4-8 (4 chips, FSDP 1 x tensor 4), estimates by arithmetic. Per
  chip: base 15.2 GB / 4 = 3.8 GB, adapters and moments 1.9 GB / 4 = 0.5 GB (or all of an
  adapter not split by tensor: at most 1.9 GB). Update: gradients 1.3 GB and 256 / 8 = 32 rows:
  32 * 0.21 = 6.7 GB of block inputs and 3 * 32 * 0.12 / 4 = 2.9 GB for one block's attention:
  about 17 GB. Rollout: 5.7 GB + 3.8 GB of weights (already whole over FSDP 1) + the merged
  copy 3.8 GB + 256 rows of KV cache / 4 (3.8 GB): about 17 GB of the 32 GiB.
"""

import ml_collections

from configs import accelerators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return accelerators.make_config(arg, **accelerators.TPU)[1]
