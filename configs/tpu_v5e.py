"""GRPO on Cloud TPU v5e (16 GiB HBM per chip; a v5litepod-N slice has N chips).

  python -m grpo_jax.main --config=configs/tpu_v5e.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v5e.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v5e.py:7b,lora,model=DIR,data=FILE.jsonl ...

Arguments as configs/hf.py's, optionally led by the model size (0.5b, 1.5b, 7b; what the
memory holds: configs/accelerators.py).

1.5b (Qwen2.5-1.5B class), v5litepod-8 and larger, FSDP over every chip, 4 micro-batches.
  Compiled for a v5e-8 by `python -m grpo_jax.aot --config=configs/tpu_v5e.py:model=Qwen2.5-1.5B,
  data=unused.jsonl --topology=v5e-8 --noroofline` (2026-11-29, jax 0.10.2, libtpu 0.0.42.1;
  compiler estimates per chip, of the 15.75 GiB libtpu lets a program use): train step peak
  13.87 GiB (88%: 12% free, the 10% headroom kept; the state 2.88 GiB), init 3.71 GiB,
  evaluation sampler 8.33 GiB (its 256 rows' KV cache, 7.0 GiB, is on every chip). Little
  room: a longer prompt bucket or more new tokens will not fit with 10% free; check with the
  command. Its largest buffers are per-layer copies the remat should not keep (27 x
  bf16[64,12,768,128] of the attention, 4.1 GiB; 28 x bf16[6136,8960] MLP inputs, 3.1 GiB).
0.5b (Qwen2.5-0.5B class), v5litepod-4: not yet compiled; check it with
  `--config=configs/tpu_v5e.py:0.5b,model=Qwen2.5-0.5B,data=unused.jsonl --topology=v5e-4`.
7b (Qwen2.5-7B class), v5litepod-32, FSDP 8 x tensor 4. Not yet compiled; by hand, per
  chip: 121.8 GB / 32 = 3.8 GB,
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
    cfg.eval.num_prompts = min(cfg.eval.num_prompts, 16)
  return cfg
