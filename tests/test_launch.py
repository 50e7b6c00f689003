"""The accelerator configs freeze for the device counts they are meant for; the launch
scripts' dry runs print the exact commands (gcloud and ssh are never needed to test them)."""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from configs import gpu, tpu_v4, tpu_v5e, tpu_v6e
from grpo_jax import config as config_lib
from grpo_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARG = "model=/ckpt/qwen,data=/data/train.jsonl"
FLAGS = ["--config=configs/tpu_v4.py:model=/m,data=/d.jsonl", "--workdir=/runs/a b",
         "--config.rewards=accuracy:1,format:0.2", "--config.mesh.shape=(1,-1,1)", "--it's"]
PROCESS_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.mark.parametrize("module, size, devices, mesh", [
    (tpu_v4, "1.5b", 4, (1, 4, 1)),  # v4-8
    (tpu_v4, "1.5b", 64, (1, 64, 1)),  # v4-128
    (tpu_v4, "7b", 8, (1, 2, 4)),  # v4-16
    (tpu_v4, "7b", 16, (1, 4, 4)),  # v4-32
    (tpu_v4, "7b", 64, (1, 16, 4)),
    (tpu_v5e, "0.5b", 4, (1, 4, 1)),  # v5litepod-4
    (tpu_v5e, "1.5b", 8, (1, 8, 1)),  # v5litepod-8
    (tpu_v5e, "1.5b", 16, (1, 16, 1)),
    (tpu_v5e, "7b", 32, (1, 8, 4)),  # v5litepod-32
    (tpu_v5e, "7b", 64, (1, 16, 4)),
    (tpu_v6e, "1.5b", 8, (1, 8, 1)),  # v6e-8
    (tpu_v6e, "7b", 8, (1, 2, 4)),
    (gpu, "1.5b", 1, (1, 1, 1)),
    (gpu, "1.5b", 8, (1, 8, 1)),
    (gpu, "7b", 8, (1, 8, 1)),
    (gpu, "7b", 16, (1, 16, 1)),
])
def test_accelerator_configs_freeze_for_their_device_counts(module, size, devices, mesh):
  arg = ARG if size == "1.5b" else f"{size},{ARG}"
  c = config_lib.freeze(module.get_config(arg), num_devices=devices)
  assert c.mesh.shape == mesh
  assert (c.model.path, c.data.source) == ("/ckpt/qwen", "jsonl:/data/train.jsonl")
  assert (c.model.dtype, c.model.param_dtype, c.model.remat) == ("bfloat16", "float32", True)
  assert c.data.max_prompt_len + c.sampler.max_new_tokens == 1024  # the S of the arithmetic


def test_several_gpu_nodes_keep_fsdp_inside_a_node():
  cfg = gpu.get_config(f"7b,{ARG}")
  cfg.mesh.shape = (2, 8, 1)
  assert config_lib.freeze(cfg, num_devices=16).mesh.shape == (2, 8, 1)


@pytest.mark.parametrize("arg, words", [
    (f"3b,{ARG}", ["'3b'", "1.5b |", "| 7b)", "\"lora\" and \"long\""]),
    (f"7b,1.5b,{ARG}", ["'7b,1.5b'"]),
    ("7b,data=/d.jsonl", ["model missing"]),
])
def test_bad_config_arguments_are_user_errors(arg, words):
  for module in (tpu_v4, tpu_v5e, gpu):
    with pytest.raises(UserError) as e:
      module.get_config(arg)
    assert all(w in str(e.value) for w in words), str(e.value)


def script(name, *args, env=None):
  """Runs launch/<name> with gcloud, ssh and git on the PATH replaced by stubs that fail."""
  return subprocess.run(["bash", os.path.join(ROOT, "launch", name), *args],
                        capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def stub_env(tmp_path):
  """An environment whose gcloud, ssh and git record that they ran, then fail."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "ssh", "git"):
    stub = bin_dir / tool
    stub.write_text(f"#!/bin/sh\necho {tool} >> {tmp_path}/ran\nexit 99\n")
    stub.chmod(0o755)
  yield dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  assert not (tmp_path / "ran").exists(), (tmp_path / "ran").read_text()


def commands(result):
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def tpu(command, *args, env):
  return commands(script("tpu_vm.sh", command, "--name=grpo", "--zone=us-central2-b",
                         "--dry-run", *args, env=env))


def test_tpu_vm_create_and_delete(stub_env):
  assert tpu("create", "--type=v4-32", "--spot", "--project=p", env=stub_env) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "grpo", "--zone=us-central2-b",
      "--project=p", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]
  assert tpu("delete", env=stub_env) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "grpo", "--zone=us-central2-b",
      "--quiet"]]


def test_tpu_vm_install_ships_head_to_every_worker(stub_env):
  archive, scp, ssh = tpu("install", "--nfs=10.0.0.2:/vol1", env=stub_env)
  assert archive == ["git", "-C", ROOT, "archive", "--format=tar.gz", "-o",
                     "/tmp/grpo_jax-grpo.tar.gz", "HEAD"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/grpo_jax-grpo.tar.gz",
                 "grpo:grpo_jax.tar.gz", "--worker=all", "--zone=us-central2-b"]
  assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "grpo", "--worker=all"]
  remote = ssh[-1].removeprefix("--command=")
  for step in ("tar -xzf ~/grpo_jax.tar.gz -C ~/grpo_jax", "python3 -m venv ~/grpo_venv",
               '~/grpo_venv/bin/pip install -q -e "$HOME/grpo_jax[tpu]"',
               "sudo mount -t nfs 10.0.0.2:/vol1 /mnt/shared"):
    assert step in remote, step


def fake_python(tmp_path, path):
  """A stand-in interpreter that records its arguments and process variables as JSON."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                  f"json.dump([sys.argv[1:], {{k: os.environ[k] for k in {PROCESS_VARS!r} "
                  f"if k in os.environ}}], open({str(tmp_path / 'called')!r}, 'w'))\n")
  path.chmod(0o755)


def run_remote(tmp_path, remote: str, home) -> tuple[list[str], dict[str, str]]:
  """Runs a printed remote command locally (with HOME=home) and returns what python got."""
  subprocess.run(["bash", "-c", remote], env=dict(os.environ, HOME=str(home)), check=True,
                 timeout=60)
  called = tmp_path / "called"
  for _ in range(200):  # the command starts the trainer in the background
    if called.exists() and called.stat().st_size:
      break
    time.sleep(0.05)
  return json.loads(called.read_text())


def test_tpu_vm_run_starts_every_worker_and_follows_worker_0(stub_env, tmp_path):
  describe, start, follow = tpu("run", "--port=9000", "--", *FLAGS, env=stub_env)
  assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "grpo",
                      "--zone=us-central2-b", "--format=value(networkEndpoints[0].ipAddress)"]
  assert start[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "grpo", "--worker=all"]
  assert follow == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "grpo", "--worker=0",
                    "--zone=us-central2-b", "--command=tail -n +1 -F ~/grpo_jax.log"]
  # The worker-side command, run here: the flags arrive intact, the coordinator is set.
  (tmp_path / "home" / "grpo_jax").mkdir(parents=True)
  fake_python(tmp_path, tmp_path / "home" / "grpo_venv" / "bin" / "python")
  args, env = run_remote(tmp_path, start[-1].removeprefix("--command="), tmp_path / "home")
  assert args == ["-m", "grpo_jax.main", *FLAGS]
  assert env == {"JAX_COORDINATOR_ADDRESS": "WORKER0_IP:9000"}
  assert tpu("logs", "--worker=3", env=stub_env)[0][6] == "--worker=3"


def test_gpu_nodes_start_one_process_per_node(stub_env, tmp_path):
  python = tmp_path / "venv" / "bin" / "python"
  fake_python(tmp_path, python)
  result = script("gpu_nodes.sh", "--hosts=gpu0,gpu1,gpu2", f"--repo={tmp_path}",
                  f"--python={python}", "--dry-run", "--", *FLAGS, env=stub_env)
  *starts, follow = commands(result)
  assert [s[:2] for s in starts] == [["ssh", "gpu0"], ["ssh", "gpu1"], ["ssh", "gpu2"]]
  assert follow == ["ssh", "gpu0", "tail -n +1 -F /tmp/grpo_jax.log"]
  for i, start in enumerate(starts):
    (tmp_path / "called").unlink(missing_ok=True)
    remote = start[2].replace("/tmp/grpo_jax.log", str(tmp_path / "log"))
    args, env = run_remote(tmp_path, remote, tmp_path)
    assert args == ["-m", "grpo_jax.main", *FLAGS]
    assert env == {"JAX_COORDINATOR_ADDRESS": "gpu0:8476", "JAX_NUM_PROCESSES": "3",
                   "JAX_PROCESS_ID": str(i)}
  # Under a scheduler: one process, here, in the foreground.
  here = script("gpu_nodes.sh", "--hosts=gpu0,gpu1", "--process-id=1", f"--python={python}",
                "--dry-run", "--", *FLAGS, env=stub_env)
  assert commands(here) == [["env", "JAX_COORDINATOR_ADDRESS=gpu0:8476", "JAX_NUM_PROCESSES=2",
                             "JAX_PROCESS_ID=1", str(python), "-m", "grpo_jax.main", *FLAGS]]


@pytest.mark.parametrize("name, args, words", [
    ("tpu_vm.sh", [], ["a command is required"]),
    ("tpu_vm.sh", ["start", "--name=a", "--zone=b"], ["unknown command 'start'"]),
    ("tpu_vm.sh", ["create", "--zone=b"], ["--name is required"]),
    ("tpu_vm.sh", ["run", "--name=a", "--zone=b"], ["run needs grpo_jax.main flags"]),
    ("tpu_vm.sh", ["logs", "--name=a", "--zone=b", "--colour"], ["unknown option '--colour'"]),
    ("gpu_nodes.sh", ["--", "--workdir=x"], ["--hosts is required"]),
    ("gpu_nodes.sh", ["--hosts=a,b", "--process-id=2", "--", "--workdir=x"],
     ["--process-id=2 is not allowed", "< 2"]),
])
def test_launch_mistakes_are_one_line_errors(stub_env, name, args, words):
  result = script(name, *args, env=stub_env)
  assert result.returncode == 2 and result.stdout == ""
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("name", ["tpu_vm.sh", "gpu_nodes.sh"])
def test_launch_help(stub_env, name):
  result = script(name, "--help", env=stub_env)
  assert result.returncode == 0 and result.stdout.startswith(f"usage: launch/{name}")
  assert "--dry-run" in result.stdout
  with open(os.path.join(ROOT, "launch", name)) as f:
    assert "set -euo pipefail" in f.read()
