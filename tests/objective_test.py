"""Tests of nst_jax.objective: config parsing and validation, tap checks, the weighted sum of terms."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import objective
from tests import np_reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _default_config():
  spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _outputs(seed=0):
  rng = np.random.default_rng(seed)
  relu = lambda *s: np.maximum(rng.normal(size=s), 0).astype(np.float32)
  student = {"stage2": relu(4, 8, 8, 6), "stage3": relu(4, 4, 4, 8)}
  teacher = {"stage2": relu(4, 8, 8, 12), "stage3": relu(4, 4, 4, 16)}
  logits = rng.normal(size=(4, 10)).astype(np.float32), rng.normal(size=(4, 10)).astype(np.float32)
  return np.array([1, 0, 9, 3]), logits, student, teacher


def test_default_config_is_supervised_cross_entropy():
  obj = objective.Objective.from_config(_default_config().distill)
  assert not obj.needs_teacher and obj.ce_weight == 1.0
  labels, (s_logits, _), s_feats, _ = _outputs()
  total, components = obj(labels, s_logits, s_feats)
  np.testing.assert_allclose(total, ref.cross_entropy(s_logits, labels), rtol=1e-6)
  assert set(components) == {"ce", "total"}


def test_weighted_sum_of_every_term_matches_numpy():
  config = _default_config()
  d = config.distill
  d.ce_weight, d.kd_weight, d.temperature = 0.1, 0.9, 4.0
  d.nst.weight, d.nst.layers = 50.0, "stage2:stage2,stage3:stage3"  # the command line's form
  d.at.weight, d.at.layers = 1000.0, "stage3:stage3"
  obj = objective.Objective.from_config(d)
  assert obj.needs_teacher
  labels, (s_logits, t_logits), s_feats, t_feats = _outputs(1)
  total, components = obj(labels, s_logits, s_feats, t_logits, t_feats)
  nst2 = ref.nst(s_feats["stage2"], t_feats["stage2"])
  nst3 = ref.nst(s_feats["stage3"], t_feats["stage3"])
  expected = {
      "ce": ref.cross_entropy(s_logits, labels), "kd": ref.kd(s_logits, t_logits, 4.0),
      "nst/stage2-stage2": nst2, "nst/stage3-stage3": nst3, "nst": nst2 + nst3,
      "at": ref.attention(s_feats["stage3"], t_feats["stage3"]),
  }
  for name, value in expected.items():
    np.testing.assert_allclose(components[name], value, rtol=2e-4, atol=1e-7, err_msg=name)
  weighted = 0.1 * expected["ce"] + 0.9 * expected["kd"] + 50 * expected["nst"] + 1000 * expected["at"]
  np.testing.assert_allclose(total, weighted, rtol=2e-4)


@pytest.mark.parametrize("kernel,params", [("gaussian", {}), ("gaussian", {"sigma2": 0.5}),
                                           ("linear", {}), ("polynomial", {"degree": 3, "c": 1.0})])
def test_kernel_settings_reach_the_loss(kernel, params):
  d = _default_config().distill
  d.ce_weight, d.nst.weight, d.nst.kernel = 0.0, 1.0, kernel
  d.nst.sigma2 = params.get("sigma2", 0.0)
  d.nst.degree, d.nst.c = params.get("degree", 2), params.get("c", 0.0)
  obj = objective.Objective.from_config(d)
  labels, (s_logits, t_logits), s_feats, t_feats = _outputs(2)
  total, _ = obj(labels, s_logits, s_feats, t_logits, t_feats)
  np.testing.assert_allclose(total, ref.nst(s_feats["stage3"], t_feats["stage3"], kernel, **params),
                             rtol=2e-4, atol=1e-7)


def test_fitnet_term_and_regressor():
  d = _default_config().distill
  d.ce_weight, d.fitnet.weight, d.fitnet.layer = 0.0, 100.0, "stage2:stage3"
  obj = objective.Objective.from_config(d)
  assert obj.fitnet_layer == ("stage2", "stage3")
  labels, (s_logits, t_logits), s_feats, t_feats = _outputs(3)
  regressor = objective.HintRegressor(teacher_shape=t_feats["stage3"].shape[1:])
  variables = regressor.init(jax.random.key(0), s_feats["stage2"], train=False)
  hint = regressor.apply(variables, s_feats["stage2"], train=False)
  assert hint.shape == t_feats["stage3"].shape  # 8x8 student map regressed onto 4x4 with stride 2
  total, components = obj(labels, s_logits, {**s_feats, objective.HINT: hint}, t_logits, t_feats)
  expected = np.mean((np.asarray(hint, np.float64) - t_feats["stage3"]) ** 2)
  np.testing.assert_allclose(components["fitnet"], expected, rtol=1e-5)
  np.testing.assert_allclose(total, 100 * expected, rtol=1e-5)
  with pytest.raises(ValueError, match="cannot be regressed"):
    objective.HintRegressor(teacher_shape=(3, 3, 4)).init(jax.random.key(0), s_feats["stage2"],
                                                          train=False)


def test_objective_is_jittable_and_differentiable():
  d = _default_config().distill
  d.kd_weight, d.nst.weight = 1.0, 10.0
  obj = objective.Objective.from_config(d)
  labels, (s_logits, t_logits), s_feats, t_feats = _outputs(4)
  grad = jax.jit(jax.grad(lambda f: obj(labels, s_logits, {"stage3": f}, t_logits, t_feats)[0]))(
      s_feats["stage3"])
  assert grad.shape == s_feats["stage3"].shape and np.all(np.isfinite(np.asarray(grad)))


def test_check_taps_names_the_valid_taps():
  d = _default_config().distill
  d.nst.weight, d.nst.layers = 1.0, "stage3:stage9"
  obj = objective.Objective.from_config(d)
  with pytest.raises(ValueError, match=r"teacher layer 'stage9' is not a tap.*Valid taps: pooled, stage3"):
    obj.check_taps(["stage3", "pooled"], ["stage3", "pooled"])
  with pytest.raises(ValueError, match="no teacher is configured"):
    obj.check_taps(["stage3"], None)
  objective.Objective.from_config(_default_config().distill).check_taps(["stage3"], None)


@pytest.mark.parametrize("edit,match", [
    (lambda d: setattr(d.nst, "kernel", "rbf"), r"Unknown kernel 'rbf'. Valid kernels"),
    (lambda d: setattr(d.nst, "resize", "crop"), r"unknown policy 'crop'. Valid policies: pool"),
    (lambda d: setattr(d.nst, "degree", 0), r"degree must be an integer >= 1"),
    (lambda d: setattr(d, "kd_weight", -1.0), r"kd_weight must be >= 0"),
    (lambda d: setattr(d, "temperature", 0.0), r"temperature must be > 0"),
    (lambda d: setattr(d.nst, "layers", "stage3"), r"must be student_tap:teacher_tap pairs"),
])
def test_bad_config_values_raise(edit, match):
  d = _default_config().distill
  edit(d)
  with pytest.raises(ValueError, match=match):
    objective.Objective.from_config(d)


def test_components_are_float32_for_bfloat16_features():
  d = _default_config().distill
  d.nst.weight = 1.0
  obj = objective.Objective.from_config(d)
  labels, (s_logits, t_logits), s_feats, t_feats = _outputs(5)
  bf16 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)
  total, components = obj(labels, bf16(s_logits), bf16(s_feats), bf16(t_logits), bf16(t_feats))
  assert total.dtype == jnp.float32 and components["nst"].dtype == jnp.float32


def test_parse_pairs():
  assert objective.parse_pairs("stage1:stage1, stage3:stage2", "k") == (("stage1", "stage1"),
                                                                        ("stage3", "stage2"))
  assert objective.parse_pairs("", "k") == ()
  assert objective.parse_pairs([("a", "b")], "k") == (("a", "b"),)
  assert objective.format_pairs((("a", "b"), ("c", "d"))) == "a:b,c:d"
  for bad in ("stage1", "stage1:stage2:stage3", "a:b,:c", [("a",)]):
    with pytest.raises(ValueError, match=r"k must be student_tap:teacher_tap pairs"):
      objective.parse_pairs(bad, "k")
