"""The TRL side of `python -m grpo_jax.bench --what=trl`, and what both sides share.

Shared: the prompts (`write_prompts`), the reward (`letter_reward`, which grpo_jax reaches
as the reward "grpo_jax.bench_trl:letter_reward") and the tiny Qwen2 checkpoint
(`python -m grpo_jax.bench_trl checkpoint DIR`). The TRL run itself:

  python -m grpo_jax.bench_trl trl --model=DIR --data=FILE.jsonl --out=FILE.json \
      [--num_generations=8 --prompts_per_step=8 --new_tokens=64 --beta=0.04 --steps=5 ...]

runs TRL's GRPOTrainer (PyTorch, CPU) and writes the median step time over the steps after
--warmup, split into sampling / reference log-probs / the rest (rewards, loss, backward, AdamW).

This module imports only the standard library at import time: it runs under whatever Python
has TRL (the current one, or a separate virtualenv made by the benchmark), from the repository
root, where `tests.tiny_hf` makes the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import time
from typing import Any, Callable, Sequence

TINY_SHAPE = dict(hidden=128, intermediate_size=384, layers=4, heads=4, kv_heads=2, vocab=512)


def letter_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
  """Share of letters among each completion's characters (0 for an empty completion)."""
  del prompts, columns
  return [sum(ch.isalpha() for ch in text) / max(len(text), 1) for text in completions]


def write_prompts(path: str, num_rows: int = 64, seed: int = 0) -> None:
  """Arithmetic questions as JSONL rows {"prompt", "answer"} of similar token lengths."""
  rng = random.Random(seed)
  with open(path, "w") as fp:
    for _ in range(num_rows):
      a, b = rng.randint(10, 99), rng.randint(10, 99)
      fp.write(json.dumps({"prompt": f"What is {a} + {b}? Think step by step, then answer.",
                           "answer": str(a + b)}) + "\n")


def make_checkpoint(directory: str) -> None:
  """The tiny Qwen2 checkpoint of TINY_SHAPE (random float32 weights, tied embeddings) with a
  byte-level BPE tokenizer of exactly TINY_SHAPE["vocab"] tokens, trained locally."""
  from tests import tiny_hf  # pylint: disable=g-import-not-at-top

  s = TINY_SHAPE
  tiny_hf.make_checkpoint("qwen2", directory, vocab_size=s["vocab"], hidden=s["hidden"],
                          layers=s["layers"], heads=s["heads"], kv_heads=s["kv_heads"], tie=True,
                          intermediate_size=s["intermediate_size"])
  tiny_hf.make_tokenizer(directory, vocab_size=s["vocab"])  # replaces the default-size one


def peak_rss_bytes() -> int:
  """This process's peak resident memory since it started its program.

  Linux's VmHWM; getrusage's ru_maxrss is not used where VmHWM exists, since a child
  started by fork + exec inherits its parent's peak in it.
  """
  if os.path.isfile("/proc/self/status"):
    with open("/proc/self/status") as fp:
      for line in fp:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024  # kB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _timed(fn: Callable, sink: Callable[[float], None]) -> Callable:
  def wrapper(*args, **kwargs):
    start = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      sink(time.perf_counter() - start)
  return wrapper


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
  """Trains warmup + steps GRPO steps with TRL and returns the timings of the last `steps`."""
  import datasets  # pylint: disable=g-import-not-at-top
  import torch
  import transformers
  import trl

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  with open(args.data) as fp:
    rows = [json.loads(line) for line in fp if line.strip()]
  dataset = datasets.Dataset.from_list([{"prompt": row["prompt"]} for row in rows])
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
  config = trl.GRPOConfig(
      output_dir=args.workdir, use_cpu=True, bf16=False, seed=args.seed, report_to="none",
      save_strategy="no", logging_steps=10**6, disable_tqdm=True,
      max_steps=args.warmup + args.steps, learning_rate=args.learning_rate,
      per_device_train_batch_size=args.prompts_per_step * args.num_generations,
      gradient_accumulation_steps=1, num_generations=args.num_generations, num_iterations=1,
      max_completion_length=args.new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
      generation_kwargs={"min_new_tokens": args.new_tokens},  # EOS never ends a completion
      beta=args.beta, loss_type="grpo", scale_rewards="group", epsilon=0.2, max_grad_norm=1.0,
      gradient_checkpointing=False,  # TRL's default; grpo_jax runs this without remat
      model_init_kwargs={"dtype": torch.float32})
  trainer = trl.GRPOTrainer(model=args.model, reward_funcs=letter_reward, args=config,
                            train_dataset=dataset, processing_class=tokenizer)

  # Per-step sums of the pieces, keyed by global step.
  pieces: dict[str, list[float]] = {"sampling": [], "ref_logps": [], "step": []}
  current = {"sampling": 0.0, "ref_logps": 0.0}

  def add(name):
    def sink(seconds):
      current[name] += seconds
    return sink

  trainer._generate_single_turn = _timed(trainer._generate_single_turn, add("sampling"))  # pylint: disable=protected-access
  logps_fn = trainer._get_per_token_logps_and_entropies  # pylint: disable=protected-access
  ref_sink = add("ref_logps")

  def logps(*a, **kw):  # without gradients: the reference (or old) log-probs
    if torch.is_grad_enabled():
      return logps_fn(*a, **kw)
    return _timed(logps_fn, ref_sink)(*a, **kw)

  trainer._get_per_token_logps_and_entropies = logps  # pylint: disable=protected-access

  class StepTimer(transformers.TrainerCallback):
    def on_step_begin(self, *unused, **unused_kw):
      current.update(sampling=0.0, ref_logps=0.0)
      self.start = time.perf_counter()

    def on_step_end(self, *unused, **unused_kw):
      pieces["step"].append(time.perf_counter() - self.start)
      pieces["sampling"].append(current["sampling"])
      pieces["ref_logps"].append(current["ref_logps"])

  trainer.add_callback(StepTimer())
  trainer.train()
  timed = {k: v[args.warmup:] for k, v in pieces.items()}
  med = {k: statistics.median(v) for k, v in timed.items()}
  rest = statistics.median([s - a - b for s, a, b in zip(timed["step"], timed["sampling"],
                                                          timed["ref_logps"])])
  rows_per_step = args.prompts_per_step * args.num_generations
  return {
      "trainer": f"trl {trl.__version__}, torch {torch.__version__}",
      "threads": torch.get_num_threads(),
      "step_s": med["step"],
      "step_times_s": timed["step"],
      "sampling_s": med["sampling"],
      "logps_s": med["ref_logps"],
      "rest_s": rest,
      "rollout_tokens_per_s": rows_per_step * args.new_tokens / med["sampling"],
      "peak_memory_bytes": peak_rss_bytes(),
  }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m grpo_jax.bench_trl")
  sub = parser.add_subparsers(dest="command", required=True)
  ckpt = sub.add_parser("checkpoint", help="write the tiny Qwen2 checkpoint")
  ckpt.add_argument("directory")
  run = sub.add_parser("trl", help="time GRPO steps with TRL")
  run.add_argument("--model", required=True, help="local Hugging Face checkpoint dir")
  run.add_argument("--data", required=True, help="JSONL file of {'prompt', ...} rows")
  run.add_argument("--out", required=True, help="write the results as JSON here")
  run.add_argument("--workdir", default="/tmp/grpo_jax_bench_trl", help="TRL's output_dir")
  run.add_argument("--num_generations", type=int, default=8)
  run.add_argument("--prompts_per_step", type=int, default=8)
  run.add_argument("--new_tokens", type=int, default=64)
  run.add_argument("--beta", type=float, default=0.04)
  run.add_argument("--learning_rate", type=float, default=1e-6)
  run.add_argument("--temperature", type=float, default=1.0)
  run.add_argument("--steps", type=int, default=5, help="timed steps")
  run.add_argument("--warmup", type=int, default=1, help="untimed steps first")
  run.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  run.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  if args.command == "checkpoint":
    make_checkpoint(args.directory)
    return
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  result = run_trl(args)
  with open(args.out, "w") as fp:
    json.dump(result, fp, indent=2)


if __name__ == "__main__":
  main()
