"""Reliability: preemption, crashes, bad input, numerical faults, reward faults (a killed
math-verify child among them), safe loading.

The preemption and crash tests run the real command line in subprocesses on one CPU device
(the 8-fake-device XLA flag of conftest.py is stripped from their environment) and compare
metrics.jsonl with an uninterrupted run, value for value.
"""

import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from grpo_jax import checkpoint as checkpoint_lib
from grpo_jax import config as config_lib
from grpo_jax import main as main_lib
from grpo_jax import metrics as metrics_lib
from grpo_jax import rewards
from grpo_jax.errors import UserError
from grpo_jax.rewards import accuracy as accuracy_lib
from grpo_jax.rewards import math_worker
from tests.test_train import tiny_config, train_records

REPO = pathlib.Path(__file__).resolve().parents[1]
COMPARED = ("train/loss", "train/grad_norm", "rl/reward_mean", "rl/reward_std", "rl/kl")
STEP_COMPARED = ("rl/step_reward_mean", "rl/steps_per_completion", "rl/steps_truncated")
NUM_STEPS = 12


def digit_reward(prompts, completions, **unused):
  """Test reward: the share of digits in the completion (varies a lot within a group)."""
  return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def digit_steps(prompts, completions, **unused):
  """Test step reward: each digit ends a step, worth 1 when even (varied, often truncated)."""
  return [[(i + 1, float(int(ch) % 2 == 0)) for i, ch in enumerate(c) if ch.isdigit()]
          for c in completions]


# -- the command line in a subprocess --------------------------------------------------------


def _flat(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield prefix + k, v


def cli_overrides(cfg):
  """--config.<key>=<value> flags that turn configs/demo.py into `cfg`."""
  base = dict(_flat(demo.get_config().to_dict()))
  return [f"--config.{k}={v}" for k, v in _flat(cfg.to_dict()) if base.get(k) != v]


def cli_env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  return env


def cli_args(workdir, *extra):
  return [sys.executable, "-m", "grpo_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", *extra]


_STARTED: list[subprocess.Popen] = []  # the runs start_run started


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
  """A run that a failed test leaves running is killed and reaped, so that it neither holds
  the CPU nor shows up among a later test's child processes."""
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      proc.kill()
    proc.communicate()


def start_run(workdir, cfg):
  proc = subprocess.Popen(cli_args(workdir, *cli_overrides(cfg)), cwd=REPO, env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _STARTED.append(proc)
  return proc


def run_cli(*args, timeout=300):
  return subprocess.run(list(args), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                        timeout=timeout)


def wait_for_step(workdir, proc, step, timeout=240.0):
  """Waits until metrics.jsonl holds a train record at `step` or later."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [r["step"] for r in train_records(workdir)]
    if steps and steps[-1] >= step:
      return
    assert proc.poll() is None, proc.communicate()[0]
    time.sleep(0.01)
  raise TimeoutError(f"no train record at step {step} in {workdir}")


def crash_config(supervision="outcome"):
  process = {"grpo.supervision": "process", "step_rewards": "tests.test_reliability:digit_steps",
             "grpo.max_steps_per_completion": 4} if supervision == "process" else {}
  return tiny_config(**{"rewards": "tests.test_reliability:digit_reward", "grpo.beta": 0.04,
                        "train.num_steps": NUM_STEPS, "train.lr_schedule": "constant",
                        "checkpoint.every_steps": 1, "checkpoint.async_save": True,
                        "eval.num_prompts": 0, **process})


def checkpoint_steps(workdir):
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=3)
  steps = ckpt.all_steps()
  ckpt.close()
  return steps


def resumed_steps(output):
  return [int(s) for s in re.findall(r"resumed from \S*/checkpoints/(\d+)", output)]


@pytest.mark.parametrize("supervision", ["outcome", "process"])
def test_sigterm_then_sigkills_at_random_steps_resume_to_the_uninterrupted_metrics(
    tmp_path, supervision):
  """SIGTERM: exit 0 with a checkpoint at the finished step. Then two SIGKILLs at random
  moments after random steps, each restart resuming from the newest complete checkpoint.
  The end: the records of an uninterrupted run, each step once, with equal values."""
  straight, workdir = tmp_path / "straight", tmp_path / "interrupted"
  cfg = lambda: crash_config(supervision)
  proc = start_run(straight, cfg())
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out

  proc = start_run(workdir, cfg())
  wait_for_step(workdir, proc, 1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "Traceback" not in out
  stopped = train_records(workdir)[-1]["step"]
  assert stopped < NUM_STEPS, "the signal came after the run had finished"
  assert checkpoint_steps(workdir)[-1] == stopped

  rng = random.Random(7)
  resumed = []
  for _ in range(2):
    # A step beyond every record so far, then a random moment after it.
    target = train_records(workdir)[-1]["step"] + rng.randint(1, 3)
    proc = start_run(workdir, cfg())
    wait_for_step(workdir, proc, target)
    time.sleep(rng.uniform(0.0, 0.2))
    proc.kill()
    resumed += resumed_steps(proc.communicate(timeout=60)[0])
  proc = start_run(workdir, cfg())
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out
  resumed += resumed_steps(out)
  assert len(resumed) == 3 and resumed[0] == stopped and resumed == sorted(resumed), resumed
  # Half-written steps (Orbax writes <step>.orbax-checkpoint-tmp-* and renames) are gone.
  assert all(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())

  steps_and_keys = lambda d: [(r["step"], sorted(r)) for r in metrics_lib.read_metrics(d)]
  assert steps_and_keys(workdir) == steps_and_keys(straight)
  records = train_records(workdir)
  assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
  compared = COMPARED + (STEP_COMPARED if supervision == "process" else ())
  if supervision == "process":  # digits were found, so steps drove the updates
    assert all(r["rl/steps_per_completion"] > 0 for r in records)
  for got, want in zip(records, train_records(straight)):
    for key in compared:
      assert got[key] == want[key], (got["step"], key, got[key], want[key])


SFT_STEPS = 40


def sft_steps(workdir):
  return [r["sft/step"] for r in metrics_lib.read_metrics(workdir) if "sft/step" in r]


def wait_for_sft_step(workdir, proc, step, timeout=240.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = sft_steps(workdir)
    if steps and steps[-1] >= step:
      return
    assert proc.poll() is None, proc.communicate()[0]
    time.sleep(0.01)
  raise TimeoutError(f"no SFT record at step {step} in {workdir}")


def test_preempted_cold_start_sft_resumes_to_the_uninterrupted_metrics(tmp_path):
  """SIGTERM during the warm-start SFT: exit 0 with SFT's step checkpointed; then a SIGKILL
  mid-SFT; the restarts resume SFT where it was and the run ends with the records of an
  uninterrupted one. SFT's checkpoints are gone once GRPO has its step 0."""
  cfg = lambda: tiny_config(**{"sft.num_steps": SFT_STEPS, "sft.batch_size": 4,
                               "sft.max_len": 64, "train.num_steps": 2,
                               "checkpoint.every_steps": 5, "eval.num_prompts": 0})
  straight, workdir = tmp_path / "straight", tmp_path / "interrupted"
  out, _ = start_run(straight, cfg()).communicate(timeout=900)
  assert "resumed" not in out

  proc = start_run(workdir, cfg())
  wait_for_sft_step(workdir, proc, 3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "Traceback" not in out, out
  stopped = sft_steps(workdir)[-1]
  assert stopped < SFT_STEPS and not train_records(workdir)
  sft_ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints_sft", keep=1)
  assert sft_ckpt.all_steps() == [stopped]
  sft_ckpt.close()

  proc = start_run(workdir, cfg())
  wait_for_sft_step(workdir, proc, stopped + 8)  # past the next multiple of 5
  proc.kill()
  out, _ = proc.communicate(timeout=60)
  assert f"resumed SFT from {workdir}/checkpoints_sft/{stopped}" in out, out

  out, _ = start_run(workdir, cfg()).communicate(timeout=900)
  assert re.search(r"resumed SFT from \S*/checkpoints_sft/(\d+)", out), out
  assert sft_steps(workdir) == list(range(1, SFT_STEPS + 1)) == sft_steps(straight)
  records = lambda d: [{k: v for k, v in r.items() if not k.startswith("perf/")}
                       for r in metrics_lib.read_metrics(d)]
  assert records(workdir) == records(straight)
  assert not list((workdir / "checkpoints_sft").iterdir())


# -- user errors: one line, exit 2, no traceback ---------------------------------------------


def assert_one_error_line(stderr, *needles):
  lines = [line for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1, stderr
  assert "Traceback" not in stderr, stderr
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])


@pytest.mark.parametrize("args, needles", [
    (("--config.grpo.loss_type=bogus",), ("grpo.loss_type", "grpo | bnpo | dr_grpo | dapo")),
    (("--config.grpo.betta=0.1",), ("unknown config key grpo.betta", "grpo.beta")),
    (("--config.train.num_steps=abc",), ("train.num_steps", "abc")),
])
def test_bad_config_on_the_command_line_is_one_error_line(args, needles, tmp_path):
  result = run_cli(*cli_args(tmp_path, *args))
  assert result.returncode == 2
  assert_one_error_line(result.stderr, *needles)
  assert not (tmp_path / "checkpoints").exists()


def test_missing_workdir_and_missing_config_file_are_one_error_line(tmp_path):
  result = run_cli(sys.executable, "-m", "grpo_jax.main", "--config=configs/demo.py")
  assert result.returncode == 2
  assert_one_error_line(result.stderr, "--workdir is required")
  result = run_cli(sys.executable, "-m", "grpo_jax.main", "--config=configs/nope.py",
                   f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert_one_error_line(result.stderr, "configs/nope.py", "does not exist")


def test_debug_flag_shows_the_traceback(tmp_path):
  result = run_cli(*cli_args(tmp_path, "--config.grpo.loss_type=bogus", "--debug"))
  assert result.returncode != 0
  assert "Traceback" in result.stderr and "UserError" in result.stderr


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


ROW = '{"prompt": "What is 1+1?", "answer": "2"}\n'


@pytest.mark.parametrize("name, files, overrides, needles", [
    ("missing jsonl", {}, {"data.source": "jsonl:{d}/nope.jsonl"},
     ("{d}/nope.jsonl", "does not exist")),
    ("not json", {"bad.jsonl": ROW + "{oops\n"}, {"data.source": "jsonl:{d}/bad.jsonl"},
     ("{d}/bad.jsonl:2", "not valid JSON", "skip_bad_rows")),
    ("no prompt", {"q.jsonl": ROW + '{"question": "x", "answer": "2"}\n'},
     {"data.source": "jsonl:{d}/q.jsonl"}, ("{d}/q.jsonl:2", 'no "prompt"')),
    ("empty", {"empty.jsonl": "\n"}, {"data.source": "jsonl:{d}/empty.jsonl"},
     ("{d}/empty.jsonl", "no usable rows")),
    ("no config.json", {"model/tokenizer.json": "{}"}, {"model.path": "{d}/model"},
     ("no config.json in {d}/model",)),
    ("gpt2", {"gpt2/config.json": json.dumps({"model_type": "gpt2"})},
     {"model.path": "{d}/gpt2"}, ("model_type 'gpt2' is not supported", "llama, qwen2, qwen3")),
])
def test_bad_data_or_model_is_one_error_line(name, files, overrides, needles, tmp_path, capsys):
  del name
  for rel, text in files.items():
    _write(tmp_path / rel, text)
  fill = lambda s: s.format(d=tmp_path)
  cfg = tiny_config(**{k: fill(v) for k, v in overrides.items()})
  with pytest.raises(SystemExit) as exit_info:
    main_lib.run(cfg, str(tmp_path / "run"))
  assert exit_info.value.code == 2
  assert_one_error_line(capsys.readouterr().err, *map(fill, needles))


def test_resuming_with_another_model_shape_is_one_error_line(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  main_lib.run(tiny_config(**{"train.num_steps": 1, "checkpoint.async_save": False}), workdir)
  capsys.readouterr()
  wider = tiny_config(**{"train.num_steps": 2, "model.demo.intermediate_size": 96})
  with pytest.raises(SystemExit) as exit_info:
    main_lib.run(wider, workdir)
  assert exit_info.value.code == 2
  assert_one_error_line(capsys.readouterr().err, f"{workdir}/checkpoints/1",
                        "another model or optimizer config",
                        "params/layers/0/mlp/down has shape (96, 32) here and (64, 32)")


def test_skip_bad_rows_skips_and_reports_the_count(tmp_path, caplog):
  good = "".join(f'{{"prompt": "What is {i}+1?", "answer": "{i + 1}"}}\n' for i in range(8))
  path = _write(tmp_path / "rows.jsonl", good + "{oops\n" + '{"answer": "1"}\n' + ROW)
  cfg = tiny_config(**{"data.source": f"jsonl:{path}", "data.skip_bad_rows": True,
                       "data.num_eval_rows": 2})
  trainer = main_lib.Trainer(config_lib.freeze(cfg), str(tmp_path / "run"))
  assert len(trainer.parts.train_rows) + len(trainer.parts.eval_rows) == 9
  assert f"{path}: skipped 2 bad rows" in caplog.text


# -- numbers: non-finite updates are skipped, counted, and stop the run after a streak ------

OVERFLOW_CALLS = []  # the train steps (1, 2, ...) whose rewards overflow float32 sums
_calls = [0]


def overflow_reward(prompts, completions, **unused):
  """digit_reward, except on OVERFLOW_CALLS: rewards near float32's max, whose group sums
  are inf, so with scale_rewards="none" the advantages and gradients are not finite."""
  _calls[0] += 1
  if _calls[0] in OVERFLOW_CALLS:
    return [0.0 if i % 4 == 0 else 3e38 for i in range(len(completions))]
  return digit_reward(prompts, completions)


def test_nonfinite_updates_are_skipped_counted_and_a_streak_stops_the_run(tmp_path, capsys):
  workdir = str(tmp_path)
  OVERFLOW_CALLS[:] = [2, 4, 5]
  _calls[0] = 0
  over = {"rewards": "tests.test_reliability:overflow_reward", "grpo.scale_rewards": "none",
          "train.num_steps": 6, "train.max_nan_steps": 2, "checkpoint.every_steps": 1,
          "checkpoint.keep": 3, "eval.num_prompts": 0}
  with pytest.raises(SystemExit) as exit_info:
    main_lib.run(tiny_config(**over), workdir)
  assert exit_info.value.code == 2
  assert_one_error_line(capsys.readouterr().err, "step 5: 2 optimizer updates in a row",
                        "train.max_nan_steps=2", "last good checkpoint is step 3")
  records = {r["step"]: r for r in train_records(workdir)}
  assert sorted(records) == [1, 2, 3, 4, 5]
  counts = [(records[s]["train/nonfinite_updates"], records[s]["train/nonfinite_consecutive"])
            for s in range(1, 6)]
  assert counts == [(0, 0), (1, 1), (1, 0), (2, 1), (3, 2)]
  assert not np.isfinite(records[2]["train/grad_norm"])
  # Skipped steps are not checkpointed: the newest checkpoint is the last good step.
  assert checkpoint_steps(tmp_path) == [0, 1, 3]

  # A new run on the workdir resumes from step 3 with finite parameters.
  trainer = main_lib.Trainer(config_lib.freeze(tiny_config(**over)), workdir)
  assert trainer.restore() == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(trainer.state.params))
  assert [r["step"] for r in train_records(workdir)] == [1, 2, 3]


def test_a_broken_reference_is_counted_and_stops_the_run_naming_it(tmp_path):
  over = {"grpo.beta": 0.04, "train.num_steps": 4, "train.max_nan_steps": 2,
          "eval.num_prompts": 0, "rewards": "tests.test_reliability:digit_reward"}
  trainer = main_lib.Trainer(config_lib.freeze(tiny_config(**over)), str(tmp_path))
  # A reference checkpoint gone bad: one weight of pi_ref is NaN, the policy is intact.
  ref = trainer.state.ref_params
  ref["layers"][0]["mlp"]["down"].set_value(ref["layers"][0]["mlp"]["down"][...] * jnp.nan)
  with pytest.raises(UserError) as error:
    trainer.run()
  assert "\n" not in str(error.value)
  for words in ("step 2: 2 optimizer updates in a row", "reference policy's log-probs",
                "train.max_nan_steps=2", "last good checkpoint is step 0"):
    assert words in str(error.value), str(error.value)
  records = train_records(str(tmp_path))
  assert [(r["train/nonfinite_updates"], r["train/nonfinite_consecutive"]) for r in records] == [
      (1, 1), (2, 2)]
  assert all(r["train/nonfinite_ref_logps"] > 0 for r in records)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(trainer.state.params))


# -- reward code ------------------------------------------------------------------------------


def sleepy_reward(prompts, completions, **unused):
  time.sleep(3.0)
  return [1.0] * len(completions)


def test_a_reward_function_past_its_timeout_is_counted_and_the_run_goes_on(tmp_path):
  cfg = tiny_config(**{"rewards": "tests.test_reliability:sleepy_reward,format:1",
                       "rewards_timeout_s": 0.3, "eval.num_prompts": 0})
  main_lib.run(cfg, str(tmp_path))
  records = train_records(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert r["rl/reward_failures"] == 8  # B*G completions, all unscored by sleepy_reward
    assert np.isnan(r["rewards/tests.test_reliability:sleepy_reward"])
    assert np.isfinite(r["rewards/format"])


def children():
  """{pid: state} of this process's child processes ("Z": a zombie)."""
  out = {}
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, IndexError):
      continue  # gone meanwhile
    if int(ppid) == os.getpid():
      out[int(stat.parent.name)] = state
  return out


def cpu_ticks(pid):
  try:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  except OSError:
    return 0
  return int(fields[11]) + int(fields[12])  # utime + stime


RUNAWAY = r"\boxed{9^{9^{9^{9}}}}"  # sympy would compute this power for a very long time
killed_workers = []


def kill_the_busy_worker(idle_ticks, deadline_s=300.0):
  """SIGKILLs the child that has used half a second of CPU past `idle_ticks` (the runaway
  check: the others take milliseconds), as a crash on a hostile completion would end it."""
  deadline = time.monotonic() + deadline_s
  while time.monotonic() < deadline:
    for pid, ticks in idle_ticks.items():
      if cpu_ticks(pid) >= ticks + 50:
        os.kill(pid, signal.SIGKILL)
        killed_workers.append(pid)
        return
    time.sleep(0.01)


def accuracy_with_a_killed_checker(prompts, completions, **columns):
  """accuracy, with completion 0 made a runaway check whose math-verify child is killed."""
  idle_ticks = {pid: cpu_ticks(pid) for pid in children()}
  killer = threading.Thread(target=kill_the_busy_worker, args=(idle_ticks,))
  killer.start()
  try:
    return rewards.REGISTRY["accuracy"](prompts, [RUNAWAY] + completions[1:], **columns)
  finally:
    killer.join()


def test_a_killed_math_checker_is_a_counted_reward_failure_and_leaves_no_process(
    tmp_path, monkeypatch):
  before = children()
  pool = math_worker.Pool(1)  # one child: the runaway check is the one that gets killed
  monkeypatch.setattr(math_worker, "_POOL", pool)
  monkeypatch.setattr(accuracy_lib, "CHECK_TIMEOUT_S", 300.0)  # a bound, never reached
  assert pool.check_all([("2", "2")], 60.0) == [1.0]  # the child is up and idle
  cfg = tiny_config(**{"rewards": "tests.test_reliability:accuracy_with_a_killed_checker",
                       "rewards_timeout_s": 300.0, "train.num_steps": 1,
                       "eval.num_prompts": 0})
  main_lib.run(cfg, str(tmp_path))
  [record] = train_records(str(tmp_path))
  assert record["rl/reward_failures"] == 1  # the killed check; the step went on
  assert len(killed_workers) == 1 and killed_workers[0] not in children()  # waited for
  new = {pid: state for pid, state in children().items() if pid not in before}
  assert all(state != "Z" for state in new.values()), new
  pool.close()
  assert not set(children()) - set(before)


# -- safety: no pickle, no remote code, no evaluation of model text ---------------------------

FORBIDDEN = {
    "pickle": r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|joblib|shelve|marshal)\b",
    "torch.load": r"\btorch\.load\b",
    "np.load with pickles": r"allow_pickle\s*=\s*True",
    "remote code": r"trust_remote_code\s*=\s*(?!False\b)",
    "eval/exec/compile": r"(?<![\w.])(eval|exec|compile)\(",
}


def _package_sources():
  return sorted((REPO / "grpo_jax").rglob("*.py")) + sorted((REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_the_package_never_unpickles_trusts_remote_code_or_evaluates_text(what):
  pattern = re.compile(FORBIDDEN[what])
  hits = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in _package_sources()
          for n, line in enumerate(path.read_text().splitlines(), start=1)
          if pattern.search(line.split("#")[0])]
  assert not hits, hits


def test_math_checking_runs_only_in_killable_child_processes():
  importers = [path.relative_to(REPO).as_posix() for path in _package_sources()
               if re.search(r"^\s*(import|from)\s+math_verify", path.read_text(), re.M)]
  assert importers == ["grpo_jax/rewards/math_worker.py"]
