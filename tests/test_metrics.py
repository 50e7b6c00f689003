"""metrics.jsonl round trip, TensorBoard events, truncation on resume, progress line, plot."""

import io
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from grpo_jax import metrics


def _event_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
  """Scalars of the event files in `tb_dir` as TensorBoard shows them.

  Reads the TFRecord framing (length, crc, event, crc) and applies TensorBoard's purge
  rule: a SessionLog START at step s hides the earlier events with step >= s.
  """
  scalars: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(tb_dir)):
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.session_log.status == event_pb2.SessionLog.START:
        scalars = {k: [(s, v) for s, v in pts if s < event.step]
                   for k, pts in scalars.items()}
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_jsonl_round_trip_with_jax_numpy_and_non_finite_values(tmp_path):
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  w.write(0, {"eval/pass@1": np.float32(0.25), "eval/maj@4": 0.5})
  w.write(1, {"train/loss": jnp.asarray(1.5, jnp.bfloat16), "rl/reward_mean": jnp.array([0.75]),
              "rl/kl": math.nan, "train/grad_norm": np.inf, "rl/num_groups": np.int32(4),
              "perf/step_s": -math.inf})
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2
  for line in lines:  # strict JSON: no bare NaN / Infinity tokens
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  records = metrics.read_metrics(tmp_path)
  assert records[0] == {"step": 0, "eval/pass@1": 0.25, "eval/maj@4": 0.5}
  r = records[1]
  assert r["step"] == 1 and r["train/loss"] == 1.5 and r["rl/reward_mean"] == 0.75
  assert math.isnan(r["rl/kl"]) and r["train/grad_norm"] == math.inf
  assert r["perf/step_s"] == -math.inf
  assert r["rl/num_groups"] == 4 and isinstance(r["rl/num_groups"], int)


def test_non_scalar_metric_is_rejected(tmp_path):
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  with pytest.raises(TypeError, match="train/loss"):
    w.write(1, {"train/loss": np.ones(3)})
  with pytest.raises(TypeError, match="note"):
    w.write(1, {"note": "text"})
  w.close()


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics.MetricsWriter(tmp_path / "run", enabled=False)
  w.write(1, {"train/loss": 1.0})
  w.truncate_after(0)
  w.close()
  assert not (tmp_path / "run").exists()
  assert metrics.read_metrics(tmp_path / "run") == []


def test_partial_last_line_is_ignored(tmp_path):
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  w.write(1, {"train/loss": 1.0})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "train/lo')  # a crash in the middle of a write
  assert metrics.read_metrics(tmp_path) == [{"step": 1, "train/loss": 1.0}]


def test_truncate_after_drops_rerun_steps_in_jsonl_and_tensorboard(tmp_path):
  w = metrics.MetricsWriter(tmp_path)
  for step in range(1, 6):
    w.write(step, {"train/loss": float(step)})
  w.close()
  assert os.listdir(tmp_path / "tb")
  # Resume from the checkpoint of step 3: steps 4 and 5 are run again.
  w = metrics.MetricsWriter(tmp_path)
  w.truncate_after(3)
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3]
  for step in (4, 5):
    w.write(step, {"train/loss": 10.0 * step})
  w.close()
  records = metrics.read_metrics(tmp_path)
  assert [(r["step"], r["train/loss"]) for r in records] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()
  assert _event_scalars(str(tmp_path / "tb"))["train/loss"] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_sft_resume_keeps_only_sft_records_up_to_its_checkpoint(tmp_path):
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  for i in range(1, 6):
    w.write(0, {"sft/step": i, "sft/loss": float(i)})
  w.write(0, {"eval/pass@1": 0.5})  # written after SFT by an attempt that died before step 0
  w.close()
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  w.keep_sft_records_upto(3)
  w.write(0, {"sft/step": 4, "sft/loss": 40.0})
  w.close()
  assert [(r["sft/step"], r["sft/loss"]) for r in metrics.read_metrics(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  w.keep_sft_records_upto(0)  # a fresh start
  w.close()
  assert metrics.read_metrics(tmp_path) == []


def test_check_finite_names_bad_values():
  bad = metrics.check_finite({"a": 1.0, "b": np.nan, "c": jnp.inf, "d": np.int32(3),
                              "e": jnp.asarray(-jnp.inf, jnp.bfloat16)})
  assert bad == ["b", "c", "e"]


def test_progress_prints_first_last_and_at_most_every_n_seconds():
  now = [0.0]
  out = io.StringIO()
  p = metrics.Progress(10, every_s=5.0, stream=out, clock=lambda: now[0])
  for step in range(1, 11):
    p.update(step, {"rl/reward_mean": 0.5, "rl/kl": 0.001, "perf/step_s": 2.0})
    now[0] += 2.0
  lines = out.getvalue().splitlines()
  # Printed at t=0 (first), t=6, t=12, t=18 (> 5 s apart) and the last step.
  assert [line.split(" | ")[0] for line in lines] == [
      "step 1/10", "step 4/10", "step 7/10", "step 10/10"]
  assert lines[1] == "step 4/10 | reward 0.5 | kl 0.001 | 2.00 s/step | eta 12s"
  assert lines[-1].endswith("eta 0s")
  silent = metrics.Progress(3, stream=out, enabled=False)
  silent.update(1, {})
  assert len(out.getvalue().splitlines()) == 4


def test_plot_writes_a_png(tmp_path):
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  w.write(0, {"eval/pass@1": 0.1, "eval/maj@4": 0.2})
  for step in range(1, 5):
    w.write(step, {"rl/reward_mean": 0.1 * step, "rl/kl": math.nan})
  w.write(4, {"eval/pass@1": 0.4, "eval/maj@4": 0.5})
  w.close()
  path = metrics.plot(tmp_path)
  assert path == os.path.join(str(tmp_path), "progress.png")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 5000
