"""One process of tests/trainer/data/multiprocess_test.py: 2 CPU devices of a 2-process x 2-device mesh.

    python -m tests.trainer.data.multiprocess_worker PROCESS_ID PORT OUT_DIR TFDS_DATA_DIR

Builds a DevicePipeline and a TfdsPipeline over the global mesh, makes training and evaluation batches
with device-to-host transfers disallowed, and saves the rows this process's devices hold (by their row
index in the global batch) to OUT_DIR/process<ID>.npz.
"""

import os
import sys

if __name__ == "__main__":  # Only as a worker: the test session imports this module for its constants.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

DEVICE_STEP = 3  # the DevicePipeline training step that is compared
TFDS_STEPS = 2
GLOBAL_BATCH = 8
MEAN, STD = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
TFDS_NAME = "nst_multiprocess_tiny"


def device_dataset():
  """The dataset both the workers and the test's 1-process reference build (a pure function)."""
  from nst_jax.trainer.data import sources

  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (20, 6, 6, 3), dtype=np.uint8)
  return sources.ArrayDataset(images, (np.arange(20) % 4).astype(np.int32), 4, tuple("abcd"))


def _local_rows(batches, out, prefix):
  """Each batch's rows on this process's devices, keyed by the first global row they hold."""
  for i, batch in enumerate(batches):
    for key, array in batch.items():
      for shard in array.addressable_shards:
        out[f"{prefix}{i}/{key}/{shard.index[0].start}"] = np.asarray(shard.data)


def main(process_id: int, port: int, out_dir: str, tfds_dir: str):
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  from nst_jax.trainer.data import device_pipeline, tfds_pipeline

  mesh = Mesh(np.array(jax.devices()), ("data",))
  device_pipe = device_pipeline.DevicePipeline(device_dataset(), global_batch=GLOBAL_BATCH, seed=3,
                                               augment="cifar", mean=MEAN, std=STD, mesh=mesh)
  kwargs = dict(global_batch=GLOBAL_BATCH, seed=0, preprocess="cifar", mean=MEAN, std=STD, mesh=mesh,
                data_dir=tfds_dir)
  tfds_train = tfds_pipeline.TfdsPipeline(TFDS_NAME, split="train", **kwargs)
  tfds_eval = tfds_pipeline.TfdsPipeline(TFDS_NAME, split="validation", **kwargs)
  # No process ever reads a device array back while it makes batches: no host round trip, and no
  # access to the other process's (non-addressable) shards, which would raise.
  with jax.transfer_guard_device_to_host("disallow"):
    batches = {"device_train": [device_pipe.batch(DEVICE_STEP)],
               "device_eval": list(device_pipe.eval_batches()),
               "tfds_train": list(tfds_train.iterate(0, TFDS_STEPS)),
               "tfds_eval": list(tfds_eval.eval_batches())}
    jax.block_until_ready(batches)
  out = {}
  for name, values in batches.items():
    _local_rows(values, out, f"{name}/")
  np.savez(os.path.join(out_dir, f"process{process_id}.npz"), **out)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
