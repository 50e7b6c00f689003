"""GRPO on Cloud TPU v6e (Trillium: 32 GiB HBM per chip; a v6e-N slice has N chips).

  python -m grpo_jax.main --config=configs/tpu_v6e.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v6e.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR

Arguments as configs/hf.py's, optionally led by the model size (0.5b, 1.5b, gemma3-1b, 7b),
"lora" and "long"; the same settings as configs/tpu_v5e.py, on chips with twice the v5e's HBM
(31.25 GiB usable), but for 7b's 16 micro-batches and 7b,long's 4 prompts a step. Compiled for
a v6e-8 by `python -m grpo_jax.aot --config=configs/tpu_v6e.py:[ARGS,]model=NAME,
data=unused.jsonl --topology=v6e-8 --noroofline` (jax 0.10.2, libtpu 0.0.42.1; compiler
estimates per chip, layers scanned):

1.5b (model=Qwen2.5-1.5B): train step 8.82 GiB (72% free), init 3.66, evaluation sampler
  5.65 (2026-11-29).
7b (model=Qwen2.5-7B), FSDP 2 x tensor 4, 16 micro-batches: train step 27.98 GiB (10.5% free),
  init 17.76, evaluation sampler 10.30 (2026-11-30; the same with the log-prob passes
  micro-batched). With the 8 micro-batches of the other TPU configs the compiler gave 29.89
  GiB (4% free: not the 10% the tool asks).
7b,lora (Qwen2.5-7B, rank 64), 16 micro-batches: train step 9.59 GiB (69% free), init 4.41,
  evaluation sampler 7.58 (2026-11-30).
1.5b,long: 8,192 new tokens, B 8 x G 8: train step 9.94 GiB (68% free), init 3.66,
  evaluation sampler 5.44 (2026-11-30).
7b,long (Qwen2.5-7B): 4,096 new tokens, B 4 x G 8, 16 micro-batches of 2 rows: train step
  27.49 GiB (12% free), init 17.76, evaluation sampler 8.91 (2026-11-30, the log-prob passes
  micro-batched). With B 8 x G 8 the step needed 28.58 GiB in 16 micro-batches (8.5% free) and
  more than the chip's 31.25 in 8: the rollout (its KV cache and weights) is then the peak.
0.5b (model=Qwen2.5-0.5B), FSDP over every chip, 4 micro-batches: train step 2.95 GiB (91%
  free), init 1.25, evaluation sampler 1.81 (2026-11-30, the log-prob passes micro-batched).
gemma3-1b (model=gemma-3-1b-it), FSDP over every chip, 4 micro-batches: train step 6.63 GiB
  (79% free), init 2.37, evaluation sampler 3.74 (2026-11-30, likewise).
"""

import ml_collections

from configs import accelerators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size, cfg = accelerators.make_config(arg, **accelerators.TPU)
  options = accelerators.split_size(arg, tuple(accelerators.TPU["mesh_shape"]))[1]
  if size == "7b":
    # A v6e-8 holds the 7B state on 8 chips (17.76 GiB each): smaller micro-batches, and with
    # "long" (not LoRA) half the prompts, B 4 x G 8 as gpu.py's 7b,long: micro-batches of 2.
    cfg.train.grad_accum_steps = 16
    if "long" in options and "lora" not in options:
      cfg.data.prompts_per_step //= 2
  return cfg
