"""The experiment runner: a real sweep of configs/tiny.py (ce and kd_nst x 2 seeds, one shared teacher,
2 jobs) killed with SIGKILL mid-run, rerun to the end and rerun again (the session's `tiny_sweep`
fixture, tests/conftest.py, which the viz and seeds tests read too); the tables against NumPy on the
runs' own results.json; bad input.
"""

import csv
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from nst_jax.tools import sweep
from nst_jax.trainer import rundir

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Methods ce and kd on digits at 8 px, one epoch; kd's teacher is this file's own `:ce` run. The tests
# without training plan it and read its REFERENCE; the trained tests read the session's configs/tiny.py sweep.
CONFIG = '''"""A tiny digits sweep for tests."""

import pathlib

from configs import _common

METHODS = ("ce", "kd")
REFERENCE = {"kd": (50.0, "a made-up number"), "teacher": (40.0, "made up too")}


def get_config(method: str = "kd"):
  config = _common.base()
  config.student.model = "resnet8"
  config.data.image_size = 8
  config.schedule.epochs = 1
  config.schedule.decay_epochs = ()
  config.logging.log_every_steps = 11
  config.logging.tensorboard = False  # importing TensorFlow costs seconds per run
  if method == "kd":
    config.distill.kd_weight = 1.0
    config.teacher.model = "resnet8"
    config.teacher.config = f"{pathlib.Path(__file__).resolve()}:ce"
  return config
'''
RUNS = [(m, k) for k in (0, 1) for m in ("ce", "kd_nst")]


def _results(root, method, seed):
  return json.loads((root / method / f"seed{seed}" / "results.json").read_text())


@pytest.fixture(scope="module")
def swept(tiny_sweep):
  """The session's sweep (tests/conftest.py): configs/tiny.py, methods ce and kd_nst, seeds 0 and 1."""
  assert (tiny_sweep.methods, tiny_sweep.seeds) == (("ce", "kd_nst"), (0, 1))
  return {"config": tiny_sweep.config, "overrides": list(tiny_sweep.overrides), "root": tiny_sweep.root,
          "killed": tiny_sweep.killed, "resumed_out": tiny_sweep.resumed_out,
          "rerun_out": tiny_sweep.rerun_out, "mtimes": tiny_sweep.mtimes}


def test_layout_and_what_each_run_was_given(swept):
  root = swept["root"]
  spec = json.loads((root / "sweep.json").read_text())
  assert spec == {"config": str(swept["config"]), "methods": ["ce", "kd_nst"], "seeds": [0, 1],
                  "overrides": swept["overrides"]}
  for name in ("results.csv", "results.md", "curves.png"):
    assert (root / name).is_file(), name
  assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["ce", "kd_nst", "teacher"]
  for method, seed in RUNS:
    workdir = root / method / f"seed{seed}"
    assert _results(root, method, seed)["finished"] is True
    assert (workdir / "curves.png").is_file() and (workdir / "run.json").is_file()
    config = json.loads((workdir / "config.json").read_text())
    assert config["seed"] == seed and config["logging"]["keep_checkpoints"] == 2  # the override
    if method == "kd_nst":
      assert config["teacher"]["workdir"] == str(root / "teacher")
    else:
      assert config["teacher"]["model"] == ""
  assert json.loads((root / "teacher" / "results.json").read_text())["finished"] is True


def test_teacher_trained_once_and_shared(swept):
  root = swept["root"]
  stages = {run: [s["name"] for s in json.loads((root / run[0] / f"seed{run[1]}" / "run.json").read_text())
                  ["stages"]] for run in RUNS}
  assert sum("teacher" in names for names in stages.values()) == 1, stages
  assert stages[("kd_nst", 1)] == ["student"] and stages[("ce", 0)] == ["student"]
  teacher = json.loads((root / "teacher" / "results.json").read_text())
  for seed in (0, 1):  # Both kd_nst runs measured the one teacher run: its final accuracy.
    assert _results(root, "kd_nst", seed)["teacher"]["top1"] == pytest.approx(teacher["last_top1"])


def test_sigkill_mid_run_then_the_same_command_resumes(swept):
  killed = swept["killed"]
  assert killed["steps"] and not killed["finished"], killed  # The kill hit the first run mid-run.
  log = (swept["root"] / "ce" / "seed0" / "log.txt").read_text()
  assert "resumed from step" in log
  assert _results(swept["root"], "ce", 0)["epochs"][-1]["epoch"] == 1
  out = swept["resumed_out"]
  assert "run 1 of 4" in out and "run 4 of 4" in out and "ETA" in out


def test_finished_runs_are_skipped(swept):
  root, out = swept["root"], swept["rerun_out"]
  assert out.count("finished before: skipped") == 4 and "started" not in out
  for run, mtime in swept["mtimes"].items():
    assert (root / run[0] / f"seed{run[1]}" / "results.json").stat().st_mtime == mtime


def test_csv_means_and_stds_against_numpy(swept):
  root = swept["root"]
  rows = {r["method"]: r for r in csv.DictReader((root / "results.csv").open())}
  assert list(rows) == ["ce", "kd_nst", "teacher"]
  for method in ("ce", "kd_nst"):
    results = [_results(root, method, k) for k in (0, 1)]
    row = rows[method]
    assert row["n"] == "2" and row["n_planned"] == "2" and row["seeds"] == "0 1"
    for metric in ("last_top1", "best_top1", "last_top5", "best_top5"):
      values = np.array([r[metric] for r in results])
      assert float(row[f"{metric}_mean"]) == pytest.approx(values.mean(), abs=1e-6)
      std = np.sqrt(((values - values.mean()) ** 2).sum() / (len(values) - 1))  # sample std, by hand
      assert float(row[f"{metric}_std"]) == pytest.approx(std, abs=1e-6)
  assert float(rows["kd_nst"]["teacher_top1"]) == pytest.approx(
      _results(root, "kd_nst", 0)["teacher"]["top1"])
  assert rows["ce"]["teacher_top1"] == "" and rows["ce"]["reference"] == ""
  assert rows["kd_nst"]["reference"] == "" and rows["kd_nst"]["source"] == ""  # tiny.py quotes none
  teacher = json.loads((root / "teacher" / "results.json").read_text())
  assert float(rows["teacher"]["last_top1_mean"]) == pytest.approx(teacher["last_top1"], abs=1e-6)
  assert rows["teacher"]["last_top1_std"] == "" and rows["teacher"]["reference"] == ""
  md = (root / "results.md").read_text()
  ce = [_results(root, "ce", k)["last_top1"] for k in (0, 1)]
  assert f"| ce | 2 | {np.mean(ce):.2f} ± {np.std(ce, ddof=1):.2f} |" in md


def test_curves_are_pictures(swept):
  for path, size in ((swept["root"] / "curves.png", (1280, 840)),
                     (swept["root"] / "kd_nst" / "seed1" / "curves.png", (2000, 800))):
    image = np.asarray(Image.open(path).convert("L"), np.float32)
    assert image.shape[::-1] == size, path
    assert image.std() > 10.0, path  # not a blank canvas: axes, text and lines


def test_report_rebuilds_tables_from_what_exists(swept, capsys):
  root = swept["root"]
  before = (root / "results.csv").read_text()
  for name in ("results.csv", "results.md", "curves.png"):
    (root / name).unlink()
  assert sweep.main(["--report", "--root", str(root)]) == 0
  assert (root / "results.csv").read_text() == before
  assert (root / "curves.png").is_file() and "| kd_nst | 2 |" in capsys.readouterr().out


def test_report_reads_the_runs_and_exports_them_without_checkpoints(swept, tmp_path):
  root, dest = swept["root"], tmp_path / "export"
  comparisons = list(csv.DictReader(open(root / "comparisons.csv")))
  assert [(r["method"], r["against"], r["n"]) for r in comparisons] == [("kd_nst", "ce", "2")]
  last = {m: [_results(root, m, k)["last_top1"] for k in (0, 1)] for m in ("ce", "kd_nst")}
  assert float(comparisons[0]["difference"]) == pytest.approx(
      np.mean(last["kd_nst"]) - np.mean(last["ce"]), abs=1e-5)
  terms = {(r["method"], r["term"]): r for r in csv.DictReader(open(root / "terms.csv"))}
  assert set(terms) == {("ce", "ce"), ("kd_nst", "ce"), ("kd_nst", "kd"), ("kd_nst", "nst")}
  kd = [_results(root, "kd_nst", k)["epochs"][-1]["train"] for k in (0, 1)]
  for term in ("kd", "nst"):
    assert float(terms["kd_nst", term]["end"]) == pytest.approx(
        np.mean([t[f"train_{term}_loss"] for t in kd]), rel=1e-5)
  assert sweep.main(["--report", "--root", str(root), "--export", str(dest)]) == 0
  assert not list(dest.rglob("checkpoints")) and (dest / "teacher" / "results.json").is_file()
  def strings(value):
    if isinstance(value, dict):
      value = list(value.values())
    return [s for v in value for s in strings(v)] if isinstance(value, list) else [value]
  for path in dest.rglob("*.json"):  # no absolute path of this machine, flags' values included
    assert not [s for s in strings(json.loads(path.read_text()))
                if isinstance(s, str) and os.path.isabs(s.rpartition("=")[2])], path
  assert json.loads((dest / "kd_nst" / "seed1" / "results.json").read_text()) == _results(root, "kd_nst", 1)


# Without training: tables from hand-written results, the plan, bad input.


def _fake_root(tmp_path, finished):
  """A sweep root of `method -> {seed: last_top1}` with hand-written results.json files."""
  root = tmp_path / "root"
  root.mkdir()
  (root / "sweep.json").write_text(json.dumps({"config": "configs/none.py", "methods": list(finished),
                                               "seeds": [0, 1, 2], "overrides": []}))
  for method, runs in finished.items():
    for seed, top1 in runs.items():
      workdir = root / method / f"seed{seed}"
      workdir.mkdir(parents=True)
      epochs = [{"epoch": 1, "top1": top1 - 5, "top5": 90.0}, {"epoch": 2, "top1": top1, "top5": 95.0}]
      (workdir / "results.json").write_text(json.dumps(
          {"finished": True, "last_top1": top1, "last_top5": 95.0, "best_top1": top1, "best_epoch": 2,
           "epochs": epochs}))  # no best_top5, no "train": an older results.json
  (root / "kd" / "seed2").mkdir()  # an unfinished run: a folder without results.json
  return root


def test_fewer_finished_runs_than_seeds_is_said(tmp_path):
  root = _fake_root(tmp_path, {"ce": {0: 60.0, 1: 62.0, 2: 67.0}, "kd": {0: 70.0}})
  rows = {r["method"]: r for r in sweep.report(str(root))}
  assert rows["ce"]["n"] == 3 and rows["ce"]["last_top1_mean"] == pytest.approx(63.0)
  assert rows["ce"]["last_top1_std"] == pytest.approx(np.sqrt((9 + 1 + 16) / 2))
  assert rows["kd"]["n"] == 1 and rows["kd"]["last_top1_std"] is None
  assert rows["kd"]["best_top5_mean"] == 95.0  # the best over the epochs when results.json has no best_top5
  md = (root / "results.md").read_text()
  assert "| kd | 1 of 3 | 70.00 |" in md and "| ce | 3 | 63.00 ± 3.61 |" in md


def test_reference_columns_are_the_configs_REFERENCE(tmp_path):
  (tmp_path / "tiny.py").write_text(CONFIG)  # REFERENCE: kd 50.0 and the teacher 40.0, made up
  root = _fake_root(tmp_path, {"ce": {0: 60.0}, "kd": {0: 70.0, 1: 72.0}})
  spec = json.loads((root / "sweep.json").read_text())
  (root / "sweep.json").write_text(json.dumps({**spec, "config": str(tmp_path / "tiny.py")}))
  shutil.copytree(root / "ce" / "seed0", root / "teacher")
  sweep.report(str(root))
  rows = {r["method"]: r for r in csv.DictReader((root / "results.csv").open())}
  assert (float(rows["kd"]["reference"]), rows["kd"]["source"]) == (50.0, "a made-up number")
  assert rows["ce"]["reference"] == "" and rows["ce"]["source"] == ""
  assert (rows["teacher"]["reference"], rows["teacher"]["source"]) == ("40.000000", "made up too")
  assert rows["teacher"]["last_top1_std"] == ""


def test_plan_goes_seed_by_seed_and_shares_the_teacher(tmp_path):
  (tmp_path / "tiny.py").write_text(CONFIG)
  module = sweep.load_config_module(str(tmp_path / "tiny.py"))
  spec = {"config": "x/tiny.py", "methods": ["kd", "ce"], "seeds": [3, 5], "overrides": ["--config.a=1"],
          "root": "r"}
  runs = sweep.plan(spec, module)
  assert [(r.method, r.seed, r.workdir, r.distils) for r in runs] == [
      ("kd", 3, "r/kd/seed3", True), ("ce", 3, "r/ce/seed3", False),
      ("kd", 5, "r/kd/seed5", True), ("ce", 5, "r/ce/seed5", False)]
  assert sweep.run_command(spec, runs[0], module)[3:] == [
      "--config", "x/tiny.py:kd", "--workdir", "r/kd/seed3", "--config.seed=3",
      f"--config.teacher.workdir={os.path.abspath('r/teacher')}", "--config.a=1"]
  assert sweep.run_command(spec, runs[1], module)[3:] == [
      "--config", "x/tiny.py:ce", "--workdir", "r/ce/seed3", "--config.seed=3", "--config.a=1"]


def test_references_of_configs_with_and_without_methods():
  teacher = sweep.load_config_module("configs/cifar100_resnet32x4.py")
  assert sweep.config_methods(teacher) == ("cifar100_resnet32x4",)
  assert sweep.references(teacher)["cifar100_resnet32x4"][0] == 79.42
  pair = sweep.references(sweep.load_config_module("configs/cifar100_resnet32x4_to_resnet8x4.py"))
  assert pair["kd"][0] == 73.33 and pair["teacher"][0] == 79.42 and "kd_nst" not in pair


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nope.py", "--seeds", "0"],
     "Config file 'configs/nope.py' does not exist (looked in "),
    (["--config", "configs/_common.py", "--seeds", "0"], "configs/_common.py' is not a config file"),
    (["--config", "configs/cifar10_folder.py", "--methods", "kd,bogus"],
     "Unknown method(s) bogus. Valid methods: kd_nst, kd, nst, ce."),
    (["--config", "configs/cifar10_folder.py"], "--methods is required for this config. Valid methods: "),
    (["--config", "configs/cifar10_folder.py", "--methods", "kd", "--seeds", "0,one"],
     "--seeds must be comma-separated integers >= 0"),
    (["--config", "configs/cifar10_folder.py:kd", "--methods", "kd"], "give the config file alone"),
    (["--config", "configs/cifar10_folder.py", "--methods", "kd", "--config.seed=3"], "--seeds sets"),
    (["--config", "configs/cifar10_folder.py", "--methods", "kd", "--config.schedule.epoch=3"],
     "Unknown config key 'schedule.epoch'"),
    (["--config", "configs/cifar10_folder.py", "--methods", "kd", "--config.schedule.epochs", "3"],
     "written --config.KEY=VALUE"),
    (["--config", "configs/cifar10_folder.py", "--methods", "kd", "--jobs", "0"], "--jobs must be"),
    (["--report"], "is not a sweep root"),
])
def test_bad_input_is_one_line_naming_the_choices(args, message, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert sweep.main([*args, "--root", str(tmp_path / "root")]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1, err
  assert not (tmp_path / "root" / "sweep.json").exists()


def test_changed_overrides_on_an_existing_root_are_refused(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  root = tmp_path / "root"
  sweep.update_spec(str(root), "configs/cifar10_folder.py", ["kd"], [0], ["--config.schedule.epochs=2"])
  args = ["--config", "configs/cifar10_folder.py", "--methods", "kd", "--root", str(root),
          "--config.schedule.epochs=3"]
  assert sweep.main(args) == 2
  assert "Use another --root, or the same config and overrides." in capsys.readouterr().err


def _tiny_spec(tmp_path, **extra):
  (tmp_path / "tiny.py").write_text(CONFIG)
  module = sweep.load_config_module(str(tmp_path / "tiny.py"))
  spec = {"config": str(tmp_path / "tiny.py"), "methods": ["ce", "kd"], "seeds": [0], "overrides": [],
          "root": str(tmp_path / "root"), **extra}
  return spec, module


def test_a_run_still_running_is_not_started_twice(tmp_path):
  spec, module = _tiny_spec(tmp_path)
  workdir = tmp_path / "root" / "ce" / "seed0"
  held = rundir.lock(workdir)  # the run lock, as an orphaned run of a killed sweep holds it
  try:
    busy = rf"The run in {workdir} is still running \(pid {os.getpid()} "
    with pytest.raises(sweep.SweepError, match=busy):
      sweep._Runner(spec, module, sweep.plan(spec, module), jobs=1)
    root_held = rundir.lock(tmp_path / "other_root", what="sweep")  # a second sweep of one root
    with pytest.raises(sweep.SweepError, match="is in use by another sweep"):
      sweep.sweep(spec["config"], "ce", "0", str(tmp_path / "other_root"), 1, [])
    root_held.release()
  finally:
    held.release()


def _finished_run(workdir, model, epochs=1, batch=64, log=""):
  workdir.mkdir(parents=True)
  rundir.write_json(workdir / rundir.CONFIG, {"student": {"model": model}, "seed": 0,
                                              "schedule": {"epochs": epochs, "batch_size": batch}})
  rundir.write_json(workdir / rundir.RESULTS, {"finished": True, "last_top1": 50.0})
  (workdir / "log.txt").write_text(log)


def test_teacher_workdir_must_be_a_finished_run_of_the_teacher_model(tmp_path):
  _, module = _tiny_spec(tmp_path)
  good, other = tmp_path / "good_teacher", tmp_path / "wrong_model"
  _finished_run(good, "resnet8")
  _finished_run(other, "resnet20")
  assert sweep.check_teacher_workdir(str(good), module, ["kd"]) == str(good)
  with pytest.raises(sweep.SweepError, match="trained 'resnet20', but the config's teacher model is resnet8"):
    sweep.check_teacher_workdir(str(other), module, ["kd"])
  with pytest.raises(sweep.SweepError, match="is not a finished run"):
    sweep.check_teacher_workdir(str(tmp_path / "none"), module, ["kd"])
  spec, _ = _tiny_spec(tmp_path, teacher_workdir=str(good))
  kd = next(r for r in sweep.plan(spec, module) if r.method == "kd")
  assert f"--config.teacher.workdir={good}" in sweep.run_command(spec, kd, module)
  # It is only read: the distilling run may start at once, as no teacher stage is to come.
  assert sweep._Runner(spec, module, [kd], jobs=1)._teacher_left() == (0.0, "")


def test_eta_counts_the_teacher_stage(tmp_path, capsys):
  spec, module = _tiny_spec(tmp_path)
  runs = sweep.plan(spec, module)  # ce, and kd (distils: trains <root>/teacher first)
  # A finished ce run measured 20 steps per epoch at 4 steps/s; its own stage took 60 s.
  ce = pathlib.Path(next(r.workdir for r in runs if r.method == "ce"))
  _finished_run(ce, "resnet8", log="data: digits (device pipeline), 20 steps per epoch, 10 classes\n"
                                   "step 20/20 (4.00 steps/s, ETA 0.0 min): train_loss=1\n")
  rundir.write_json(ce / rundir.RUN, {"stages": [{"name": "student", "wall_s": 60.0}]})
  runner = sweep._Runner(spec, module, runs, jobs=1)
  # The teacher config (tiny.py:ce) trains 1 epoch at batch 128 (the student's batch too): 20 steps at the
  # measured 4 steps/s is 5 s, plus one run of 60 s left.
  teacher_config = sweep.config_lib.load_config_file(f"{spec['config']}:ce")
  steps = teacher_config.schedule.epochs * 20 * module.get_config("kd").schedule.batch_size \
      / teacher_config.schedule.batch_size
  assert runner._teacher_left() == (pytest.approx(steps / 4.0), "1 epochs at a student's step rate")
  assert runner._eta() == (f"ETA {(60 + steps / 4.0) / 60:.1f} min (runs take 1.0 min, the teacher stage "
                           f"{steps / 4.0 / 60:.1f} min more (1 epochs at a student's step rate))")
  # Once the teacher trains, its own log gives its rate: 30 of 100 steps done at 2 steps/s.
  teacher = pathlib.Path(sweep.teacher_dir(spec))
  teacher.mkdir(parents=True)
  (teacher / "log.txt").write_text("step 30/100 (2.00 steps/s, ETA 0.6 min): train_loss=1\n")
  assert runner._teacher_left() == (35.0, "its own step rate")
