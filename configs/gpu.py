"""GRPO on NVIDIA H100s (80 GB each): one GPU, one node of 8, or several nodes.

  python -m grpo_jax.main --config=configs/gpu.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/gpu.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/gpu.py:7b,lora,model=DIR,data=FILE.jsonl --workdir=DIR

launch/gpu_nodes.sh starts one process per node. Arguments as configs/hf.py's, optionally
led by the model size; memory arithmetic in configs/accelerators.py. FSDP over every GPU;
over several nodes, --config.mesh.shape="(NODES,8,1)" keeps FSDP inside a node (NVLink) and
leaves one gradient all-reduce per update to the network.

1.5b (Qwen2.5-1.5B class), one H100 and up. On one GPU: 16P = 24.7 GB, plus during the
  update gradients 12.3 GB and a micro-batch of 128 / 2 = 64 rows: 64 * 0.09 = 5.6 GB of
  block inputs and about 3 * 64 * 0.05 = 9.7 GB for one block's attention: about 52 GB.
  Rollout: 24.7 GB + 3.1 GB of bf16 weights + 128 rows of KV cache (3.8 GB): about 32 GB.
7b (Qwen2.5-7B class), 8 H100s. Per GPU: 121.8 GB / 8 = 15.2 GB, plus gradients 60.9 GB / 8
  = 7.6 GB and 128 / 4 / 8 = 4 rows (0.8 GB of block inputs, 1.4 GB for one block's
  attention): about 25 GB. Rollout: 15.2 GB + 15.2 GB of gathered bf16 weights + 16 rows of
  KV cache (0.9 GB): about 31 GB.
7b,lora (Llama-3.1-8B or Qwen2.5-7B, rank 64), one H100; estimates by arithmetic for Llama-3.1-8B
  (P = 8.03e9, D 4096, 32 layers, 32 heads, 8 kv heads): base 16.1 GB, adapters and moments
  2.0 GB. Update: gradients 1.3 GB and 128 / 4 = 32 rows: 32 * 32 * 1024 * 4096 * 2 = 8.6 GB of
  block inputs and 3 * 32 * 32 * 1024^2 * 4 = 12.9 GB for one block's attention: about 41 GB.
  Rollout: 18.1 GB + the merged copy 16.1 GB + 128 rows of KV cache (17.2 GB): about 51 GB of
  the 80 GB (a full fine-tune needs 16P = 128 GB).
"""

import ml_collections

from configs import accelerators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # B * G = 128 rows per step, FSDP over every GPU.
  return accelerators.make_config(arg, prompts_per_step=16,
                                  mesh_shape={"1.5b": (1, -1, 1), "7b": (1, -1, 1)},
                                  grad_accum_steps={"1.5b": 2, "7b": 4})[1]
