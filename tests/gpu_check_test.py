"""Tests for bench/gpu_check.py: its CPU dry run goes through every stage and writes what the GPU run writes.

The dry run is the GPU run's code path at tiny sizes (resnet8 models, a few steps, one epoch on a
synthetic 10-class JPEG folder made here), each stage in its own process as on the GPU machine. The
checks read the files back and compare what they can with independent facts: the data's split sizes,
the stages and configurations asked for, the output limits of the device tool.
"""

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PER_CLASS, HELD_OUT = 8, 2  # The dry run holds out 2 per class and trains on the first 6 of the rest.


def load_kit():
  spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def image_folder(root: pathlib.Path):
  image = pytest.importorskip("PIL.Image")
  rng = np.random.default_rng(0)
  for c in range(10):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(PER_CLASS):
      pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      image.fromarray(pixels).save(root / f"class{c}" / f"{i:04d}.jpg")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  data, out = tmp_path_factory.mktemp("data") / "train", tmp_path_factory.mktemp("out")
  image_folder(data)
  proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out), "--data",
                         str(data)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  return proc, out


@pytest.mark.slow  # the dry run trains, in one process per stage
def test_every_stage_succeeds_and_is_summarised(dry_run):
  proc, out = dry_run
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = (out / "summary.txt").read_text()
  kit = load_kit()
  for name in ["tests", "losses", "train"] + [f"step {d} {b}" for d, b, _ in kit.DRY_RUN.step_configs]:
    assert re.search(rf"^{re.escape(name)}\s+ok\s", summary, re.M), (name, summary)


@pytest.mark.slow
def test_outputs_fit_what_the_device_tool_brings_back(dry_run):
  # At most 8 files, none in subfolders, each well under 16 MiB.
  _, out = dry_run
  files = sorted(p.name for p in out.iterdir())
  assert files == ["env.txt", "losses.txt", "results.json", "step.txt", "summary.txt", "tests.txt",
                   "train.txt"]
  assert all((out / f).stat().st_size < 2**20 for f in files)


@pytest.mark.slow
def test_step_rows_cover_each_configuration(dry_run):
  _, out = dry_run
  rows = [line.split() for line in (out / "step.txt").read_text().splitlines()
          if re.match(r"^(float32|bfloat16)\s+\d+\s", line)]
  expected = [(d, str(b), m) for d, b, methods in load_kit().DRY_RUN.step_configs for m in methods.split(",")]
  assert [tuple(r[:3]) for r in rows] == expected
  for row in rows:
    median_ms, images_per_s, loss = float(row[4]), float(row[5]), float(row[8])
    batch = int(row[1])
    assert median_ms > 0 and abs(images_per_s - batch / (median_ms / 1e3)) <= 0.01 * images_per_s + 1
    assert np.isfinite(loss) and loss > 0


@pytest.mark.slow
def test_training_run_trains_and_evaluates_the_held_out_split(dry_run):
  _, out = dry_run
  results = json.loads((out / "results.json").read_text())
  assert [e["epoch"] for e in results["epochs"]] == [1]
  top1 = results["epochs"][0]["top1"]
  # 10 classes x 2 held-out images: top-1 is a multiple of 5 %.
  assert 0.0 <= top1 <= 100.0 and abs(top1 / 5.0 - round(top1 / 5.0)) < 1e-6
  summary = (out / "summary.txt").read_text()
  assert re.search(r"train: \d+ images/s", summary) and f"last {top1:.2f}%" in summary


def test_gpu_plan_fits_in_eight_minutes():
  kit = load_kit()
  limits = kit.GPU.limits
  total = limits["tests"] + limits["losses"] + limits["train"] + limits["step"] * len(kit.GPU.step_configs)
  assert total <= 8 * 60 - 15, total  # 15 s for the environment report and process starts.
  assert {(d, b) for d, b, _ in kit.GPU.step_configs} == {(d, b) for d in ("float32", "bfloat16")
                                                          for b in (64, 256)}
