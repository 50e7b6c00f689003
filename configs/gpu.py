"""GRPO on NVIDIA H100s (80 GB each): one GPU, one node of 8, or several nodes.

  python -m grpo_jax.main --config=configs/gpu.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/gpu.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/gpu.py:7b,lora,model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/gpu.py:long,model=DIR,data=FILE.jsonl --workdir=DIR

launch/gpu_nodes.sh starts one process per node. Arguments as configs/hf.py's, optionally
led by the model size (what the memory holds: configs/accelerators.py). FSDP over every GPU;
over several nodes, --config.mesh.shape="(NODES,8,1)" keeps FSDP inside a node (NVLink) and
leaves one gradient all-reduce per update to the network.

Figures: the compiler's estimates per GPU of the 59.33 GiB XLA's allocator takes (75% of
80 GB), from `python -m grpo_jax.aot --config=configs/gpu.py:[ARGS,]model=NAME,data=unused.jsonl
--topology=h100x1|h100x8 --noroofline` (2026-11-29, jax 0.10.2, jax-cuda12-plugin 0.10.2);
"free" is what the train step leaves (the tool wants 10%). The 7b sizes scan their layers;
1.5b does not (on one H100 its step needs 59.70 GiB scanned: float32 copies of the stacked
weights in the loops, nothing being split over chips). Figures from 2026-11-30 are after the
blockwise attention's loop buffers stopped being made before the first layer (they had been
all live at once in the backward: 1.5b 46.96 -> 36.49 GiB, long 64.36 -> 48.25).

1.5b (Qwen2.5-1.5B class), one H100 and up: B * G = 128 rows, 4 micro-batches of 32.
  h100x1 (model=Qwen2.5-1.5B): train step 36.49 GiB (38% free), init 28.75, evaluation
  sampler 16.41 (2026-11-30). With 2 micro-batches the step needs 40.98 GiB (it did not fit
  before 2026-11-30: 60.15); 4 keep room for the long variant, which shares them.
1.5b,long: 8,192 new tokens, B 4 x G 8, micro-batches of 8 rows. h100x1 (model=Qwen2.5-1.5B):
  train step 42.64 GiB (28% free) with the log-prob passes micro-batched (48.25 before), init
  28.75, evaluation sampler 15.87; h100x8: train step 22.79 GiB (62% free), init 3.60,
  evaluation sampler 4.50 (2026-11-30).
7b (Qwen2.5-7B class), 8 H100s, 4 micro-batches, evaluation on 16 prompts. h100x8
  (model=Qwen2.5-7B): train step 45.07 GiB (24% free), init 17.74, evaluation sampler 34.26
  (the same on 2026-11-30).
7b,long: 4,096 new tokens, B 4 x G 8. h100x8 (model=Qwen2.5-7B): train step 45.05 GiB (24%
  free), init 17.74, evaluation sampler 34.25 (2026-11-30).
7b,lora (Llama-3.1-8B or Qwen2.5-7B, rank 64), one H100, 16 micro-batches of 8 rows. h100x1
  (model=Llama-3.1-8B): train step 52.17 GiB (12% free), init 32.42, evaluation sampler 36.65
  (the same on 2026-11-30).
  Before scanning, with 4 micro-batches and evaluation on 128 prompts (64 a call), the compiler gave the
  step 89.15 GiB and the evaluation sampler 60.84; with 16 micro-batches, 60.92 (unrolled).
"""

import ml_collections

from configs import accelerators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # B * G = 128 rows per step, FSDP over every GPU.
  size, cfg = accelerators.make_config(
      arg, prompts_per_step=16, mesh_shape={"1.5b": (1, -1, 1), "7b": (1, -1, 1)},
      grad_accum_steps={"1.5b": 4, "7b": 4, "7b,lora": 16})
  if size == "7b":
    cfg.eval.num_prompts = min(cfg.eval.num_prompts, 16)
  else:  # on one H100 the 1.5B step needs less unrolled (46.96 GiB) than scanned (59.70)
    cfg.model.scan_layers = False
  return cfg
