"""GRPO on Cloud TPU v6e (Trillium: 32 GiB HBM per chip; a v6e-N slice has N chips).

  python -m grpo_jax.main --config=configs/tpu_v6e.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v6e.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR

Arguments as configs/hf.py's, optionally led by the model size (0.5b, 1.5b, 7b); the same
settings as configs/tpu_v5e.py. Memory per chip: see below, from the compiler.
"""

import ml_collections

from configs import accelerators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return accelerators.make_config(arg, **accelerators.TPU)[1]
