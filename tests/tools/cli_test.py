"""The command line (nst_jax/tools/cli.py): --help, one-line errors for everything a user can fix (config,
overrides, the batch against the device count, folders that cannot be written, a full disk), a relative
--config found from anywhere, and a finished run that is not trained again."""

import errno
import json
import os
import pathlib
import subprocess
import sys

import pytest

from nst_jax.tools import cli
from nst_jax.trainer import config_lib, rundir

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--config.schedule.epochs=1", "--config.schedule.batch_size=64", "--config.logging.tensorboard=False",
        "--config.student.model=resnet8", "--config.data.image_size=8"]


def _exit_line(capsys, argv) -> tuple[int | str, str]:
  """(exit status, what the command printed) of `cli.main(argv)` in this process (8 fake devices)."""
  with pytest.raises(SystemExit) as info:
    cli.main(argv)
  captured = capsys.readouterr()
  code = info.value.code
  if isinstance(code, str):  # sys.exit("message"): status 1, the message on stderr
    return 1, code
  return code, captured.out + captured.err


def test_help_shows_flags_overrides_and_examples_and_exits_0():
  done = subprocess.run([sys.executable, "-m", "nst_jax", "--help"], capture_output=True, text=True,
                        cwd="/", timeout=120, env={**os.environ, "COLUMNS": "110"})
  assert done.returncode == 0, done.stderr
  for text in ("--config PATH[:METHOD]", "--workdir DIR", "--config.KEY=VALUE", "--coordinator_address",
               "--num_processes", "--process_id", "--distributed",
               "nst-jax-train --config configs/digits_kd_nst.py --workdir workdirs/digits_kd_nst"):
    assert text in done.stdout, text
  assert done.stdout.count("\n  nst-jax-train --config") == 2  # two examples


@pytest.mark.parametrize("argv, line", [
    (["--workdir", "w"], "nst_jax: bad command line: the following arguments are required: --config."),
    (["--config", "configs/digits.py", "--workdir", "w", "--config.optim.lr_typo=1"],
     "nst_jax: bad command line: unknown config key 'optim.lr_typo'."),
    (["--config", "configs/digits.py", "--workdir", "w", "--config.schedule.epochs=two"],
     "nst_jax: bad command line: config.schedule.epochs: expected a value of type int, got 'two'."),
    (["--config", "configs/digits.py", "--workdir", "w", "stray"],
     "nst_jax: bad command line: Unexpected argument 'stray'; config overrides are written "
     "--config.KEY=VALUE."),
    (["--config", "configs/digits_kd_nst.py:nts", "--workdir", "w"],
     "nst_jax: Config file 'configs/digits_kd_nst.py':nts: Unknown method 'nts'. Valid methods: kd_nst, kd"),
    (["--config", "configs/no_such.py", "--workdir", "w"],
     "nst_jax: Config file 'configs/no_such.py' does not exist (looked in "),
])
def test_command_line_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, line):
  monkeypatch.chdir(tmp_path)  # not the repository: relative config paths are found there
  code, out = _exit_line(capsys, argv)
  assert code == 1 and out.startswith(line) and "\n" not in out.strip(), out
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override, line", [
    # 60 on this session's 8 devices: before any data is read or model built.
    ("--config.schedule.batch_size=60",
     "nst_jax: The global batch size 60 does not divide by the 8 devices; use a multiple of 8"),
    ("--config.data.name=digts", "config.data.name: unknown value 'digts'. Valid values: digits, "),
    ("--config.data.name=digts", "Did you mean: digits?"),
    ("--config.data.pipeline=devise", "Did you mean: device?"),
    ("--config.data.augment=cifr", "Did you mean: cifar?"),
    ("--config.dtype=bfloat61", "Did you mean: bfloat16"),
    ("--config.parallel=pamp", "Did you mean: pmap?"),
])
def test_config_checks_come_before_start_up_with_did_you_mean(capsys, tmp_path, override, line):
  argv = ["--config", "configs/digits.py", "--workdir", str(tmp_path / "w"), override]
  code, out = _exit_line(capsys, argv)
  assert code == 1 and line in out and "\n" not in out.strip(), out
  assert not (tmp_path / "w").exists()


def test_a_workdir_that_cannot_be_made_is_one_line_naming_it(capsys, tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a folder")
  code, out = _exit_line(capsys, ["--config", "configs/digits.py", "--workdir", str(afile / "run"), *TINY])
  assert code == 1 and "\n" not in out.strip(), out
  assert out == (f"nst_jax: cannot use {afile} (the workdir, --workdir): Not a directory [ENOTDIR]; a file "
                 "stands where a folder is needed: move the file or choose another path.")


def test_an_unwritable_teacher_folder_names_the_teacher_not_the_workdir(capsys, tmp_path, monkeypatch):
  teacher = tmp_path / "locked" / "teacher"
  real_access = os.access
  # The tests run as root, whom permissions never stop: the folder is made unwritable for os.access.
  monkeypatch.setattr(rundir.os, "access", lambda p, mode: real_access(p, mode) and
                      not str(p).startswith(str(tmp_path / "locked")))
  (tmp_path / "locked").mkdir()
  code, out = _exit_line(capsys, [
      "--config", "configs/digits_kd_nst.py", "--workdir", str(tmp_path / "student"),
      f"--config.teacher.workdir={teacher}", *TINY[:3]])
  assert code == 1, out
  assert out.startswith(f"nst_jax: cannot use {tmp_path / 'locked'} (the teacher's workdir, "
                        "config.teacher.workdir): Permission denied [EACCES]; no permission to write there")
  assert not (tmp_path / "student").exists()


def test_a_full_disk_is_one_line_and_leaves_no_workdir(capsys, tmp_path, monkeypatch):
  real_open = open

  def full_disk_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    if "w" in mode and str(path).startswith(str(tmp_path)):
      def write(_):
        raise OSError(errno.ENOSPC, "No space left on device")
      f.write = write
    return f

  monkeypatch.setattr(rundir, "open", full_disk_open, raising=False)  # the run's own files (config.json)
  workdir = tmp_path / "run"
  code, out = _exit_line(capsys, ["--config", "configs/digits.py", "--workdir", str(workdir), *TINY])
  assert code == 1, out
  assert out == (f"nst_jax: cannot use {workdir / 'config.json'} (the workdir, --workdir): No space left on "
                 "device [ENOSPC]; the disk is full: free space there (old workdirs, caches) or use a folder "
                 "on another disk; a run resumes from its last checkpoint.")
  assert not workdir.exists()  # it never started: no half-made workdir


def test_a_finished_run_says_so_and_builds_nothing(capsys, tmp_path, monkeypatch):
  from nst_jax.trainer import train_loop

  workdir = tmp_path / "run"
  config = cli.load_config("configs/digits.py", TINY)[0]
  workdir.mkdir()
  rundir.write_json(workdir / rundir.CONFIG,
                    json.loads(config_lib.resolve_paths(config, str(workdir)).to_json_best_effort()))
  rundir.write_json(workdir / rundir.RESULTS, {"finished": True, "last_top1": 91.25, "best_top1": 93.5,
                                               "best_epoch": 1, "epochs": []})
  monkeypatch.setattr(train_loop, "_build", lambda *a: pytest.fail("built something"))
  monkeypatch.setattr(train_loop.logger, "handlers", [])  # a console handler on this test's stdout
  assert cli.main(["--config", "configs/digits.py", "--workdir", str(workdir), *TINY]) == 0
  out = capsys.readouterr().out
  assert out.strip() == (f"already finished: last top-1 91.25%, best 93.50% (epoch 1); results in "
                         f"{workdir / 'results.json'}. Nothing to train (a new --workdir trains again).")


def test_a_relative_config_is_found_from_the_repository(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config, teacher = cli.load_config("configs/digits_kd_nst.py:kd", ["--config.data.image_size=8",
                                                                    "--config.optim.momentum=0.5"])
  assert config.distill.kd_weight > 0 and config.data.image_size == 8
  assert teacher == {"data.image_size": 8}  # TEACHER_KEYS only
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "digits_kd_nst.py").write_text(
      "from configs import digits_kd_nst as d\n\ndef get_config(m='kd_nst'):\n  c = d.get_config(m)\n"
      "  c.seed = 5\n  return c\n")
  assert cli.load_config("configs/digits_kd_nst.py", [])[0].seed == 5  # the current directory's first
