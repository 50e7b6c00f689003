"""python -m grpo_jax.aot: the config's programs compiled for a slice on this CPU-only host.

The first tests need no accelerator package: the model's shape without weights, the reward
callback's compile-only stand-in, the user errors. The rest compile a 2-layer model of
Qwen2.5-0.5B's width (its published config.json with 2 layers and an 8192-token vocabulary,
so that the rows, not the embedding, decide the memory) for TPU slices when libtpu is
installed (pip install -e ".[aot]"); each compile takes a minute or two on a small CPU.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import hf
from grpo_jax import aot
from grpo_jax import aot_rewards
from grpo_jax import config as config_lib
from grpo_jax import train_step as train_step_lib
from grpo_jax.errors import UserError
from grpo_jax.models import published

REPO = pathlib.Path(__file__).resolve().parent.parent
GIB = 1 << 30


def _cfg(model: str, **overrides) -> config_lib.Config:
  cfg = hf.get_config(f"model={model},data=unused.jsonl")
  for key, value in overrides.items():
    section, name = key.split("__")
    cfg[section][name] = value
  return config_lib.freeze(cfg, num_devices=8)


def test_the_model_shape_comes_from_config_json_or_a_published_checkpoints_name(tmp_path):
  qwen7b = aot.model_config(_cfg("Qwen/Qwen2.5-7B-Instruct"), "tpu")
  assert (qwen7b.family, qwen7b.hidden_size, qwen7b.num_layers, qwen7b.vocab_size) == (
      "qwen2", 3584, 28, 152064)
  assert (qwen7b.dtype, qwen7b.param_dtype, qwen7b.remat) == ("bfloat16", "float32", True)
  assert qwen7b.attention == "splash"  # model.attention=auto, resolved for the target
  assert aot.model_config(_cfg("Llama-3.1-8B"), "gpu").attention == "cudnn"
  (tmp_path / "config.json").write_text(json.dumps(
      dict(published.config("Qwen3-0.6B"), num_hidden_layers=2)))
  small = aot.model_config(_cfg(str(tmp_path)), "tpu")
  assert (small.family, small.num_layers, small.qk_norm) == ("qwen3", 2, True)
  with pytest.raises(UserError, match="known shapes: .*Qwen2.5-1.5B.*Llama-3.2-1B"):
    aot.model_config(_cfg("Qwen9-1B"), "tpu")


@pytest.mark.parametrize("supervision", ["outcome", "process"])
def test_the_reward_stand_ins_have_the_callbacks_shapes(supervision):
  """What replaces the reward callback in a compile-only step gives the arrays the callback
  gives (so the step's buffers are the same): traced in, or as a host callback."""
  slots = 4 if supervision == "process" else 0
  rollout = train_step_lib.Rollout(
      prompt_tokens=jnp.zeros((2, 5), jnp.int32), prompt_mask=jnp.ones((2, 5), jnp.int32),
      tokens=jnp.arange(48, dtype=jnp.int32).reshape(8, 6), mask=jnp.ones((8, 6), jnp.int32),
      finished=jnp.ones((8,), bool))
  row_ids = jnp.arange(2, dtype=jnp.int32)
  shapes = []
  for reward in (aot_rewards.StandInReward(3, slots), aot_rewards.HostReward(3, slots)):
    out = jax.jit(lambda r, ids: train_step_lib.score(reward, 3, ids, r, slots))(rollout, row_ids)
    shapes.append(jax.tree.map(lambda x: (x.shape, x.dtype), out))
  assert shapes[0] == shapes[1]
  traced = train_step_lib.score(aot_rewards.StandInReward(3, slots), 3, row_ids, rollout, slots)
  np.testing.assert_allclose(traced.total, [0.5] * 8)  # every row: 3 even tokens of 6


def _aot(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "grpo_jax.aot", *args], cwd=REPO,
                        capture_output=True, text=True)


def test_an_unknown_topology_or_headroom_is_one_error_line_and_exit_2():
  for flag, allowed in (("--topology=v5e-9", "one of v4-8, "), ("--headroom=1.5", "[0, 1)")):
    args = ["--config=configs/hf.py:model=Qwen2.5-0.5B,data=unused.jsonl", "--topology=v5e-8",
            flag]
    out = _aot(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and allowed in lines[0], lines
  assert "h100x8" in _aot("--config=configs/demo.py", "--topology=tpu").stderr


# -- compiled for TPU slices -------------------------------------------------------------------

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e \".[aot]\")")
# B = 4 prompts x G = 4, T = N = 64: 16 rows, two a chip on 8.
_SMALL = ("--config.data.prompts_per_step=4", "--config.grpo.num_generations=4",
          "--config.data.max_prompt_len=64", "--config.sampler.max_new_tokens=64",
          "--config.eval.num_prompts=0", "--config.model.scan_layers=true")  # as the configs


@pytest.fixture(scope="module")
def compile_small(tmp_path_factory):
  """Runs the tool on a 2-layer model of Qwen2.5-0.5B's width (once per argument list);
  returns (exit code, stdout, stderr, the --out JSON)."""
  root = tmp_path_factory.mktemp("aot")
  model = root / "qwen2.5-0.5b-2layers"
  model.mkdir()
  (model / "config.json").write_text(json.dumps(
      dict(published.config("Qwen2.5-0.5B"), num_hidden_layers=2, vocab_size=8192)))
  done = {}

  def run(topology: str, *args: str):
    key = (topology, *args)
    if key not in done:
      out_file = root / f"{len(done)}.json"
      out = _aot(f"--config=configs/hf.py:model={model},data=unused.jsonl",
                 f"--topology={topology}", f"--out={out_file}", *_SMALL, *args)
      report = json.loads(out_file.read_text()) if out_file.exists() else None
      done[key] = (out.returncode, out.stdout, out.stderr, report)
    return done[key]

  return run


@needs_libtpu
def test_a_small_model_fits_a_v5e_8_with_a_roofline_estimate(compile_small):
  code, stdout, stderr, report = compile_small("v5e-8")
  assert code == 0, stderr
  assert "cudart" not in stderr and "TPU_WORKER_HOSTNAMES" not in stderr  # start-up noise
  assert (report["topology"], report["chips"], report["hbm_bytes"]) == ("v5e-8", 8, 15.75 * GIB)
  assert report["fits"] and set(report["programs"]) == {"init", "train_step"}
  step = report["programs"]["train_step"]
  assert 0 < step["peak_bytes"] < GIB and step["flops"] > 0 and step["bytes_accessed"] > 0
  # The step's arguments: the state init makes, and the batch (a few tiles).
  assert 0 <= step["argument_bytes"] - report["programs"]["init"]["output_bytes"] < 1 << 20
  roof = report["roofline"]
  assert roof["step_s"] > 0 and roof["tokens_per_s_per_chip"] > 0
  assert roof["phases"]["decode"]["count"] == 64 - 1
  assert set(roof["phases"]) == {"rollout", "decode", "logps", "update"}  # beta 0.04: ref pass
  # One decode iteration reads its chip's weights and KV cache at least once.
  assert roof["decode_bytes_per_token"] >= roof["decode_min_bytes_per_token"] > 0
  # T + N = 128 slots are one key block: at every fill the decode reads that block.
  by_fill = roof["decode_by_fill"]
  assert [row["slots"] for row in by_fill] == [13, 64, 115]
  assert {row["bytes_per_token"] for row in by_fill} == {roof["decode_bytes_per_token"]}
  assert by_fill[0]["min_bytes_per_token"] < by_fill[2]["min_bytes_per_token"]
  assert "(compiler estimates)" in stdout and "roofline estimate" in stdout
  # The step scans its layers; the roofline's phases compile unrolled at one and two layers.
  assert any("one and two layers of each kind, unrolled, and extrapolated to 2" in note
             for note in report["notes"]), report["notes"]


@needs_libtpu
def test_per_chip_bytes_fall_as_chips_grow(compile_small):
  """v4-8 has 4 chips (one JAX device each), v5e-8 8: FSDP halves each chip's state and
  rows."""
  code, _, stderr, v4 = compile_small("v4-8", "--noroofline")
  assert code == 0, stderr
  assert v4["chips"] == 4 and v4["roofline"] is None
  v5e = compile_small("v5e-8")[3]
  v4_step, v5e_step = v4["programs"]["train_step"], v5e["programs"]["train_step"]
  assert v4_step["argument_bytes"] > 1.5 * v5e_step["argument_bytes"]
  assert v4_step["peak_bytes"] > v5e_step["peak_bytes"]


@needs_libtpu
def test_eight_times_the_batch_needs_more_and_a_program_over_the_headroom_exits_1(compile_small):
  code, _, stderr, big = compile_small("v5e-8", "--config.data.prompts_per_step=32",
                                       "--headroom=0.999")
  small = compile_small("v5e-8")[3]
  assert big["programs"]["train_step"]["peak_bytes"] > small["programs"]["train_step"]["peak_bytes"]
  assert code == 1 and not big["fits"] and big["roofline"] is None
  # The first program over the line is named: here init already (0.11 GiB > 0.02).
  first = next(name for name, p in big["programs"].items() if not p["fits"])
  line = stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: {first} needs ") and "v5e-8 chip has 15.75 GiB" in line
  assert "0.02 GiB with --headroom=0.999; largest: " in line
