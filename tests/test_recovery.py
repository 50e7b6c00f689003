"""Faults that cost work, and how a run gets it back: a damaged checkpoint, a full disk, an
unwritable workdir, a slice with another number of devices.

Each test reproduces the fault and checks that the run ends with the metrics of a run that
never met it. (A lost process: test_multiprocess.py; a killed reward checker:
test_reliability.py.)
"""

import math

import pytest

from grpo_jax import config as config_lib
from grpo_jax import main as main_lib
from tests.test_checkpoint import _damage, fill, make_read_only, small_disk
from tests.test_mesh import OVERRIDES
from tests.test_reliability import COMPARED, assert_one_error_line, cli_args, cli_overrides
from tests.test_reliability import run_cli
from tests.test_train import tiny_config, train_records


def resume_config(num_steps, **overrides):
  """A tiny run whose numbers do not depend on train.num_steps (constant learning rate)."""
  return tiny_config(**{"train.lr_schedule": "constant", "grpo.beta": 0.04,
                        "eval.num_prompts": 0, "train.num_steps": num_steps,
                        "checkpoint.every_steps": 2, "checkpoint.keep": 3, **overrides})


def assert_same_train_records(workdir, straight, *, exact=True):
  got, want = train_records(workdir), train_records(straight)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for a, b in zip(got, want):
    for key in COMPARED:
      if exact:
        assert a[key] == b[key], (a["step"], key, a[key], b[key])
      else:  # another mesh: float reductions in another order
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path):
  """The issue's user: checkpoints at steps 0, 2 and 4, a data file of checkpoint 4 cut to
  half its size, the same command again with more steps. It resumes from 2 with one
  warning, keeps checkpoint 4 aside, and ends with the metrics of a run never damaged.
  When no checkpoint reads back, it is one error line, exit 2, and nothing is moved."""
  straight, workdir = tmp_path / "straight", tmp_path / "run"
  command = lambda d, steps: cli_args(d, *cli_overrides(resume_config(
      steps, **{"checkpoint.async_save": True})))
  for directory, steps in ((straight, 6), (workdir, 4)):
    result = run_cli(*command(directory, steps))
    assert result.returncode == 0, result.stderr
  checkpoints = workdir / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["0", "2", "4"]
  _damage(checkpoints / "4", "truncated data file")

  result = run_cli(*command(workdir, 6))
  assert result.returncode == 0, result.stderr
  assert f"resumed from {workdir}/checkpoints/2" in result.stdout
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  warnings = [line for line in result.stderr.splitlines() if "read back" in line]
  assert len(warnings) == 1, result.stderr
  assert f"checkpoint 4 in {checkpoints} does not read back as written (OUT_OF_RANGE" in (
      warnings[0])
  assert warnings[0].endswith("moved aside to 4.corrupt; resuming from step 2")
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "4.corrupt", "6"]
  assert_same_train_records(workdir, straight)

  for step in ("2", "4", "6"):
    _damage(checkpoints / step, "truncated data file")
  result = run_cli(*command(workdir, 8))
  assert result.returncode == 2
  assert_one_error_line(result.stderr, f"no checkpoint in {checkpoints} reads back as written "
                        "(steps 6, 4, 2; step 6: OUT_OF_RANGE", "nothing was moved")
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "4.corrupt", "6"]


def test_a_full_disk_stops_the_run_with_one_line_and_loses_nothing(tmp_path, capsys):
  """Checkpoints 0 and 2 on a small disk, then the disk fills: the run to step 4 stops at
  its checkpoint with one error line naming the directory and the bytes it needs, exit 2,
  checkpoint 2 untouched. With room again, the same command resumes from step 2 and ends
  with the metrics of a run on a roomy disk."""
  straight = tmp_path / "straight"
  main_lib.run(resume_config(4), str(straight))
  with small_disk(tmp_path / "disk", 8 << 20) as disk:
    workdir = disk / "run"
    main_lib.run(resume_config(2), str(workdir))
    fill(disk, 64 << 10)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
      main_lib.run(resume_config(4), str(workdir))
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err,
                          f"cannot write checkpoint 4 to {workdir}/checkpoints: not enough "
                          "free space; it needs about", "(newest: step 2)")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0", "2"]
    (disk / "filler").unlink()
    main_lib.run(resume_config(4), str(workdir))
    assert f"resumed from {workdir}/checkpoints/2" in capsys.readouterr().out
    assert_same_train_records(workdir, straight)


def test_an_unwritable_workdir_is_one_error_line_before_any_model_loads(tmp_path, capsys):
  # A model.path that cannot load: had the model come first, the error would name it.
  cfg = tiny_config(**{"model.path": str(tmp_path / "no-model")})
  with small_disk(tmp_path / "disk", 1 << 20) as disk:
    make_read_only(disk)
    with pytest.raises(SystemExit) as exit_info:
      main_lib.run(cfg, str(disk / "run"))
  assert exit_info.value.code == 2
  assert_one_error_line(capsys.readouterr().err, f"--workdir={disk}/run is not writable "
                        "(Read-only file system)")


def test_a_run_moved_to_fewer_devices_and_back_has_the_metrics_of_one_that_never_moved(
    tmp_path, capsys):
  """Checkpointed on 8 of the fake devices, resumed on 4 (another mesh shape too), then on
  8 again: the data position and the random stream go on, and the metrics are those of a
  run that never moved, to float tolerance (the reductions run in another order)."""

  def run(shape, num_steps, workdir):
    cfg = tiny_config(**{**OVERRIDES, "mesh.shape": shape, "train.num_steps": num_steps,
                         "train.lr_schedule": "constant"})
    frozen = config_lib.freeze(cfg, num_devices=math.prod(shape))
    main_lib.Trainer(frozen, str(workdir)).run()

  straight, workdir = tmp_path / "straight", tmp_path / "moved"
  run((2, 2, 2), 6, straight)
  capsys.readouterr()
  for shape, num_steps in (((2, 2, 2), 2), ((1, 4, 1), 4), ((1, 8, 1), 6)):
    run(shape, num_steps, workdir)
  out = capsys.readouterr().out
  assert f"resumed from {workdir}/checkpoints/2" in out  # on 4 devices
  assert f"resumed from {workdir}/checkpoints/4" in out  # on 8 again
  assert_same_train_records(workdir, straight, exact=False)
