"""GRPO on Cloud TPU v5e (16 GiB HBM per chip; a v5litepod-N slice has N chips).

  python -m grpo_jax.main --config=configs/tpu_v5e.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v5e.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v5e.py:7b,lora,model=DIR,data=FILE.jsonl ...
  python -m grpo_jax.main --config=configs/tpu_v5e.py:long,model=DIR,data=FILE.jsonl ...

Arguments as configs/hf.py's, optionally led by the model size (0.5b, 1.5b, gemma3-1b, 7b),
"lora" and "long" (configs/accelerators.py). Every figure below is the compiler's estimate per
chip of the 15.75 GiB libtpu lets a program use, from `python -m grpo_jax.aot --config=
configs/tpu_v5e.py:[ARGS,]model=NAME,data=unused.jsonl --topology=SLICE --noroofline`
(2026-11-29, jax 0.10.2, libtpu 0.0.42.1), layers scanned; "free" is what the train step
leaves (the tool wants 10%).

1.5b (Qwen2.5-1.5B class), v5litepod-8 and larger, FSDP over every chip, 4 micro-batches.
  v5e-8 (model=Qwen2.5-1.5B): train step 8.96 GiB (43% free), init 3.71, evaluation sampler
  5.42. Unrolled (before model.scan_layers) the step needed 13.87 GiB.
1.5b,long: 8,192 new tokens, B 8 x G 8. v5e-8: train step 10.82 GiB (31% free), init 3.71,
  evaluation sampler 5.22.
0.5b (Qwen2.5-0.5B class), v5litepod-4, FSDP over every chip, 4 micro-batches. v5e-4
  (model=Qwen2.5-0.5B): train step 5.49 GiB (65% free), init 2.43, evaluation sampler 2.31
  (unrolled, before this session's changes: 7.75).
gemma3-1b (Gemma 3 1B: 26 layers, 5 sliding to 1 full, scanned as 7 blocks), v5litepod-8,
  FSDP over every chip, 4 micro-batches. v5e-8 (model=gemma-3-1b-it): train step 7.05 GiB
  (55% free), init 2.43, evaluation sampler 4.20. Unrolled, its step had not finished
  compiling after 35 minutes on a 2-core CPU; scanned, 329 s.
7b (Qwen2.5-7B class), v5litepod-32, FSDP 8 x tensor 4; evaluation on 16 prompts. v5e-32
  (model=Qwen2.5-7B): train step 10.69 GiB (32% free), init 4.54, evaluation sampler 5.71.
  7b,long (4,096 new tokens, B 8 x G 8): v5e-32 train step 10.67 GiB (32% free), init 4.54,
  evaluation sampler 5.84 (2026-11-30).
7b,lora (Qwen2.5-7B, rank 64), v5litepod-8: FSDP 2 x tensor 4, 16 micro-batches. v5e-8
  (model=Qwen2.5-7B): train step 10.70 GiB (32% free), init 4.42, evaluation sampler 8.38.
  With 8 micro-batches, unrolled, the compiler refused the step (16.30 GiB); a full
  fine-tune would need 121.8 GB / 8 = 15.2 GB of state alone.
"""

import ml_collections

from configs import accelerators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size, cfg = accelerators.make_config(arg, **accelerators.TPU)
  if size == "7b":
    cfg.eval.num_prompts = min(cfg.eval.num_prompts, 16)
  return cfg
