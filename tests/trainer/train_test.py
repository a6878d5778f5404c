"""Tests of the training step (nst_jax.trainer.train) under both parallel modes (nst_jax.trainer.parallel).

The reference for the data-parallel runs is the same step on one device: after three steps the
parameters from jit on 8 devices, jit on 1 device and pmap on 8 devices must agree. The teacher's part
of the step is checked against NumPy: the KD metric of the first step must be the KD of the teacher's
logits computed outside the step, in the configured BatchNorm mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import models, objective
from nst_jax.trainer import parallel, train

GLOBAL_BATCH = 16
NST_PAIRS = (("stage2", "stage2"), ("stage3", "stage3"))


def _objective(fitnet=False):
  return objective.Objective(ce_weight=0.1, kd_weight=0.9, nst_weight=50.0, nst_layers=NST_PAIRS,
                             fitnet_weight=100.0 if fitnet else 0.0,
                             fitnet_layer=("stage2", "stage3") if fitnet else None)


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, size=GLOBAL_BATCH).astype(np.int32)} for _ in range(n)]


def _setup(mode, devices, teacher_batchnorm="running", fitnet=False):
  mesh = parallel.make_mesh(devices)
  runner = parallel.Runner(mode, mesh)
  axis = runner.axis_name
  teacher = models.get_model("resnet14", num_classes=10, axis_name=axis)
  obj = _objective(fitnet)
  student = objective.student_module(models.get_model("resnet8", num_classes=10, axis_name=axis), obj,
                                     {"stage3": (8, 8, 64)})
  mdl = train.Models(student=student, teacher=teacher, teacher_batchnorm=teacher_batchnorm)
  sample = jnp.zeros((2, 32, 32, 3))
  teacher_variables = jax.jit(functools.partial(teacher.init, train=False))(jax.random.key(1), sample)
  lr = train.step_schedule(0.05, steps_per_epoch=2, decay_epochs=(1,), decay_factor=0.1)
  state = train.create_train_state(student, train.make_optimizer(lr, 0.9, False, 5e-4), sample,
                                   jax.random.key(0))
  step = runner.compile_train(train.train_body(mdl, obj, lr))
  return runner, step, state, teacher_variables, mdl


def _run(mode, devices, teacher_batchnorm="running", fitnet=False, steps=3):
  runner, step, state, teacher_variables, _ = _setup(mode, devices, teacher_batchnorm, fitnet)
  state, t_vars = runner.put_replicated(state), runner.put_replicated(teacher_variables)
  history = []
  for batch in _batches(steps):
    state, metrics = step(state, t_vars, runner.put_batch(batch))
    history.append(runner.metrics_to_host(metrics))
  return jax.device_get(runner.get_replicated(state)), history


def _assert_trees_close(a, b, rtol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(np.abs(x).max(), 1e-6)
    assert np.abs(x - y).max() <= rtol * scale, (jax.tree_util.keystr(path), np.abs(x - y).max(), scale)


@pytest.fixture(scope="module")
def single_device_run():
  return _run("jit", jax.devices()[:1])


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_eight_devices_match_one_device(single_device_run, mode):
  reference, ref_history = single_device_run
  state, history = _run(mode, jax.devices()[:8])
  assert len(jax.devices()) == 8
  _assert_trees_close(state.params, reference.params, rtol=1e-5)
  _assert_trees_close(state.batch_stats, reference.batch_stats, rtol=1e-5)
  for m, r in zip(history, ref_history, strict=True):
    assert set(m) == set(r)
    for key in r:
      np.testing.assert_allclose(m[key], r[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_metrics_and_training_moves(single_device_run):
  state, history = single_device_run
  assert int(state.step) == 3
  initial = train.create_train_state(models.get_model("resnet8", num_classes=10),
                                     train.make_optimizer(0.05, 0.9, False, 5e-4), jnp.zeros((2, 32, 32, 3)),
                                     jax.random.key(0))
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
      jax.tree.leaves(initial.params), jax.tree.leaves(state.params), strict=True)]
  assert min(moved) > 0  # every parameter was updated, so the device comparisons are not vacuous
  expected = {"train_loss", "train_ce_loss", "train_kd_loss", "train_nst_loss",
              "train_nst_stage2-stage2_loss", "train_nst_stage3-stage3_loss", "train_accuracy",
              "learning_rate"}
  assert set(history[0]) == expected
  # The schedule decays x0.1 after epoch 1 = step 2: the lr seen by steps 0, 1, 2.
  np.testing.assert_allclose([h["learning_rate"] for h in history], [0.05, 0.05, 0.005], rtol=1e-6)
  for h in history:
    total = 0.1 * h["train_ce_loss"] + 0.9 * h["train_kd_loss"] + 50 * h["train_nst_loss"]
    np.testing.assert_allclose(h["train_loss"], total, rtol=1e-5)


def _numpy_kd(student_logits, teacher_logits, temperature=4.0):
  def log_softmax(z):
    z = np.asarray(z, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))

  log_ps, log_pt = log_softmax(student_logits), log_softmax(teacher_logits)
  return temperature**2 * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), 1))


@pytest.mark.parametrize("teacher_batchnorm", ["running", "batch"])
def test_kd_metric_uses_the_teacher_in_its_batchnorm_mode(teacher_batchnorm):
  runner, step, state, teacher_variables, mdl = _setup("jit", jax.devices()[:1], teacher_batchnorm)
  batch = _batches(1, seed=5)[0]
  images = jnp.asarray(batch["image"])
  running_logits = mdl.teacher.apply(teacher_variables, images, train=False)[0]
  batch_logits = mdl.teacher.apply(teacher_variables, images, train=True, mutable=["batch_stats"])[0][0]
  student_logits = mdl.student.apply(train.student_variables(state), images, train=True,
                                     mutable=["batch_stats"])[0][0]
  _, metrics = step(runner.put_replicated(state), runner.put_replicated(teacher_variables),
                    runner.put_batch(batch))
  kd = runner.metrics_to_host(metrics)["train_kd_loss"]
  want = {"running": running_logits, "batch": batch_logits}[teacher_batchnorm]
  other = {"running": batch_logits, "batch": running_logits}[teacher_batchnorm]
  np.testing.assert_allclose(kd, _numpy_kd(student_logits, want), rtol=1e-4)
  assert abs(kd - _numpy_kd(student_logits, other)) > 1e-3  # the two modes are distinguishable here


def test_fitnet_regressor_is_part_of_the_student_tree():
  state, history = _run("jit", jax.devices()[:2], fitnet=True, steps=2)
  plain = models.get_model("resnet8", num_classes=10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                           train=False)
  # One tree: the student's own entries at the top, the regressor (conv + BatchNorm) beside them.
  assert set(state.params) == set(plain["params"]) | {"regressor"}
  shapes = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_leaves_with_path(state.params["regressor"])}
  assert sorted(shapes.values()) == sorted([(3, 3, 32, 64), (64,), (64,), (64,)])  # conv 32 -> 64, BN
  assert "train_fitnet_loss" in history[0] and np.all(np.isfinite([h["train_loss"] for h in history]))


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_eval_step_counts_match_numpy(mode):
  model = models.get_model("resnet8", num_classes=10)
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  batch = _batches(1, seed=3)[0]
  batch["mask"] = (np.arange(GLOBAL_BATCH) < 13).astype(np.float32)  # a padded last batch
  runner = parallel.Runner(mode, parallel.make_mesh())
  sums = runner.metrics_to_host(runner.compile_eval(train.eval_body(model))(
      runner.put_replicated(variables), runner.put_batch(batch)))
  logits = np.asarray(model.apply(variables, batch["image"], train=False)[0])
  top5 = np.argsort(-logits, axis=1)[:, :5]
  real = batch["mask"] > 0
  assert sums["count"] == 13
  assert sums["top1_correct"] == np.sum((logits.argmax(1) == batch["label"])[real])
  assert sums["top5_correct"] == np.sum((top5 == batch["label"][:, None]).any(1)[real])


def test_eval_sums_are_exact_with_padding():
  logits = jnp.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7], [0.5, 0.4, 0.3]])
  labels = jnp.array([1, 2, 2, 0])
  mask = jnp.array([1, 1, 1, 0])
  sums = train.topk_sums(logits, labels, mask)
  assert float(sums["top1_correct"]) == 2 and float(sums["count"]) == 3
  assert float(sums["top5_correct"]) == 3  # 3 classes: top-5 is every class


def test_global_batch_must_divide_by_devices():
  with pytest.raises(ValueError, match=r"global batch size 12 does not divide by the 8 devices"):
    parallel.check_global_batch(12, 8)
  with pytest.raises(ValueError, match=r"Unknown parallel mode 'pjit'. Valid modes: jit, pmap"):
    parallel.Runner("pjit", parallel.make_mesh())
