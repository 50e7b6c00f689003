"""Benchmarks: the sampler's and the step's figures, scaling sweeps, the TRL side, errors."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx

from grpo_jax import bench
from grpo_jax import bench_compare
from grpo_jax import bench_step
from grpo_jax import bench_trl
from grpo_jax import hardware
from grpo_jax import host_malloc
from grpo_jax import config as config_lib
from grpo_jax import models
from tests import tiny_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_sampler_bench_counts_bytes_and_times_steady_calls():
  config = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  model = models.init(config)
  args = bench_step.BenchArgs(batch=2, prompt_len=4, new_tokens=6, steps=2, mem_bw_gbs=10.0, seed=0)
  r = bench_step.bench_sampler(model, args)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert r["weight_bytes"] == 4 * num_params
  assert r["kv_bytes_mean"] == 2 * 2 * 2 * (4 + 6 / 2) * 2 * 8 * 4  # k,v x L x B x slots x Hkv x K x f32
  assert r["compile_s"] > 0 and r["step_s"] > 0
  assert r["bound_ratio"] == pytest.approx(r["tokens_per_s"] / r["bound_tokens_per_s"])


def test_qwen_shape_has_transformers_parameter_count():
  config = bench_step.qwen25_05b_shape("bfloat16")
  ours = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: models.init(config)))))
  with torch.device("meta"):
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config.to_hf()))
  assert ours == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("accum, shards, update_share, logps_share",
                         [(1, 1, 4, 4), (4, 1, 4, 4), (4, 4, 2, 4), (2, 8, 2, 4), (4, 8, 1, 4)])
def test_train_flops_count_a_prompt_once_per_block_of_rows_sharing_it(accum, shards, update_share,
                                                                       logps_share):
  from configs import demo
  cfg = demo.get_config()
  cfg.grpo.num_generations, cfg.data.prompts_per_step, cfg.sampler.max_new_tokens = 4, 8, 5
  cfg.grpo.num_iterations, cfg.train.grad_accum_steps, cfg.mesh.shape = 2, accum, (-1, 1, 1)
  p, t, rows = 1000, 3, 32
  tokens = lambda share: rows * (5 - 1) + rows // share * t  # completions ahead of the last
  want = 6 * p * 2 * tokens(update_share) + 2 * p * 1 * tokens(logps_share)  # mu = 2, 1 pass
  assert bench_step.train_flops(config_lib.freeze(cfg), p, t, logps_passes=1, row_shards=shards) == want


def test_scaling_varies_one_size_at_a_time_and_measures_each_config_once(monkeypatch, tmp_path):
  seen = []

  def fake_step(cfg, args):
    assert not args.pieces
    seen.append((cfg.grpo.num_generations, cfg.sampler.max_new_tokens, cfg.data.prompts_per_step))
    return {"step_s": float(len(seen)), "compile_s": 0.0, "step_rollout_tokens_per_s": 1.0}

  monkeypatch.setattr(bench_step, "bench_step", fake_step)
  base = config_lib.defaults()
  base.data.prompts_per_step, base.grpo.num_generations, base.sampler.max_new_tokens = 4, 2, 4
  table = bench_step.bench_scaling(base, bench_step.StepArgs(1, 0),
                                   {"G": [2, 4], "N": [4, 8], "B": [4]})
  assert [(r["vary"], r["G"], r["N"], r["B"]) for r in table] == [
      ("G", 2, 4, 4), ("G", 4, 4, 4), ("N", 2, 4, 4), ("N", 2, 8, 4), ("B", 2, 4, 4)]
  assert seen == [(2, 4, 4), (4, 4, 4), (2, 8, 4)]  # the base config once
  assert table[0]["step_s"] == table[2]["step_s"] == table[4]["step_s"]


def test_trl_venv_installs_cpu_torch_before_trl(monkeypatch, tmp_path):
  calls = []

  def fake_run(cmd, **kwargs):
    del kwargs
    calls.append(cmd)
    return subprocess.CompletedProcess(cmd, 1 if cmd[1] == "-c" else 0)

  monkeypatch.setattr(bench_compare.subprocess, "run", fake_run)
  python = bench_compare.ensure_trl_venv(str(tmp_path / "venv"))
  assert python == str(tmp_path / "venv" / "bin" / "python")
  installs = [c[c.index("install") + 1:] for c in calls if "install" in c]
  assert installs == [["--quiet", "--index-url", bench_compare.TORCH_CPU_INDEX, "torch==2.13.0"],
                      ["--quiet", "trl==1.16.0", "torch==2.13.0"]]


def test_child_peak_memory_is_its_own():
  big = bytearray(300 << 20)  # this process's peak is over 300 MiB
  child = subprocess.run(
      [sys.executable, "-c", "from grpo_jax import bench_trl; print(bench_trl.peak_rss_bytes())"],
      capture_output=True, text=True, check=True, cwd=REPO)
  assert int(child.stdout) < bench_trl.peak_rss_bytes() - (200 << 20)
  del big


def test_trl_comparison_command_runs_both_trainers(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: quicker
  model = tiny_hf.make_checkpoint("qwen2", tmp_path / "model")
  data = tmp_path / "prompts.jsonl"
  bench_trl.write_prompts(str(data), num_rows=8)
  out = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, "-m", "grpo_jax.bench", "--what=trl",
       f"--config=configs/hf.py:model={model},data={data}", "--config.data.num_eval_rows=0",
       "--config.data.prompts_per_step=2", "--config.grpo.num_generations=2",
       "--config.sampler.max_new_tokens=4", "--steps=1", "--warmup=0",
       f"--workdir={tmp_path / 'work'}", f"--out={out}"],
      capture_output=True, text=True, check=False, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["config"]["sampler"]["stop_at_eos"] is False
  assert r["config"]["rewards"] == bench_compare.SHARED_REWARD
  assert r["speedup"] == pytest.approx(r["trl"]["step_s"] / r["grpo_jax"]["step_s"])
  assert len(r["trl"]["step_times_s"]) == 1 and r["trl"]["sampling_s"] > 0
  ours = r["grpo_jax"]
  assert ours["logps_passes"] == 1  # beta > 0: the reference's; mu = 1: no pi_old pass
  assert ours["other_s"] == pytest.approx(
      ours["step_s"] - ours["sampling_s"] - ours["logps_s"] - ours["update_s"] - ours["reward_s"])
  assert ours["rollout_tokens_per_s"] == pytest.approx(2 * 2 * 4 / ours["sampling_s"])
  assert ours["page_faults_per_step"] >= 0
  assert ["host page faults per step (median)", f"{ours['page_faults_per_step']:.0f}"] in (
      bench.step_rows(ours))
  assert "grpo_jax vs TRL" in proc.stdout


def test_bad_model_flag_is_one_error_line():
  proc = subprocess.run([sys.executable, "-m", "grpo_jax.bench", "--what=sampler",
                         "--model=/no/such/dir"], capture_output=True, text=True, check=False)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: --model='/no/such/dir' is not allowed: demo | qwen2.5-0.5b-shape | "
                    "qwen2.5-0.5b | a local Hugging Face checkpoint dir"], proc.stderr
  assert "Traceback" not in proc.stderr


_FAULTS_PER_CALL = """
import resource, jax, jax.numpy as jnp
from grpo_jax import host_malloc
tuned = host_malloc.tune()
def loss(w, x):  # an MLP's gradient: [4096, 1024] float32 temporaries (16 MB each)
  h = jax.nn.silu(x @ w[0]) * (x @ w[1])
  return jnp.sum((h @ w[2]) ** 2)
grad = jax.jit(jax.grad(loss))
k = jax.random.split(jax.random.key(0), 4)
w = (jax.random.normal(k[0], (128, 1024)), jax.random.normal(k[1], (128, 1024)),
     jax.random.normal(k[2], (1024, 128)))
x = jax.random.normal(k[3], (4096, 128))
jax.block_until_ready(grad(w, x))
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(grad(w, x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, min(faults))  # the least: this machine's kernel also pages idle memory out
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuned_malloc_reuses_xla_temporaries_instead_of_faulting_them_in(monkeypatch):
  def faults(**env):
    # One CPU device, as a CPU run has.
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], check=True, text=True,
                         capture_output=True, env={**base, **env})
    tuned, per_call = out.stdout.split()
    return tuned == "True", int(per_call)

  tuned, per_call = faults()
  untuned, per_call_untuned = faults(GRPO_JAX_TUNE_MALLOC="0")
  assert tuned and not untuned
  assert per_call_untuned > 12_000  # some of the 100 MB of temporaries, page by page
  assert per_call < per_call_untuned / 20, (per_call, per_call_untuned)
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_malloc.tune()  # accelerators keep their temporaries on the device


def test_accelerators_are_found_from_the_hardware_not_the_installed_plugins(tmp_path):
  # A CPU-only host with libtpu and the CUDA plugin installed (the aot extra) is a CPU host;
  # a Google virtual NIC (device 0x0042) is not a TPU.
  nic = tmp_path / "sys/bus/pci/devices/0000:00:04.0"
  nic.mkdir(parents=True)
  (nic / "vendor").write_text("0x1ae0\n")
  (nic / "device").write_text("0x0042\n")
  assert not hardware.has_accelerator(str(tmp_path))
  (nic / "device").write_text("0x0063\n")  # a TPU v5e chip
  assert hardware.has_accelerator(str(tmp_path))
  (nic / "device").write_text("0x0042\n")
  (tmp_path / "dev").mkdir()
  (tmp_path / "dev/nvidia0").write_text("")
  assert hardware.has_accelerator(str(tmp_path))


def test_jax_runs_on_the_cpu_where_no_accelerator_is_attached():
  if hardware.has_accelerator():
    pytest.skip("this host has an accelerator attached")
  code = ("import jax; from grpo_jax import hardware; "
          "print(hardware.default_to_cpu(), jax.config.jax_platforms, jax.default_backend())")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=REPO)
  # Installed accelerator packages (the aot extra) are not started, so print no failures.
  assert out.stdout.split() == ["True", "cpu", "cpu"] and "Traceback" not in out.stderr
  out = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, check=True, cwd=REPO)
  assert out.stdout.split()[0] == "False"  # the user's choice stands

