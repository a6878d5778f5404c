"""Both pipelines on a mesh that spans two processes (2 x 2 CPU devices on localhost, jax.distributed).

Each process must make only its own devices' rows of the global batch, with no device-to-host transfer
(tests/trainer/data/multiprocess_worker.py runs under `jax.transfer_guard_device_to_host("disallow")`):

* DevicePipeline: every process's rows equal the same rows of a 1-process, 4-device pipeline (bitwise,
  cifar augmentation included: a row's key depends on its global row, not on the process).
* TfdsPipeline: process p's rows come from its own half of the split only (TFDS's even split, checked
  against the stored insertion order), each a valid pad-4 crop of one of them with the right label;
  evaluation is each half in order, padded with mask 0.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from nst_jax.trainer.data import device_pipeline
from tests.trainer.data import augment_reference as ref
from tests.trainer.data import multiprocess_worker as worker

pytestmark = pytest.mark.slow  # two processes on one jax.distributed mesh, TensorFlow in each

ROOT = pathlib.Path(__file__).resolve().parents[3]
N_TRAIN, N_VAL = 16, 11


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tiny_tfds(data_dir):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow")
  rng = np.random.default_rng(1)
  arrays = {"train": rng.integers(1, 256, (N_TRAIN, 6, 6, 3), dtype=np.uint8),
            "validation": rng.integers(1, 256, (N_VAL, 6, 6, 3), dtype=np.uint8)}
  labels = {s: (np.arange(len(a)) % 3).astype(np.int32) for s, a in arrays.items()}
  tfds.dataset_builders.store_as_tfds_dataset(
    name=worker.TFDS_NAME, version="1.0.0",
    features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(6, 6, 3)),
                                         "label": tfds.features.ClassLabel(num_classes=3)}),
    split_datasets={s: [(i, {"image": a[i], "label": labels[s][i]}) for i in range(len(a))]
                    for s, a in arrays.items()},
    data_dir=data_dir, disable_shuffling=True)
  return arrays, labels


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  out = tmp_path_factory.mktemp("multiprocess")
  arrays, labels = _tiny_tfds(out / "tfds")
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  command = [sys.executable, "-m", "tests.trainer.data.multiprocess_worker"]
  procs = [subprocess.Popen([*command, str(i), str(port), str(out), str(out / "tfds")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:  # One process failing leaves the other waiting for it: end both.
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log
  rows = [dict(np.load(out / f"process{i}.npz")) for i in (0, 1)]
  return rows, arrays, labels


def _rows(saved, prefix):
  """{first global row: rows} of one batch's entry, e.g. prefix 'device_train/0/image'."""
  return {int(k.rsplit("/", 1)[1]): v for k, v in saved.items() if k.rsplit("/", 1)[0] == prefix}


def test_device_pipeline_rows_equal_a_single_process_run(two_processes):
  rows, _, _ = two_processes
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  single = device_pipeline.DevicePipeline(worker.device_dataset(), global_batch=worker.GLOBAL_BATCH, seed=3,
                                          augment="cifar", mean=worker.MEAN, std=worker.STD, mesh=mesh)
  want_train = single.batch(worker.DEVICE_STEP)
  want_eval = list(single.eval_batches())
  for process, saved in enumerate(rows):
    for prefix, want in [("device_train/0", want_train)] + [(f"device_eval/{i}", b) for i, b in
                                                             enumerate(want_eval)]:
      for key in want:
        got = _rows(saved, f"{prefix}/{key}")
        # Two devices per process, two rows each: process p holds global rows 4p .. 4p + 3.
        assert sorted(got) == [4 * process, 4 * process + 2], (prefix, key, sorted(got))
        for start, value in got.items():
          np.testing.assert_array_equal(value, np.asarray(want[key])[start:start + 2], err_msg=prefix)


def test_tfds_pipeline_reads_only_its_half(two_processes):
  rows, arrays, labels = two_processes
  halves = {"train": [np.arange(0, 8), np.arange(8, 16)], "validation": [np.arange(0, 6), np.arange(6, 11)]}
  for process, saved in enumerate(rows):
    own = halves["train"][process]
    seen = []
    for step in range(worker.TFDS_STEPS):
      got = _rows(saved, f"tfds_train/{step}/image")
      assert sorted(got) == [4 * process, 4 * process + 2]
      images = np.concatenate([got[k] for k in sorted(got)])
      label_rows = _rows(saved, f"tfds_train/{step}/label")
      crops = ref.recover_crops(ref.denormalize(images, worker.MEAN, worker.STD), arrays["train"][own], pad=4)
      index = own[[i for i, *_ in crops]]
      np.testing.assert_array_equal(np.concatenate([label_rows[k] for k in sorted(label_rows)]),
                                    labels["train"][index])
      seen += index.tolist()
    assert sorted(seen) == own.tolist()  # one epoch of the half: every example once

    own = halves["validation"][process]
    local = [(b, 4 * process + k) for b in (0, 1) for k in (0, 2)]  # 2 batches x this process's 2 devices
    images = np.concatenate([_rows(saved, f"tfds_eval/{b}/image")[start] for b, start in local])
    mask = np.concatenate([_rows(saved, f"tfds_eval/{b}/mask")[start] for b, start in local])
    np.testing.assert_array_equal(mask, np.arange(8) < len(own))
    np.testing.assert_allclose(images[:len(own)], ref.normalize(arrays["validation"][own], worker.MEAN,
                                                                worker.STD), atol=1e-5)
    assert not images[len(own):].any()
