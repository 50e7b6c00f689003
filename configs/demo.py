"""The embedded demo: a tiny built-in model learns synthetic arithmetic on a laptop CPU.

Nothing is downloaded. A short supervised warm start teaches the <think>/<answer>
format (DeepSeek-R1's cold start), then GRPO improves exact-match accuracy.

  python -m grpo_jax.main --config=configs/demo.py --workdir=/tmp/demo
"""

import ml_collections

from grpo_jax import config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # The demo takes no arguments.
  cfg = config.defaults()
  cfg.model.path = ""  # the built-in demo model, shaped by cfg.model.demo
  cfg.model.dtype = "float32"
  cfg.data.source = "synthetic:arithmetic"
  cfg.data.prompts_per_step = 8  # B
  cfg.data.max_prompt_len = 128
  cfg.data.num_eval_rows = 32
  cfg.grpo.num_generations = 8  # G
  cfg.grpo.epsilon_high = 0.28
  cfg.sampler.max_new_tokens = 64  # N
  cfg.sampler.temperature = 1.0
  cfg.rewards = "exact_match:1,format:0.2"
  cfg.train.num_steps = 100
  cfg.train.learning_rate = 3e-5
  cfg.train.warmup_steps = 5
  cfg.sft.num_steps = 300
  cfg.sft.learning_rate = 1e-3
  cfg.sft.batch_size = 32
  cfg.sft.max_len = 192
  cfg.checkpoint.every_steps = 25
  cfg.eval.every_steps = 10
  cfg.eval.num_prompts = 32
  cfg.eval.k = 4
  cfg.logging.progress_every_s = 5.0
  return cfg
