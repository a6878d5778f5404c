"""Tests of the training step (nst_jax.train) under both parallel modes (nst_jax.parallel).

The reference for the data-parallel runs is the same step on one device: after three steps the
parameters from jit on 8 devices, jit on 1 device and pmap on 8 devices must agree.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import models, objective, parallel, train

GLOBAL_BATCH = 16


def _objective(fitnet=False):
  return objective.Objective(ce_weight=0.1, kd_weight=0.9, nst_weight=50.0,
                             nst_layers=(("stage2", "stage2"), ("stage3", "stage3")),
                             fitnet_weight=100.0 if fitnet else 0.0,
                             fitnet_layer=("stage2", "stage3") if fitnet else None)


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, size=GLOBAL_BATCH).astype(np.int32)} for _ in range(n)]


def _run(mode, devices, teacher_batchnorm="running", fitnet=False, steps=3):
  mesh = parallel.make_mesh(devices)
  axis = parallel.PMAP_AXIS if mode == "pmap" else None
  teacher = models.get_model("resnet14", num_classes=10, axis_name=axis)
  regressor = objective.HintRegressor(teacher_shape=(8, 8, 64), student_tap="stage2",
                                      axis_name=axis) if fitnet else None
  mdl = train.Models(student=models.get_model("resnet8", num_classes=10, axis_name=axis),
                     teacher=teacher, regressor=regressor, teacher_batchnorm=teacher_batchnorm)
  sample = jnp.zeros((2, 32, 32, 3))
  teacher_variables = jax.jit(functools.partial(teacher.init, train=False))(jax.random.key(1), sample)
  lr = train.step_schedule(0.05, steps_per_epoch=2, decay_epochs=(1,), decay_factor=0.1)
  state = train.create_train_state(mdl, train.make_optimizer(lr, 0.9, False, 5e-4), sample,
                                   jax.random.key(0))
  runner = parallel.Runner(mode, mesh)
  step = runner.compile_train(train.train_body(mdl, _objective(fitnet), lr))
  state, t_vars = runner.put_replicated(state), runner.put_replicated(teacher_variables)
  history = []
  for batch in _batches(steps):
    state, metrics = step(state, t_vars, batch, jax.random.key(2))
    history.append(jax.device_get(metrics))
  return (jax.device_get(runner.get_replicated(state)), history, teacher_variables,
          jax.device_get(runner.get_replicated(t_vars)))


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
  reference, ref_history, _, _ = single_device_run
  state, history, _, _ = _run(mode, jax.devices()[:8])
  assert len(jax.devices()) == 8
  _assert_trees_close(state.params, reference.params, rtol=1e-5)
  _assert_trees_close(state.batch_stats, reference.batch_stats, rtol=1e-5)
  for m, r in zip(history, ref_history, strict=True):
    assert set(m) == set(r)
    for key in r:
      np.testing.assert_allclose(m[key], r[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_metrics_and_training_moves(single_device_run):
  state, history, teacher_before, teacher_after = single_device_run
  assert int(state.step) == 3
  initial = train.create_train_state(
      train.Models(student=models.get_model("resnet8", num_classes=10)), train.make_optimizer(
          0.05, 0.9, False, 5e-4), jnp.zeros((2, 32, 32, 3)), jax.random.key(0))
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
  # The teacher's variables are bitwise unchanged.
  for x, y in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(teacher_after), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("teacher_batchnorm", ["batch"])
def test_teacher_batch_statistics_mode_and_fitnet(teacher_batchnorm):
  state, history, before, after = _run("jit", jax.devices()[:2], teacher_batchnorm, fitnet=True, steps=2)
  assert "train_fitnet_loss" in history[0] and set(state.params) == {"student", "regressor"}
  assert np.all(np.isfinite([h["train_loss"] for h in history]))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_eval_step_counts_match_numpy(mode):
  model = models.get_model("resnet8", num_classes=10)
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  batch = _batches(1, seed=3)[0]
  batch["mask"] = (np.arange(GLOBAL_BATCH) < 13).astype(np.float32)  # a padded last batch
  runner = parallel.Runner(mode, parallel.make_mesh())
  sums = runner.compile_eval(train.eval_body(model))(runner.put_replicated(variables), batch)
  logits = np.asarray(model.apply(variables, batch["image"], train=False)[0])
  top5 = np.argsort(-logits, axis=1)[:, :5]
  real = batch["mask"] > 0
  assert float(sums["count"]) == 13
  assert float(sums["top1_correct"]) == np.sum((logits.argmax(1) == batch["label"])[real])
  assert float(sums["top5_correct"]) == np.sum((top5 == batch["label"][:, None]).any(1)[real])


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
