"""`config.seed` decides everything random in a run: two tiny digits runs with the same seed are bitwise
identical on CPU (final parameters, BatchNorm statistics, every number in results.json); a different seed
gives different ones."""

import json

import jax
import numpy as np
import pytest

from configs import digits
from nst_jax import models
from nst_jax.trainer import checkpoints, train_loop

IMAGE_SIZE = 8  # digits are 8x8: no resize, and the smallest maps resnet8 takes (8 / 4 / 2 px)


def _tiny(seed):
  config = digits.get_config()
  config.student.model = "resnet8"
  config.data.image_size = IMAGE_SIZE
  config.schedule.epochs = 1
  config.schedule.decay_epochs = ()
  config.logging.log_every_steps = 11
  config.logging.tensorboard = False
  config.logging.checkpoint_every_steps = 11
  config.seed = seed
  return config


def _final_variables(workdir):
  model = models.get_model("resnet8", num_classes=10)
  x = jax.numpy.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return jax.tree.map(np.asarray, checkpoints.load_variables(workdir, template))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Seed 0 twice, seed 1 once: (results.json, final variables) of each."""
  out = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    workdir = tmp_path_factory.mktemp(f"seed{seed}_{name}")
    train_loop.train_and_evaluate(_tiny(seed), str(workdir))
    out[name] = (json.loads((workdir / "results.json").read_text()), _final_variables(workdir))
  return out


def test_same_seed_is_bitwise_identical(runs):
  (results_a, variables_a), (results_b, variables_b) = runs["a"], runs["b"]
  assert results_a == results_b  # every accuracy and mean train loss, as exact floats
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(variables_a), jax.tree.leaves(variables_b)
  for (path, a), b in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_another_seed_differs(runs):
  (results_a, variables_a), (results_c, variables_c) = runs["a"], runs["c"]
  assert results_a["epochs"][0]["train"]["train_loss"] != results_c["epochs"][0]["train"]["train_loss"]
  kernels_a, kernels_c = _kernels(variables_a), _kernels(variables_c)
  assert kernels_a and all(not np.array_equal(a, c) for a, c in zip(kernels_a, kernels_c, strict=True))


def _kernels(variables):
  """Every convolution and dense kernel (BatchNorm scales start at 1 whatever the seed)."""
  return [x for p, x in jax.tree_util.tree_leaves_with_path(variables) if "kernel" in jax.tree_util.keystr(p)]
