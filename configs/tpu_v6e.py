"""GRPO on Cloud TPU v6e (Trillium: 32 GiB HBM per chip; a v6e-N slice has N chips).

  python -m grpo_jax.main --config=configs/tpu_v6e.py:model=DIR,data=FILE.jsonl --workdir=DIR
  python -m grpo_jax.main --config=configs/tpu_v6e.py:7b,model=DIR,data=FILE.jsonl --workdir=DIR

Arguments as configs/hf.py's, optionally led by the model size (0.5b, 1.5b, gemma3-1b, 7b),
"lora" and "long"; the same settings as configs/tpu_v5e.py, on chips with twice the v5e's HBM
(31.25 GiB usable). Compiled for a v6e-8 by `python -m grpo_jax.aot --config=configs/tpu_v6e.py:
model=Qwen2.5-1.5B,data=unused.jsonl --topology=v6e-8 --noroofline` (2026-11-29, jax 0.10.2,
libtpu 0.0.42.1; compiler estimates per chip, layers scanned): train step 8.82 GiB (72% free),
init 3.66, evaluation sampler 5.65. The 7b sizes are not compiled for v6e yet: check them with
`--config=configs/tpu_v6e.py:7b,model=Qwen2.5-7B,data=unused.jsonl --topology=v6e-8` before a
run.
"""

import ml_collections

from configs import accelerators


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return accelerators.make_config(arg, **accelerators.TPU)[1]
