"""The embedded demo: a tiny built-in model learns on a laptop CPU, nothing downloaded.

DeepSeek-R1's recipe in miniature: cold-start SFT on worked solutions (<think> working
</think><answer>..</answer>), then GRPO with a verified reward (exact match). Held-out
pass@1 (new prompts, k samples each at temperature 1) is printed before GRPO and at the
end, and workdir/progress.png plots reward and pass@1 over steps. Six variants:

  python -m grpo_jax.main --config=configs/demo.py --workdir=runs/demo       # think
  python -m grpo_jax.main --config=configs/demo.py:copy --workdir=runs/copy
  python -m grpo_jax.main --config=configs/demo.py:clean --workdir=runs/clean
  python -m grpo_jax.main --config=configs/demo.py:countdown --workdir=runs/countdown
  python -m grpo_jax.main --config=configs/demo.py:process --workdir=runs/process
  python -m grpo_jax.main --config=configs/demo.py:lora --workdir=runs/demo_lora

think (the default): 2-digit addition on clean warm-start data (every row right), of two
  kinds: 45% of the rows work the sum out column by column, UNWORKED = 55% answer at once
  with the one line "a+b=c" (synthetic:arithmetic's unworked option). The model learns
  both habits, and fewer than half of its samples are right (the more rows answer at once,
  the lower it starts). Nothing in the reward asks for working; GRPO finds that working
  the sum out pays, as R1-Zero's chains of thought grew under RL.
copy: the same task on unverified warm-start data, as cold-start data written by another
  model is: 70% of its rows end in a wrong final answer after a correct worked solution
  (synthetic:arithmetic's wrong_answers option), and the model copies that habit. GRPO
  teaches it to answer with what its own working found.
clean: every warm-start row worked out, stopped early (about half of the samples right);
  GRPO has to sharpen the model's own arithmetic, with process supervision (each line of
  the worked sum a step with its own reward), the setting that gained most in
  LEARNING.md's runs on it; slow (800 steps).
countdown: reach a target with three given numbers and + - * / (as TinyZero does). The
  warm-start rows show one random way the target was made, so the model has to search.
process: copy with process supervision (DeepSeekMath 4.1.3): each line of the worked
  solution and the final answer is a step with a reward of its own (`arithmetic_steps`),
  in place of the outcome rewards.
lora: copy with LoRA: the cold-start SFT trains every weight (it plays the pretraining a
  real base model had), then GRPO trains rank-16 adapters on every projection over that
  frozen base, which is also pi_ref (README "LoRA"); the adapters take a higher learning
  rate.

Settings common to all: 8 prompts x 8 completions a step, exact match only where the
warm start is clean (a format bonus is the only difference inside a group that is all
wrong, and the group's std scales it up to a full-size advantage), and a budget of new
tokens that fits every correct worked solution.
"""

import ml_collections

from grpo_jax import config
from grpo_jax.errors import UserError

VARIANTS = ("think", "copy", "clean", "countdown", "process", "lora")
ARITHMETIC = "synthetic:arithmetic:digits=2,ops=+,wrong_answers={}"
UNWORKED = 55  # think: the share of warm-start rows that answer at once, percent


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo's config; arg names a variant (VARIANTS), think when absent."""
  variant = arg or "think"
  if variant not in VARIANTS:
    raise UserError(f"configs/demo.py:{arg}: no such variant; allowed: configs/demo.py or "
                    + " or ".join(f"configs/demo.py:{v}" for v in VARIANTS))
  cfg = config.defaults()
  cfg.model.path = ""  # the built-in demo model, shaped by cfg.model.demo
  cfg.model.dtype = "float32"
  cfg.data.prompts_per_step = 8  # B
  cfg.data.max_prompt_len = 128
  cfg.data.num_eval_rows = 96
  cfg.grpo.num_generations = 8  # G
  cfg.grpo.epsilon_high = 0.28
  cfg.sampler.temperature = 1.0
  cfg.train.learning_rate = 1e-4
  cfg.train.warmup_steps = 5
  cfg.sft.learning_rate = 3e-3
  cfg.sft.batch_size = 32
  cfg.checkpoint.every_steps = 25
  cfg.eval.num_prompts = 96
  cfg.logging.progress_every_s = 5.0
  cfg.sampler.max_new_tokens = 64  # N; the longest worked sum is 56 tokens with EOS
  cfg.sft.max_len = 112
  if variant in ("copy", "process", "lora"):
    cfg.data.source = ARITHMETIC.format(70)
    cfg.rewards = "exact_match:1,format:0.1"
    cfg.train.num_steps = 100
    cfg.sft.num_steps = 700
    cfg.eval.every_steps = 10
    cfg.eval.k = 4
    if variant == "process":
      cfg.grpo.supervision = "process"
      cfg.step_rewards = "arithmetic_steps"
    if variant == "lora":
      cfg.model.lora.rank = 16
      cfg.model.lora.alpha = 32.0
      cfg.model.lora.sft_trains = "weights"
      cfg.train.learning_rate = 1e-3
    return cfg
  cfg.rewards = "exact_match:1"
  cfg.eval.k = 8
  if variant == "think":
    cfg.data.source = f"synthetic:arithmetic:digits=2,ops=+,unworked={UNWORKED}"
    cfg.sft.num_steps = 700
    cfg.train.num_steps = 200
    cfg.eval.every_steps = 50
  elif variant == "clean":
    cfg.data.source = ARITHMETIC.format(0)
    cfg.sft.num_steps = 400  # 51-57% of the samples right (LEARNING.md)
    cfg.grpo.supervision = "process"  # each line of the worked sum scored on its own
    cfg.step_rewards = "arithmetic_steps"
    cfg.train.num_steps = 800
    cfg.eval.every_steps = 200
  else:
    cfg.data.source = "synthetic:countdown:min_numbers=3,max_numbers=3,max_number=10"
    cfg.sampler.max_new_tokens = 48  # the longest worked solution is 39 tokens with EOS
    cfg.sft.num_steps = 700
    cfg.sft.max_len = 128
    cfg.train.num_steps = 400
    cfg.eval.every_steps = 100
  return cfg
