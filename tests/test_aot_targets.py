"""The ahead-of-time check's slice table, memory verdicts, dump parsing, roofline and JSON.

Everything but the last test runs without libtpu; the last compiles for TPU slices when
libtpu is installed (pip install -e ".[aot]").
"""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

from grpo_jax import aot_report
from grpo_jax import aot_targets
from grpo_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parent.parent
GIB = aot_targets.GIB


def test_slices_name_the_compilers_topologies_with_one_device_per_chip():
  v4 = aot_targets.parse_topology("v4-8")
  assert (v4.chips, v4.topology_kwargs()) == (4, {"platform": "tpu", "topology_name": "v4:2x2x1",
                                                   "chip_config_name": "megacore"})
  assert aot_targets.parse_topology(" V5E-8 ").topology == "v5e:2x4"
  for s in aot_targets.SLICES.values():
    dims = s.topology.split(":")[-1].split("x")
    assert math.prod(int(d) for d in dims) == s.chips, s.name
    assert s.name.startswith(s.chip.generation)
    if s.chip.generation in ("v4", "v5p"):  # named by TensorCores, two per chip
      assert int(s.name.split("-")[1]) == 2 * s.chips


def test_unknown_topology_is_a_user_error_naming_the_allowed_ones():
  with pytest.raises(UserError) as e:
    aot_targets.parse_topology("v5e-9")
  msg = str(e.value)
  assert "'v5e-9'" in msg and "\n" not in msg
  for name in ("v4-8", "v5e-256", "v6e-8", "h100x1", "h100x8"):
    assert name in msg


def test_gpu_slices_compile_for_an_h100_with_the_allocators_share_of_memory():
  s = aot_targets.parse_topology("h100x8")
  kwargs = s.topology_kwargs()
  assert (kwargs["platform"], kwargs["topology"]) == ("cuda", "1x1x8")
  config = kwargs["target_config"]
  assert f"device_memory_size: {aot_targets.H100_DEVICE_BYTES}" in config
  assert "cuda_compute_capability { major: 9" in config
  assert config.count("{") == config.count("}")
  assert aot_targets.usable_hbm_bytes(s, {}) == int(0.75 * aot_targets.H100_DEVICE_BYTES)
  assert aot_targets.usable_hbm_bytes(s, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}) == int(
      0.9 * aot_targets.H100_DEVICE_BYTES)
  assert aot_targets.usable_hbm_bytes(aot_targets.parse_topology("v5e-8"), {}) == 15.75 * GIB
  with pytest.raises(UserError, match="XLA_CLIENT_MEM_FRACTION"):
    aot_targets.usable_hbm_bytes(s, {"XLA_CLIENT_MEM_FRACTION": "most"})


def test_environment_runs_jax_on_the_cpu_and_keeps_users_tpu_settings():
  env = {"TPU_WORKER_HOSTNAMES": "10.0.0.2"}
  aot_targets.prepare_environment(aot_targets.parse_topology("v5e-8"), env)
  assert env == {"JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": "v5e-8",
                 "TPU_WORKER_HOSTNAMES": "10.0.0.2"}
  env = {}
  aot_targets.prepare_environment(aot_targets.parse_topology("h100x1"), env)
  assert env == {"JAX_PLATFORMS": "cpu"}


def _stats(**sizes):
  fields = dict(argument_size_in_bytes=10, output_size_in_bytes=6, alias_size_in_bytes=4,
                temp_size_in_bytes=100, generated_code_size_in_bytes=1, peak_memory_in_bytes=0)
  fields.update(sizes)
  return types.SimpleNamespace(**fields)


def test_memory_takes_the_compilers_peak_or_bounds_it_from_the_parts():
  assert aot_report.Memory.from_analysis(_stats(peak_memory_in_bytes=90)).peak_bytes == 90
  # Without a reported peak: arguments + outputs not aliased to them + temporaries + code.
  assert aot_report.Memory.from_analysis(_stats()).peak_bytes == 10 + 6 - 4 + 100 + 1


def test_headroom_is_the_share_of_hbm_left_free():
  assert aot_report.fits(90, 100, 0.1)
  assert not aot_report.fits(91, 100, 0.1)
  assert aot_report.fits(100, 100, 0.0)


def test_needed_bytes_are_read_from_the_compilers_out_of_memory_errors():
  # libtpu 0.0.42.1's message for a program whose buffers exceed the chip.
  refused = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (27.00G) exceeds available HBM (15.75G).")
  assert aot_report.needed_bytes_from_error(refused) == 27 * GIB
  # ... and for the configs/tpu_v5e.py:7b,lora train step on a v5e-8 (2026-11-29).
  refused = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. "
             "Ran out of memory in memory space hbm. Used 16.30G of 15.75G hbm. Exceeded hbm "
             "capacity by 562.79M.")
  assert aot_report.needed_bytes_from_error(refused) == int(16.30 * GIB)
  assert aot_report.needed_bytes_from_error("INVALID_ARGUMENT: bad shape") is None


_DUMP_SCRIPT = """
import jax, jax.numpy as jnp
def f(a):  # the largest buffer: the sorted [N, N] float32
  return jnp.sort(a[:, None] * a[None, :], axis=0)[0]
jax.jit(f).lower(jax.ShapeDtypeStruct((%d,), jnp.float32)).compile()
"""


def test_contributors_at_the_peak_come_from_xlas_dump(tmp_path):
  n = 1024
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text")
  subprocess.run([sys.executable, "-c", _DUMP_SCRIPT % n], env=env, check=True, cwd=REPO)
  found = aot_report.dumped_contributors(tmp_path, "jit_f", top=1)
  assert len(found) == 1
  what, size = found[0]
  assert what == f"f32[{n},{n}] from jit(f)/jit(sort)/sort" and size == n * n * 4
  assert aot_report.dumped_contributors(tmp_path, "jit_g") == []


def test_roofline_takes_the_slower_of_compute_and_memory_per_phase():
  chip = aot_targets.CHIPS["v5e"]
  decode = aot_report.Phase("decode", flops=1e9, bytes_accessed=2e9, count=100)
  update = aot_report.Phase("update", flops=4e13, bytes_accessed=1e9, count=4)
  out = aot_report.roofline([decode, update], chip, chips=8, generated_tokens=25600,
                            decode=decode, decode_min_bytes=1.5e9)
  decode_s = 100 * max(1e9 / chip.peak_flops, 2e9 / chip.hbm_bandwidth)  # memory bound
  update_s = 4 * max(4e13 / chip.peak_flops, 1e9 / chip.hbm_bandwidth)  # compute bound
  assert out["phases"]["decode"]["s"] == pytest.approx(100 * 2e9 / chip.hbm_bandwidth)
  assert out["step_s"] == pytest.approx(decode_s + update_s)
  assert out["tokens_per_s_per_chip"] == pytest.approx(25600 / (decode_s + update_s) / 8)
  assert (out["decode_bytes_per_token"], out["decode_min_bytes_per_token"]) == (2e9, 1.5e9)


def _programs():
  small = aot_report.Memory(argument_bytes=2 * GIB, output_bytes=2 * GIB, alias_bytes=2 * GIB,
                            temp_bytes=5 * GIB, code_bytes=1 << 20, peak_bytes=6 * GIB)
  return [
      aot_report.Program("init", 1.5, 6 * GIB, memory=small, flops=None, bytes_accessed=1e9),
      aot_report.Program("train_step", 420.0, 15 * GIB, memory=dataclasses.replace(
          small, peak_bytes=15 * GIB), flops=5.7e12, bytes_accessed=1.5e11,
          contributors=(("3 x bf16[196352,4864] from jit(train_step)/dot_general", 5 * GIB),)),
  ]


def test_phases_extrapolate_from_one_and_two_layers_of_each_kind():
  """A model of 3 full and 2 sliding layers: a full layer costs (10 flops, 100 bytes), a
  sliding one (4, 40), the rest (7, 70); the phases compiled at one and two layers of each
  kind give back the five-layer model's costs."""
  layer = {"full": (10.0, 100.0), "sliding": (4.0, 40.0)}
  rest = (7.0, 70.0)

  def compiled(kind, depth):
    return [aot_report.Phase(name, rest[0] + depth * layer[kind][0],
                             rest[1] + depth * layer[kind][1], count)
            for name, count in (("rollout", 1), ("decode", 63))]

  phases = aot_report.extrapolated_phases(
      {kind: (compiled(kind, 1), compiled(kind, 2)) for kind in layer}, {"full": 3, "sliding": 2})
  assert [(p.name, p.count) for p in phases] == [("rollout", 1), ("decode", 63)]
  for p in phases:
    assert (p.flops, p.bytes_accessed) == (7 + 3 * 10 + 2 * 4, 70 + 3 * 100 + 2 * 40)


def test_decode_reads_the_blocks_up_to_the_filled_slot():
  """A cache of 1,000 slots in blocks of 100, two full layers and one sliding layer of window
  150: at 10% one block each (what the decode phase counts), at 50% five (the sliding layer
  three, its window's two plus one), at 90% nine; reading every slot is ten a layer."""
  decode = aot_report.Phase("decode", 1.0, 50.0, 99)
  rows = aot_report.decode_by_fill(decode, 2.0, slots=1000, block=100,
                                   windows=[None, None, 150], weight_bytes=30.0, kv_bytes=20.0)
  assert [row["fill"] for row in rows] == list(aot_report.FILLS)
  assert [row["slots"] for row in rows] == [100, 500, 900]
  assert [row["bytes_per_token"] for row in rows] == [50.0, 50 + (4 + 4 + 2) * 2.0,
                                                      50 + (8 + 8 + 2) * 2.0]
  assert {row["every_slot_bytes_per_token"] for row in rows} == {50 + 3 * 9 * 2.0}
  assert [row["min_bytes_per_token"] for row in rows] == [32.0, 40.0, 48.0]


def test_each_decode_iteration_reads_the_blocks_of_its_own_fill():
  """Prompts of 98 slots, blocks of 100, two full layers: of four iterations (slots 99-102)
  two read one block a layer, two read two: one more block a layer on average."""
  decode = aot_report.Phase("decode", 1.0, 50.0, 4)
  step = aot_report.decode_over_the_rollout(decode, 2.0, prompt_slots=98, block=100,
                                            windows=[None, None])
  assert (step.name, step.flops, step.count, step.bytes_accessed) == ("decode", 1.0, 4, 52.0)


def test_report_has_the_keys_design_md_fixes():
  s = aot_targets.parse_topology("v5e-8")
  decode = aot_report.Phase("decode", 1e9, 2e9, 10)
  roof = aot_report.roofline([decode], s.chip, chips=8, generated_tokens=80, decode=decode,
                             decode_min_bytes=1e9)
  out = json.loads(json.dumps(aot_report.report(s, s.chip.hbm_bytes, 0.1, _programs(), roof)))
  assert (out["topology"], out["chips"], out["hbm_bytes"]) == ("v5e-8", 8, 15.75 * GIB)
  assert set(out["programs"]) == {"init", "train_step"}
  for program in out["programs"].values():
    assert {"peak_bytes", "fits", "compile_s", "flops", "bytes_accessed"} <= set(program)
  assert out["programs"]["init"]["fits"] and not out["programs"]["train_step"]["fits"]
  assert out["fits"] is False
  assert {"step_s", "tokens_per_s_per_chip", "decode_bytes_per_token",
          "decode_min_bytes_per_token"} <= set(out["roofline"])
  table = aot_report.format_report(out).splitlines()
  assert len(table) == 2 + 2 + 2  # title, header, one row per program, the roofline, its phases
  assert table[-1] == "  decode 10 x 2.44 ms (memory bound)", table[-1]
  assert re.match(r"train_step +15\.00 +2\.00 +5\.00 +2\.00 +5% +NO +420\.0 +5\.700 +150\.0$",
                  table[3]), table[3]


def test_error_line_names_the_program_its_bytes_the_hbm_and_the_largest_buffers():
  s = aot_targets.parse_topology("v5e-8")
  line = aot_report.error_line(s, s.chip.hbm_bytes, 0.1, _programs())
  assert line.startswith("error: train_step needs 15.00 GiB per chip") and "\n" not in line
  assert "v5e-8 chip has 15.75 GiB" in line and "14.18 GiB with --headroom=0.1" in line
  assert "3 x bf16[196352,4864] from jit(train_step)/dot_general 5.00 GiB" in line
  assert aot_report.error_line(s, s.chip.hbm_bytes, 0.0, _programs()) is None
  refused = aot_report.Program("eval_sample", 30.0, 27 * GIB)
  assert "eval_sample needs 27.00 GiB per chip (the compiler refused it)" in (
      aot_report.error_line(s, s.chip.hbm_bytes, 0.0, [refused]))


_TPU_SCRIPT = """
import json, sys, time
from grpo_jax import aot_report, aot_targets
s = aot_targets.parse_topology(sys.argv[1])
aot_targets.prepare_environment(s)
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(aot_targets.compile_devices(s), ("rows",))
x = jax.ShapeDtypeStruct((int(sys.argv[2]), 4096), jnp.bfloat16,
                         sharding=NamedSharding(mesh, P("rows")))
w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
t = time.perf_counter()
compiled = jax.jit(lambda x, w: jax.nn.relu(x @ w) @ w.T).lower(x, w).compile()
p = aot_report.compiled_program("f", compiled, time.perf_counter() - t)
print(json.dumps([p.needed_bytes, p.flops, compiled.input_shardings[0][0].mesh.devices.size]))
"""


_TPU_REFUSED = """
import json, sys
from grpo_jax import aot_report, aot_targets
s = aot_targets.parse_topology("v5e-4")
aot_targets.prepare_environment(s)
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(aot_targets.compile_devices(s), ("rows",))
x = jax.ShapeDtypeStruct((1 << 16, 1 << 15), jnp.float32, sharding=NamedSharding(mesh, P()))
try:  # 8 GiB replicated on every chip, and its sorted copy
  jax.jit(lambda x: jnp.sort(x, axis=0)[0]).lower(x).compile()
except jax.errors.JaxRuntimeError as e:
  print(json.dumps([aot_report.needed_bytes_from_error(str(e)),
                    aot_report.dumped_contributors(sys.argv[1], "jit__lambda", top=1)]))
"""

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e \".[aot]\")")


@needs_libtpu
def test_programs_compile_for_tpu_slices_on_this_host():
  def compile_for(name, rows):
    out = subprocess.run([sys.executable, "-c", _TPU_SCRIPT, name, str(rows)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr  # libtpu's host warnings are not shown
    return json.loads(out.stdout.strip().splitlines()[-1])

  peak4, flops4, devices4 = compile_for("v5e-4", 8192)
  peak16, flops16, devices16 = compile_for("v5e-16", 8192)
  assert (devices4, devices16) == (4, 16)
  assert peak16 < peak4  # the rows split over more chips
  assert flops16 == pytest.approx(flops4 / 4, rel=0.05)  # per chip
  assert compile_for("v5e-4", 8 * 8192)[0] > peak4  # 8x the rows need more
  assert compile_for("v4-8", 8192)[2] == 4  # one device per v4 chip


@needs_libtpu
def test_a_program_over_hbm_is_refused_with_its_bytes_and_largest_buffers(tmp_path):
  env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text")
  out = subprocess.run([sys.executable, "-c", _TPU_REFUSED, str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True)
  needed, largest = json.loads(out.stdout.strip().splitlines()[-1])
  assert needed > aot_targets.CHIPS["v5e"].hbm_bytes
  assert largest[0][0].startswith(f"f32[{1 << 16},{1 << 15}]") and largest[0][1] == 8 * GIB
