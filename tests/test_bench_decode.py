"""bench_decode: the decode-step measure runs on a tiny model and reports its keys."""

import json
import math
import pathlib
import subprocess
import sys

from grpo_jax import bench_decode, models

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_measure_reports_the_model_and_attention_figures():
  config = models.ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                              num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
  got = bench_decode.measure(config, batch=2, cache_len=40, fill=5, steps=2, repeats=1)
  assert set(got["attention_ms_per_token"]) == set(bench_decode.ATTENTION_FORMS)
  figures = [got["decode_ms_per_token"], *got["attention_ms_per_token"].values()]
  assert all(isinstance(x, float) and math.isfinite(x) for x in figures)
  assert (got["batch"], got["cache_len"], got["fill"]) == (2, 40, 5)


def test_decode_command_writes_decode_ms_per_token(tmp_path):
  out = tmp_path / "decode.json"
  proc = subprocess.run(
      [sys.executable, "-m", "grpo_jax.bench", "--what=decode", "--model=demo", "--batch=2",
       "--cache_len=40", "--fill=5", "--steps=2", "--dtype=float32", f"--out={out}"],
      capture_output=True, text=True, check=False, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert math.isfinite(r["decode_ms_per_token"]) and (r["cache_len"], r["fill"]) == (40, 5)
  bad = subprocess.run([sys.executable, "-m", "grpo_jax.bench", "--what=decode", "--fill=9",
                        "--cache_len=8"], capture_output=True, text=True, check=False, cwd=REPO)
  assert bad.returncode == 2
  assert [l for l in bad.stderr.splitlines() if l.startswith("error:")] == [
      "error: --fill=9 is not allowed: at most --cache_len=8"]
