"""GRPO on NVIDIA H100s (80 GB each): one GPU, one node of 8, or several nodes.

  python -m grpo_jax.main --config=configs/gpu.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/gpu.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/gpu.py:7b,lora,model=DIR,data=FILE.jsonl --workdir=DIR

launch/gpu_nodes.sh starts one process per node. Arguments as configs/hf.py's, optionally
led by the model size (what the memory holds: configs/accelerators.py). FSDP over every GPU;
over several nodes, --config.mesh.shape="(NODES,8,1)" keeps FSDP inside a node (NVLink) and
leaves one gradient all-reduce per update to the network.

1.5b (Qwen2.5-1.5B class), one H100 and up: B * G = 128 rows, 4 micro-batches of 32.
  Compiled for one H100 by `python -m grpo_jax.aot --config=configs/gpu.py:model=Qwen2.5-1.5B,
  data=unused.jsonl --topology=h100x1` (2026-11-29, jax 0.10.2, jax-cuda12-plugin 0.10.2;
  compiler estimates, per GPU, of the 59.33 GiB XLA's allocator takes, 75% of 80 GB):
  train step peak 46.96 GiB (79%; the state 23.00 GiB, temporaries 24.06 GiB), init 28.75,
  evaluation sampler 15.26. With 2 micro-batches of 64 (this config until then) the step
  needed 60.15 GiB and did not fit: the largest buffers are the blockwise attention's
  saved outputs, 10.1 GiB at 64 rows, which halve with the micro-batch.
7b (Qwen2.5-7B class), 8 H100s, 4 micro-batches. Not yet compiled: by hand, per GPU,
  121.8 GB / 8 = 15.2 GB of state (16 bytes a parameter), 7.6 GB of gradients and a few GB
  of activations, about 25 GB; check it with --topology=h100x8 before a run.
7b,lora (Llama-3.1-8B or Qwen2.5-7B, rank 64), one H100. Not yet compiled; estimates by
  arithmetic for Llama-3.1-8B (P = 8.03e9, D 4096, 32 layers, 32 heads, 8 kv heads): base 16.1 GB, adapters and moments
  2.0 GB. Update: gradients 1.3 GB and 128 / 4 = 32 rows: 32 * 32 * 1024 * 4096 * 2 = 8.6 GB of
  block inputs and 3 * 32 * 32 * 1024^2 * 4 = 12.9 GB for one block's attention: about 41 GB.
  Rollout: 18.1 GB + the merged copy 16.1 GB + 128 rows of KV cache (17.2 GB): about 51 GB of
  the 80 GB (a full fine-tune needs 16P = 128 GB).
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
  return cfg
