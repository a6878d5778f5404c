"""`config.seed` decides everything random in a run: two runs of the same config with the same seed are
bitwise identical on CPU (final parameters, BatchNorm statistics, every number in results.json); a
different seed gives different ones.

The runs are the session's sweep of configs/tiny.py (tests/conftest.py). Its teacher is tiny.py's own
`ce` run with seed 0, trained as the first stage of `kd_nst/seed0`'s process; `ce/seed0` is the same
config and seed in a process of its own, SIGKILLed mid-run with the sweep and resumed from its checkpoint.
The sweep's one override (how many checkpoints to keep) reaches `ce/seed0` only and changes no number.
"""

import json

import jax
import numpy as np

from configs import tiny
from nst_jax import models
from nst_jax.trainer import checkpoints


def _final_variables(workdir):
  config = tiny.get_config()
  model = models.get_model(config.student.model, num_classes=10)
  x = jax.numpy.zeros((1, config.data.image_size, config.data.image_size, 1))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return jax.tree.map(np.asarray, checkpoints.load_variables(workdir, template))


def _flat(config: dict, prefix="") -> dict:
  out = {}
  for key, value in config.items():
    out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
  return out


def _run(workdir):
  return (json.loads((workdir / "results.json").read_text()), _flat(json.loads((workdir / "config.json")
                                                                              .read_text())),
          _final_variables(workdir))


def test_same_seed_is_bitwise_identical(tiny_sweep):
  (results_a, config_a, variables_a) = _run(tiny_sweep.root / "teacher")
  (results_b, config_b, variables_b) = _run(tiny_sweep.workdir("ce", 0))
  # The same run twice: the configs differ in the checkpoints kept, nothing else.
  differ = {k for k in config_a | config_b if config_a.get(k) != config_b.get(k)}
  assert differ == {"logging.keep_checkpoints"}
  assert config_a["seed"] == config_b["seed"] == 0
  assert tiny_sweep.killed["steps"] and not tiny_sweep.killed["finished"]  # ce/seed0 was resumed
  assert results_a == results_b  # every accuracy and mean train loss, as exact floats
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(variables_a), jax.tree.leaves(variables_b)
  for (path, a), b in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_another_seed_differs(tiny_sweep):
  (results_a, config_a, variables_a) = _run(tiny_sweep.workdir("ce", 0))
  (results_c, config_c, variables_c) = _run(tiny_sweep.workdir("ce", 1))
  assert (config_a["seed"], config_c["seed"]) == (0, 1)
  assert results_a["epochs"][0]["train"]["train_loss"] != results_c["epochs"][0]["train"]["train_loss"]
  kernels_a, kernels_c = _kernels(variables_a), _kernels(variables_c)
  assert kernels_a and all(not np.array_equal(a, c) for a, c in zip(kernels_a, kernels_c, strict=True))


def _kernels(variables):
  """Every convolution and dense kernel (BatchNorm scales start at 1 whatever the seed)."""
  return [x for p, x in jax.tree_util.tree_leaves_with_path(variables) if "kernel" in jax.tree_util.keystr(p)]
