"""The roofline's depth extrapolation against the phases compiled at full depth (v5e-8).

  python -m tests.check_extrapolation DIR

DIR holds a config.json (BENCHMARKS.md used Qwen2.5-0.5B's with "num_hidden_layers": 6 and
"vocab_size": 8192); the run is configs/hf.py with B 4 x G 4 and T = N = 64, layers
unrolled. Prints per phase [full depth, extrapolated, relative difference] of FLOPs and
bytes. Compiler estimates; needs libtpu (pip install -e ".[aot]"); a few minutes.
"""

import json
import sys
import tempfile

from grpo_jax import aot_targets

TARGET = aot_targets.parse_topology("v5e-8")
aot_targets.prepare_environment(TARGET)

# pylint: disable=wrong-import-position
from configs import hf  # noqa: E402
from grpo_jax import aot, aot_rewards, builder  # noqa: E402
from grpo_jax import config as config_lib  # noqa: E402
from grpo_jax import rewards as rewards_lib  # noqa: E402


def main(model_dir: str) -> None:
  c = hf.get_config(f"model={model_dir},data=unused.jsonl")
  c.data.prompts_per_step, c.grpo.num_generations = 4, 4
  c.data.max_prompt_len, c.sampler.max_new_tokens = 64, 64
  c.eval.num_prompts, c.model.scan_layers = 0, False
  devices = aot_targets.compile_devices(TARGET)
  cfg = config_lib.freeze(c, num_devices=TARGET.chips)
  mc = aot.model_config(cfg, "tpu")
  names = tuple(spec.name for spec in rewards_lib.parse_spec(cfg.rewards))
  setup = builder.train_setup(cfg, mc, builder.sampling_settings(cfg, None, mc), devices)
  plan = aot.Plan(cfg=cfg, slice=TARGET, setup=setup, model_config=mc,
                  reward_fn=aot_rewards.HostReward(len(names), cfg.grpo.step_slots),
                  reward_names=names)
  with tempfile.TemporaryDirectory() as dump:
    direct = plan.compiled_phases(dump)
    extrapolated = aot.layer_phases(plan, devices, dump)
  for a, b in zip(direct, extrapolated):
    print(json.dumps({"phase": a.name,
                      "flops": [a.flops, b.flops, b.flops / a.flops - 1],
                      "bytes": [a.bytes_accessed, b.bytes_accessed,
                                b.bytes_accessed / a.bytes_accessed - 1]}))


if __name__ == "__main__":
  main(sys.argv[1])
