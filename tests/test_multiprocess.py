"""Two processes on one machine, joined by jax.distributed over loopback with CPU (gloo)
collectives, train like one process with the same 8 devices; when one is killed, the
other stops with one line, and the two resume.

The first test starts this file twice as a worker (`python -m tests.test_multiprocess
WORKDIR full|lora`, JAX_PROCESS_ID 0 and 1, 4 CPU devices each) and compares with an
in-process run; the second starts the command line twice.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from grpo_jax import builder
from grpo_jax import distributed
from grpo_jax import config as config_lib
from grpo_jax import liveness
from grpo_jax import main as main_lib
from grpo_jax.errors import UserError
from tests.test_mesh import LORA, OVERRIDES, relative_error
from tests.test_reliability import cli_args, cli_overrides, resumed_steps, wait_for_step
from tests.test_train import tiny_config, train_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = OVERRIDES["train.num_steps"]


# No KL term: test_mesh checks the normalisers; this checks the processes' plumbing.
TWO_PROCESS_RUN = {**OVERRIDES, "mesh.shape": (2, 2, 2), "grpo.beta": 0.0}


def train(workdir: str, kind: str = "full"):
  """STEPS steps on a (2, 2, 2) mesh over every process's devices, metrics written by process
  0 and a (multi-host) checkpoint at the end. Returns the records and the gathered params.

  kind "full" trains every weight, "lora" LoRA adapters.
  """
  lora = LORA if kind == "lora" else {}
  cfg = config_lib.freeze(tiny_config(**{**TWO_PROCESS_RUN, **lora}))
  trainer = main_lib.Trainer(cfg, workdir)
  records = []
  for step in range(1, STEPS + 1):
    trainer.state, metrics = trainer.train_step(trainer.state, trainer.batch())
    metrics = jax.device_get(metrics)
    metrics.pop("perf/reward_s")  # the reward callback's wall time
    records.append({k: float(v) for k, v in metrics.items()})
    trainer.writer.write(step, records[-1])
  trainer.writer.close()
  trainer.save(STEPS, force=True)
  trainer.ckpt.wait()
  return records, multihost_utils.process_allgather(trainer.state.params, tiled=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_pair(command, logs):
  """Starts `command` as processes 0 and 1 of a two-process run, output to the two logs."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2")
  pair = []
  for i, log in enumerate(logs):
    with open(log, "w") as out:  # the child keeps its own copy of the file
      pair.append(subprocess.Popen(command, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)),
                                   stdout=out, stderr=subprocess.STDOUT))
  return pair


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_processes_train_like_one(tmp_path, kind):
  workdir = tmp_path / "two"
  workers = start_pair([sys.executable, "-m", "tests.test_multiprocess", str(workdir), kind],
                       [tmp_path / f"worker{i}.log" for i in range(2)])
  try:
    records, params = train(str(tmp_path / "one"), kind)  # meanwhile, one process
    codes = [w.wait(timeout=400) for w in workers]
  finally:
    for w in workers:
      w.kill()
  output = "\n".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
  assert codes == [0, 0], output
  two = json.loads((workdir / "records.json").read_text())
  for got, want in zip(two, records, strict=True):
    # abs: with mu = 1 the loss is a mean of zero-mean advantages, float noise around 0.
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
  with np.load(workdir / "params.npz") as two_params:
    got = [two_params[f"arr_{i}"] for i in range(len(two_params.files))]
  assert relative_error(got, params) < 1e-5
  # Only process 0 wrote metrics; both took part in the checkpoint.
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == STEPS
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()


def test_a_killed_process_stops_the_other_with_one_line_and_both_resume(tmp_path):
  """SIGKILL process 1 after its first step: process 0 (waiting for it in a collective)
  exits with one line naming it, within mesh.process_timeout_s and a bit. Then both run
  again and resume; a SIGKILL of process 0, which hosts jax's coordination service, ends
  process 1 at once (jax's own words). The last restart finishes with the records of an
  uninterrupted run."""
  cfg = tiny_config(**TWO_PROCESS_RUN, **{"checkpoint.every_steps": 1,
                                          "mesh.process_timeout_s": 10.0})
  workdir = tmp_path / "run"
  command = cli_args(workdir, *cli_overrides(cfg))
  outputs = []
  for killed in (1, 0, None):
    logs = [tmp_path / f"{len(outputs)}-{i}.log" for i in range(2)]
    pair = start_pair(command, logs)
    try:
      if killed is not None:
        wait_for_step(workdir, pair[0], (train_records(workdir) or [{"step": 0}])[-1]["step"] + 1)
        pair[killed].kill()
      codes = [p.wait(timeout=300) for p in pair]
    finally:
      for p in pair:
        p.kill()
    outputs.append([log.read_text() for log in logs])
    survivor = outputs[-1][1 - killed] if killed is not None else ""
    if killed == 1:
      assert codes[0] == liveness.EXIT_CODE, survivor
      errors = [line for line in survivor.splitlines() if line.startswith("error:")]
      assert len(errors) == 1 and "Traceback" not in survivor, survivor
      assert errors[0].startswith("error: process 1 of 2 (") and (
          "was lost: no heartbeat for 10 s (mesh.process_timeout_s); process 0 stops too"
          in errors[0]), errors[0]
    elif killed == 0:
      assert codes[1] != 0, survivor
  assert codes == [0, 0], outputs[-1]
  assert len(resumed_steps(outputs[1][0])) == len(resumed_steps(outputs[2][0])) == 1
  records = train_records(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  reference, _ = train(str(tmp_path / "one"))
  for got, want in zip(records, reference, strict=True):
    keys = [k for k in want if k in got and not k.startswith("perf/")]
    assert len(keys) > 10, keys
    assert [got[k] for k in keys] == pytest.approx([want[k] for k in keys], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("env, words", [
    ({"JAX_NUM_PROCESSES": "two"}, ["JAX_NUM_PROCESSES='two'", "an integer"]),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     ["JAX_PROCESS_ID=2", "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES"]),
])
def test_bad_process_variables_are_one_line_user_errors(monkeypatch, env, words):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(UserError) as e:
    distributed.init_distributed()
  assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_checkpoints_are_read_into_host_memory():
  assert builder.host_device().platform == "cpu"


def worker(workdir: str, kind: str) -> None:
  distributed.init_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(),
                                                               jax.device_count())
  records, params = train(workdir, kind)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "records.json"), "w") as f:
      json.dump(records, f)
    np.savez(os.path.join(workdir, "params.npz"), *jax.tree.leaves(params))


if __name__ == "__main__":
  worker(sys.argv[1], sys.argv[2])
