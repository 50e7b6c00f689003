"""The embedded demo: a tiny built-in model learns 2-digit addition on a laptop CPU.

Nothing is downloaded. DeepSeek-R1's recipe in miniature:
  1. Cold-start SFT on worked solutions (<think> column sums </think><answer>..</answer>).
     The warm-start data is unverified, as cold-start data written by another model is:
     70% of its rows end in a wrong final answer after a correct worked solution
     (synthetic:arithmetic's wrong_answers option). The model copies that habit.
  2. GRPO with a verified reward (exact match on the true answer, plus a small format
     reward). The model learns to answer with what its own reasoning worked out.
Held-out pass@1 (new prompts, k = 4 samples at temperature 1) is printed before GRPO and
at the end, and workdir/progress.png plots reward and pass@1 over steps.

  python -m grpo_jax.main --config=configs/demo.py --workdir=runs/demo

The variant `configs/demo.py:process` is the same run with process supervision
(DeepSeekMath 4.1.3): each line of the worked solution and the final answer is a step with a
reward of its own (`arithmetic_steps`), in place of the outcome rewards.

The LoRA variant: the cold-start SFT trains every weight (it plays the pretraining a real base
model had), then GRPO trains rank-16 adapters on every projection over that frozen base, which
is also pi_ref (README "LoRA"); the adapters take a higher learning rate:

  python -m grpo_jax.main --config=configs/demo.py:lora --workdir=runs/demo_lora
"""

import ml_collections

from grpo_jax import config
from grpo_jax.errors import UserError

VARIANTS = ("process", "lora")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo's config; arg "process" or "lora" for those variants."""
  if arg and arg not in VARIANTS:
    raise UserError(f"configs/demo.py:{arg}: no such variant; allowed: configs/demo.py or "
                    + " or ".join(f"configs/demo.py:{v}" for v in VARIANTS))
  cfg = config.defaults()
  cfg.model.path = ""  # the built-in demo model, shaped by cfg.model.demo
  cfg.model.dtype = "float32"
  cfg.data.source = "synthetic:arithmetic:digits=2,ops=+,wrong_answers=70"
  cfg.data.prompts_per_step = 8  # B
  cfg.data.max_prompt_len = 128
  cfg.data.num_eval_rows = 96
  cfg.grpo.num_generations = 8  # G
  cfg.grpo.epsilon_high = 0.28
  cfg.sampler.max_new_tokens = 48  # N
  cfg.sampler.temperature = 1.0
  cfg.rewards = "exact_match:1,format:0.1"
  cfg.train.num_steps = 100
  cfg.train.learning_rate = 1e-4
  cfg.train.warmup_steps = 5
  cfg.sft.num_steps = 700
  cfg.sft.learning_rate = 3e-3
  cfg.sft.batch_size = 32
  cfg.sft.max_len = 112
  cfg.checkpoint.every_steps = 25
  cfg.eval.every_steps = 10
  cfg.eval.num_prompts = 96
  cfg.eval.k = 4
  cfg.logging.progress_every_s = 5.0
  if arg == "process":
    cfg.grpo.supervision = "process"
    cfg.step_rewards = "arithmetic_steps"
  if arg == "lora":
    cfg.model.lora.rank = 16
    cfg.model.lora.alpha = 32.0
    cfg.model.lora.sft_trains = "weights"
    cfg.train.learning_rate = 1e-3
  return cfg
