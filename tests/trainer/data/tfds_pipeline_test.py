"""Tests of nst_jax.trainer.data.tfds_pipeline: a tiny TFDS dataset prepared offline (exact pixels), ImageNet
under tfds.testing.mock_data, and the crop/resize geometry checked on pixel-coordinate ramps."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec

from nst_jax.trainer.data import tfds_pipeline
from tests.trainer.data import augment_reference as ref

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

NAME = "nst_tfds_pipeline_tiny"
MEAN, STD = (0.2, 0.4, 0.6), (0.3, 0.5, 0.7)
N_TRAIN, N_VAL = 37, 11


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A prepared TFDS dataset of 12x12 PNG images (lossless) in its insertion order."""
  rng = np.random.default_rng(0)
  arrays = {
    "train": rng.integers(1, 256, (N_TRAIN, 12, 12, 3), dtype=np.uint8),
    "validation": rng.integers(1, 256, (N_VAL, 12, 12, 3), dtype=np.uint8),
  }
  labels = {s: (np.arange(len(a)) % 4).astype(np.int32) for s, a in arrays.items()}
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds.dataset_builders.store_as_tfds_dataset(
    name=NAME,
    version="1.0.0",
    features=tfds.features.FeaturesDict(
      {"image": tfds.features.Image(shape=(12, 12, 3)), "label": tfds.features.ClassLabel(num_classes=4)}
    ),
    split_datasets={
      s: [(i, {"image": a[i], "label": labels[s][i]}) for i in range(len(a))] for s, a in arrays.items()
    },
    data_dir=data_dir,
    disable_shuffling=True,
  )
  return str(data_dir), arrays, labels


def _pipeline(tiny, **kwargs):
  defaults = dict(split="train", global_batch=8, seed=0, preprocess="cifar", mean=MEAN, std=STD)
  return tfds_pipeline.TfdsPipeline(NAME, data_dir=tiny[0], **{**defaults, **kwargs})


def _images(batches) -> np.ndarray:
  return np.concatenate([np.asarray(b["image"]) for b in batches])


def test_training_stream_epochs_crops_determinism_and_resume(tiny):
  _, arrays, labels = tiny
  pipe = _pipeline(tiny)
  assert pipe.steps_per_epoch == N_TRAIN // 8 == 4
  run = list(pipe.iterate(0, 6))
  assert all(b["image"].shape == (8, 12, 12, 3) and b["image"].dtype == np.float32 for b in run)
  crops = ref.recover_crops(ref.denormalize(_images(run), MEAN, STD), arrays["train"], pad=4)
  index = np.array([i for i, *_ in crops])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in run]), labels["train"][index])
  assert len(set(index[:32])) == 32 and len(set(index[32:])) == 16  # epochs never repeat an example
  assert not np.array_equal(index[:16], index[32:])  # and are reshuffled
  assert 0.2 < np.mean([f for *_, f in crops]) < 0.8
  assert len({(dy, dx) for _, dy, dx, _ in crops}) > 20

  # Resume at step 3 (across the epoch boundary at 4), a fresh pipeline: the same bits.
  resumed = _images(_pipeline(tiny).iterate(3, 3))
  np.testing.assert_array_equal(resumed, _images(run[3:]))
  assert not np.array_equal(_images(_pipeline(tiny, seed=1).iterate(0, 1)), _images(run[:1]))


def test_eval_in_order_padded_with_mask(tiny):
  _, arrays, labels = tiny
  pipe = _pipeline(tiny, split="validation", global_batch=4)
  batches = list(pipe.eval_batches())
  assert [float(b["mask"].sum()) for b in batches] == [4, 4, 3] == [4, 4, 3][: pipe.num_eval_batches()]
  images = _images(batches)
  np.testing.assert_allclose(images[:N_VAL], ref.normalize(arrays["validation"], MEAN, STD), atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:N_VAL], labels["validation"])
  assert not images[N_VAL:].any()


def test_per_host_parts_are_disjoint_and_equally_long(tiny):
  _, arrays, _ = tiny
  parts, train_index = [], []
  for host in (0, 1):
    pipe = _pipeline(tiny, split="validation", global_batch=4, process_index=host, process_count=2)
    batches = list(pipe.eval_batches())
    masks = [float(b["mask"].sum()) for b in batches]
    # even_splits: hosts get 6 and 5 of the 11; both run ceil(6 / 2) = 3 batches of 2.
    assert masks == ([2, 2, 2] if host == 0 else [2, 2, 1])
    parts.append(ref.denormalize(_images(batches)[: int(sum(masks))], MEAN, STD))
    train = _pipeline(tiny, preprocess="none", process_index=host, process_count=2)
    assert train.local_batch == 4 and train.steps_per_epoch == (N_TRAIN // 2) // 4
    pixels = ref.denormalize(_images(train.iterate(0, train.steps_per_epoch)), MEAN, STD)
    hits = np.all(pixels[:, None] == arrays["train"][None], axis=(2, 3, 4))
    train_index.append(set(hits.argmax(1).tolist()))
  np.testing.assert_array_equal(np.concatenate(parts), arrays["validation"])
  assert train_index[0] <= set(range(19)) and train_index[1] <= set(range(19, N_TRAIN))


def test_imagenet_under_mock_data_sharded_over_8_devices():
  mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Explicit,))
  kwargs = dict(global_batch=8, mesh=mesh, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  with tfds.testing.mock_data(num_examples=10):
    train = tfds_pipeline.TfdsPipeline("imagenet2012", split="train", **kwargs)
    batch = next(train.iterate(0, 1))
    evaluation = list(tfds_pipeline.TfdsPipeline("imagenet2012", split="validation", **kwargs).eval_batches())
  assert batch["image"].shape == (8, 224, 224, 3) and batch["label"].shape == (8,)
  assert all(x.sharding.spec == PartitionSpec("data") for x in (*batch.values(), *evaluation[0].values()))
  assert np.isfinite(np.asarray(batch["image"])).all()
  assert [float(b["mask"].sum()) for b in evaluation] == [8, 2]


def _ramp_png(height, width) -> bytes:
  """PNG whose channel 0 is the row index, channel 1 the column index, channel 2 constant."""
  rows, cols = np.mgrid[:height, :width]
  image = np.stack([rows, cols, np.full_like(rows, 77)], -1).astype(np.uint8)
  return tf.io.encode_png(image)


def _bilinear_source(out_positions, in_size, out_size):
  """Source coordinate of output pixels under half-pixel-centre resizing."""
  return (np.asarray(out_positions) + 0.5) * in_size / out_size - 0.5


@pytest.mark.parametrize("height,width", [(200, 251), (251, 200)])
def test_eval_resize_shorter_side_then_centre_crop(height, width):
  out = tfds_pipeline.resize_center_crop(_ramp_png(height, width), image_size=224, resize_size=256).numpy()
  assert out.shape == (224, 224, 3)
  # torchvision: shorter side 256, longer int(256 * long / short) = 321; crop offset round(97 / 2) = 48.
  new_h, new_w = (256, 321) if height < width else (321, 256)
  top, left = (16, 48) if height < width else (48, 16)
  rows = _bilinear_source(np.arange(224) + top, height, new_h)
  cols = _bilinear_source(np.arange(224) + left, width, new_w)
  np.testing.assert_allclose(out[..., 0], np.broadcast_to(rows[:, None], (224, 224)), atol=2e-3)
  np.testing.assert_allclose(out[..., 1], np.broadcast_to(cols[None, :], (224, 224)), atol=2e-3)
  np.testing.assert_allclose(out[..., 2], 77, atol=1e-3)


def test_random_resized_crop_geometry():
  height, width = 160, 200
  image = _ramp_png(height, width)
  boxes, flips = [], []
  inner = np.arange(24, 200)  # away from the crop's edges, where resizing clamps
  for i in range(12):
    out = tfds_pipeline.random_resized_crop(image, tf.constant([5, i], tf.int64), image_size=224).numpy()
    assert out.shape == (224, 224, 3)
    flipped = out[0, -1, 1] < out[0, 0, 1]
    if flipped:
      out = out[:, ::-1]
    flips.append(flipped)
    # Bilinear resizing of a ramp is a ramp: channel 0 depends on the row only, channel 1 on the column.
    assert np.ptp(out[..., 0], axis=1).max() < 1e-3 and np.ptp(out[..., 1], axis=0).max() < 1e-3
    box = []
    for values in (out[inner, 0, 0], out[0, inner, 1]):
      slope, intercept = np.polyfit(inner, values, 1)
      size = slope * 224  # crop side in source pixels
      start = intercept - (0.5 * size / 224 - 0.5)  # source coordinate of the crop's first pixel
      assert abs(size - round(size)) < 0.05 and abs(start - round(start)) < 0.05
      np.testing.assert_allclose(values, start + _bilinear_source(inner, size, 224), atol=1e-2)
      box += [round(start), round(size)]
    y0, h, x0, w = box
    assert 0 <= y0 and y0 + h <= height and 0 <= x0 and x0 + w <= width
    assert 0.08 - 0.01 <= h * w / (height * width) <= 1.0
    assert 3 / 4 - 2 / h <= w / h <= 4 / 3 + 2 / h
    boxes.append(tuple(box))
  assert 0 < sum(flips) < 12 and len(set(boxes)) >= 10


def test_errors(tiny, tmp_path):
  mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Explicit,))
  with pytest.raises(ValueError, match=r"global batch size 12 does not divide by the 8 devices"):
    _pipeline(tiny, global_batch=12, mesh=mesh)
  with pytest.raises(ValueError, match="Valid: imagenet, cifar, none"):
    _pipeline(tiny, preprocess="randaugment")
  with pytest.raises(ValueError, match="fewer than one global batch"):
    next(_pipeline(tiny, split="validation", global_batch=16).iterate())
  with pytest.raises(RuntimeError, match=r"tfds build cifar10 --data_dir=DIR"):
    tfds_pipeline.TfdsPipeline(
      "cifar10", split="train", global_batch=8, data_dir=str(tmp_path), download=False
    )
  with pytest.raises(RuntimeError, match=r"ILSVRC2012_img_train.tar .* manual_dir=MANUAL"):
    tfds_pipeline.TfdsPipeline("imagenet2012", split="train", global_batch=8, data_dir=str(tmp_path))


def test_importing_the_data_package_imports_no_tensorflow():
  code = (
    "import sys; import nst_jax.trainer.data; "
    "from nst_jax.trainer.data import sources, device_pipeline, tfds_pipeline; "
    "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
    "assert not bad, bad"
  )
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  env = {**os.environ, "PYTHONPATH": root}
  result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
