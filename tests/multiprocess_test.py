"""Multi-process runs on one machine: 2 processes x 4 CPU devices (gloo collectives, a coordinator on
localhost) against 1 process x 8 devices, through launch.py's --coordinator_address / --num_processes /
--process_id. Each process feeds its own half of the global batch; the parameters, the evaluation and the
checkpoint (written once, by Orbax's multi-process save) must be those of the 1-process run, and a SIGTERM
sent to both processes must save one step on both and exit cleanly.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nst_jax import models
from nst_jax.trainer import checkpoints

pytestmark = pytest.mark.slow  # each test trains real runs in 2 + 1 processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = """
import importlib.util
spec = importlib.util.spec_from_file_location("default", {default!r})
default = importlib.util.module_from_spec(spec)
spec.loader.exec_module(default)

def get_config():
  config = default.get_config()
  config.student.model = "resnet8"
  # Two large steps. Runs on different device layouts sum in different float32 orders, and SGD through
  # BatchNorm amplifies that about tenfold per step (measured here: the update of 1 process x 8 devices
  # and of 1 process x 4 differ by 7e-5 after one step, 8e-4 after two), so few steps keep it at rounding.
  config.schedule.batch_size = 512
  config.schedule.epochs, config.schedule.decay_epochs = 1, ()
  config.logging.log_every_steps, config.logging.checkpoint_every_steps = 1, 5
  config.logging.tensorboard = False
  return config
"""
KD_NST = ["--config.teacher.model=resnet8", "--config.distill.ce_weight=0.1",
          "--config.distill.kd_weight=0.9", "--config.distill.nst.weight=50"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(config, workdir, *overrides, processes=1, devices=8):
  port, procs = _free_port(), []
  for rank in range(processes):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, str(ROOT / "launch.py"), f"--config={config}", f"--workdir={workdir}",
               *overrides]
    if processes > 1:
      command += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                  f"--process_id={rank}"]
    procs.append(subprocess.Popen(command, cwd=workdir.parent, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, timeout=600):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  return [p.returncode for p in procs], outs


def _variables(workdir):
  model = models.get_model("resnet8", num_classes=10)
  x = jax.numpy.zeros((1, 32, 32, 1))
  return checkpoints.load_variables(workdir, jax.eval_shape(lambda: model.init(
      jax.random.key(0), x, train=False)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  config = root / "digits_resnet8.py"
  config.write_text(CONFIG.format(default=str(ROOT / "configs" / "default.py")))
  distil = [*KD_NST, f"--config.teacher.workdir={root / 'teacher'}", f"--config.teacher.config={config}"]
  # 1 process x 8 devices: trains the teacher first, then the student.
  codes, one_outs = _finish(_start(config, root / "one", *distil))
  assert codes == [0], one_outs
  codes, outs = _finish(_start(config, root / "two", *distil, processes=2, devices=4))
  assert codes == [0, 0], outs
  return root, config, outs, one_outs


def test_two_processes_match_one(runs):
  root, _, outs, _ = runs
  assert "2 process(es), 8 device(s)" in outs[0] and "teacher stage" not in outs[0]  # the teacher is shared
  assert outs[1].count("step ") == 0  # only process 0 logs
  one, two = _variables(root / "one"), _variables(root / "two")  # restored in this 1-process test
  for collection in ("params", "batch_stats"):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(v[collection])]) for v in (one, two))
    relative = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert relative <= 1e-5, (collection, relative)
  losses = [re.findall(r"^step \d+/2 .*train_loss=([\d.]+)", out.split("nst_jax student stage")[-1], re.M)
            for out in (outs[0], runs[3][0])]
  assert len(losses[0]) == 2 and losses[0] == losses[1]  # the same logged losses, to 4 digits
  results = [json.loads((root / name / "results.json").read_text()) for name in ("one", "two")]
  assert results[0]["last_top1"] == results[1]["last_top1"]
  assert results[0]["epochs"][0]["top5"] == results[1]["epochs"][0]["top5"]
  assert sorted(p.name for p in (root / "two" / "checkpoints").iterdir()) == ["2"]  # the epoch end


def test_sigterm_to_both_processes_saves_once_and_exits(runs):
  root, config, _, _ = runs
  workdir = root / "preempted"
  procs = _start(config, workdir, "--config.schedule.epochs=20", processes=2, devices=4)
  deadline = time.time() + 300
  ckpt = workdir / "checkpoints"
  while not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())) and time.time() < deadline:
    time.sleep(0.1)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  codes, outs = _finish(procs, timeout=180)
  assert codes == [128 + signal.SIGTERM] * 2, outs
  stopped = [int(out.split("saved step ")[1].split()[0]) for out in outs if "saved step " in out]
  assert stopped, outs
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  assert steps[-1] == stopped[0] < 20 * 2
  _variables(workdir)  # the multi-process checkpoint restores in this single process
