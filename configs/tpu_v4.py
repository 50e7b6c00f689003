"""GRPO on Cloud TPU v4 (32 GiB HBM per chip; a v4-N slice has N/2 chips, 4 per host).

  python -m grpo_jax.main --config=configs/tpu_v4.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v4.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v4.py:7b,lora,model=DIR,data=FILE.jsonl ...

launch/tpu_vm.sh runs it on every host of a slice. Arguments as configs/hf.py's, optionally
led by the model size (what the memory holds: configs/accelerators.py).

Figures: the compiler's estimates per chip of the 30.75 GiB libtpu lets a program use, from
`python -m grpo_jax.aot --config=configs/tpu_v4.py:[ARGS,]model=NAME,data=unused.jsonl
--topology=SLICE --noroofline` (2026-11-29, jax 0.10.2, libtpu 0.0.42.1), layers scanned; the
0.5b, gemma3-1b, 7b and 7b,long ones since the log-prob passes run micro-batch by micro-batch.

1.5b (Qwen2.5-1.5B class), v4-8 and larger, FSDP over every chip, 4 micro-batches. v4-8
  (model=Qwen2.5-1.5B): train step 14.01 GiB (54% free), init 7.31, evaluation sampler 7.24.
1.5b,long: 8,192 new tokens, B 8 x G 8. v4-8: train step 18.87 GiB (39% free), init 7.31,
  evaluation sampler 7.30 (2026-11-30).
0.5b (Qwen2.5-0.5B class), v4-8, FSDP over every chip, 4 micro-batches. v4-8
  (model=Qwen2.5-0.5B): train step 5.37 GiB (83% free), init 2.46, evaluation sampler 2.60
  (2026-11-30).
gemma3-1b (Gemma 3 1B, scanned as 7 blocks), v4-8, FSDP over every chip, 4 micro-batches. v4-8
  (model=gemma-3-1b-it): train step 10.93 GiB (64% free), init 4.73, evaluation sampler 5.70
  (2026-11-30).
7b (Qwen2.5-7B class), v4-32 (16 chips), FSDP 4 x tensor 4, 8 micro-batches. v4-32
  (model=Qwen2.5-7B): train step 15.41 GiB (50% free), init 8.97, evaluation sampler 7.65
  (2026-11-30).
7b,long: 4,096 new tokens, B 8 x G 8. v4-32: train step 16.06 GiB (48% free), init 8.97,
  evaluation sampler 7.24 (2026-11-30).
7b,lora (Qwen2.5-7B, rank 64), v4-8 (4 chips, FSDP 1 x tensor 4), 16 micro-batches. v4-8
  (model=Qwen2.5-7B): train step 15.97 GiB (48% free), init 8.25, evaluation sampler 10.36.
"""

import ml_collections

from configs import accelerators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return accelerators.make_config(arg, **accelerators.TPU)[1]
