"""Tests for nst_jax.models.preact_resnet: shapes, exact parameter counts, scan, BatchNorm, dtype, jit.

Reference parameter counts are `sum(p.numel() for p in m.parameters() if p.requires_grad)` of a minimal
PyTorch re-statement of the architecture (tornadomeet/ResNet `symbol_resnet.py` units, He et al.'s
CIFAR stem; PyTorch 2.13), and agree with osmr/imgclsmob's published tables: PreResNet-164(BN)
1,703,258 and PreResNet-1001 10,327,706 on CIFAR-10 (He et al. print 1.7 M and 10.2 M), PreResNet-101
44,541,608 on ImageNet, to which `preact_resnet101` adds the 3 offsets of its `bn_data` input BatchNorm.
Only CIFAR models at 32 px run for real; preact_resnet1001 and the 224 px model are only traced.
Outside this suite, preact_resnet164 (32 px) and preact_resnet101 (64 px), unrolled, reproduced that
PyTorch re-statement's logits and every tap after a weight transfer: relative error < 1e-6 in eval
mode, < 7e-4 in train mode (batch 2); `test_scan_matches_unrolled_units` ties the scanned layout to it.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nst_jax.models import preact_resnet

EPS = 1e-5

# name: (input size, num_classes, PyTorch parameter count); see the module docstring.
PARAM_COUNTS = {
    "preact_resnet164": (32, 10, 1_703_258),
    "preact_resnet1001": (32, 10, 10_327_706),
    "preact_resnet101": (224, 1000, 44_541_611),
}

_CIFAR_SHAPES = {
    "stem": (2, 32, 32, 16),
    "stage1": (2, 32, 32, 64),
    "stage2": (2, 16, 16, 128),
    "stage3": (2, 8, 8, 256),
    "final_bn": (2, 8, 8, 256),
    "final_relu": (2, 8, 8, 256),
    "pooled": (2, 256),
}
_IMAGENET_SHAPES = {
    "stem": (2, 112, 112, 64),
    "stage1": (2, 56, 56, 256),
    "stage2": (2, 28, 28, 512),
    "stage3": (2, 14, 14, 1024),
    "stage4": (2, 7, 7, 2048),
    "final_bn": (2, 7, 7, 2048),
    "final_relu": (2, 7, 7, 2048),
    "pooled": (2, 2048),
}


def _expected_taps(name):
  shapes = dict(_IMAGENET_SHAPES if name == "preact_resnet101" else _CIFAR_SHAPES)
  for key in [k for k in shapes if k.startswith("stage")]:
    shapes[f"{key}_preact"] = shapes[f"{key}_relu"] = shapes[key]
  return shapes


def _variables(model, x, seed=0):
  """Init-equivalent variables without running `init` (its RNG compiles slowly on CPU).

  BatchNorm scale 1 / bias 0 and running mean 0 / var 1 as after `init`; He-normal kernels.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    kind = path[-1].key
    if kind in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    if kind in ("bias", "mean"):
      return np.zeros(leaf.shape, np.float32)
    fan_out = leaf.shape[-1] * int(np.prod(leaf.shape[-4:-2])) if leaf.ndim >= 4 else leaf.shape[-1]
    return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_out)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _images(seed=0, batch=2, size=32):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _batch_norm(x, mean, var):
  return (x - mean) / np.sqrt(var + EPS)


def _trace(model, size):
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  return jax.eval_shape(init_and_apply, x)


def test_registry_names():
  assert sorted(preact_resnet.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  size, num_classes, count = PARAM_COUNTS[name]
  start = time.perf_counter()
  variables, (logits, features) = _trace(preact_resnet.MODELS[name](num_classes=num_classes), size)
  seconds = time.perf_counter() - start
  assert _num_params(variables["params"]) == count
  assert logits.shape == (2, num_classes)
  assert {k: v.shape for k, v in features.items()} == _expected_taps(name)
  # Scanned stages trace ResNet-1001 in well under a second (unrolled: ~10 s per trace here).
  assert seconds < 30, f"tracing {name} took {seconds:.1f} s"


def test_unrolled_layout_has_the_same_parameters():
  scanned, _ = _trace(preact_resnet.MODELS["preact_resnet164"](num_classes=10), 32)
  unrolled, _ = _trace(preact_resnet.MODELS["preact_resnet164"](num_classes=10, scan_blocks=False), 32)
  assert _num_params(unrolled["params"]) == _num_params(scanned["params"]) == 1_703_258
  assert scanned["params"]["stage1_units"]["unit"]["conv2"]["Conv_0"]["kernel"].shape == (
      17, 3, 3, 16, 16)
  assert unrolled["params"]["stage1_unit18"]["conv2"]["Conv_0"]["kernel"].shape == (3, 3, 16, 16)


@functools.cache
def _apply_fn(model, train):
  return jax.jit(functools.partial(model.apply, train=train, mutable=["batch_stats"]))


def _unstack(scanned, stage_sizes):
  """Scanned variables -> the unrolled layout (`stage{i}_units[j - 2]` -> `stage{i}_unit{j}`)."""
  out = {k: v for k, v in scanned.items() if not k.endswith("_units")}
  for stage, n in enumerate(stage_sizes, start=1):
    for j in range(2, n + 1):
      out[f"stage{stage}_unit{j}"] = jax.tree.map(lambda a, j=j: a[j - 2],
                                                   scanned[f"stage{stage}_units"]["unit"])
  return out


def test_scan_matches_unrolled_units():
  kwargs = dict(stage_sizes=(3, 2), stage_features=(32, 64), num_classes=10)
  scanned = preact_resnet.PreActResNet(**kwargs)
  unrolled = preact_resnet.PreActResNet(scan_blocks=False, **kwargs)
  x = _images(seed=3, size=16)
  variables = _variables(scanned, x)
  as_unrolled = {col: _unstack(v, (3, 2)) for col, v in variables.items()}
  for train in (False, True):
    out_s, state_s = _apply_fn(scanned, train)(variables, x)
    out_u, state_u = _apply_fn(unrolled, train)(as_unrolled, x)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), out_s, out_u)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 _unstack(state_s["batch_stats"], (3, 2)), state_u["batch_stats"])


@pytest.fixture(scope="module")
def resnet164():
  model = preact_resnet.MODELS["preact_resnet164"](num_classes=10)
  x = _images()
  return model, _variables(model, x), x


def test_eval_uses_running_stats_and_leaves_them(resnet164):
  model, variables, x = resnet164
  (logits, features), state = _apply_fn(model, False)(variables, x)
  assert {k: v.shape for k, v in features.items()} == _expected_taps("preact_resnet164")
  # Fresh running statistics (mean 0, var 1), BN scale 1 and bias 0.
  for i in (1, 2, 3):  # `_preact` is the consuming BatchNorm (next stage's first, or the final one).
    np.testing.assert_allclose(features[f"stage{i}_preact"],
                               _batch_norm(np.asarray(features[f"stage{i}"]), 0, 1), rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
  _check_taps(features, logits, variables)


def test_train_uses_batch_stats_and_updates_them(resnet164):
  model, variables, x = resnet164
  (logits, features), state = _apply_fn(model, True)(variables, x)
  stage3 = np.asarray(features["stage3"], np.float64)
  mean, var = stage3.mean(axis=(0, 1, 2)), stage3.var(axis=(0, 1, 2))
  np.testing.assert_allclose(features["final_bn"], _batch_norm(stage3, mean, var),
                             rtol=1e-4, atol=1e-4)
  stats = state["batch_stats"]["bn1"]["BatchNorm_0"]
  # PyTorch momentum 0.1 from (0, 1); the variance tolerance covers biased vs unbiased estimates.
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-3)
  # Every unit's statistics moved, the scanned (stacked) ones included.
  scanned = state["batch_stats"]["stage2_units"]["unit"]["bn1"]["BatchNorm_0"]["mean"]
  assert scanned.shape == (17, 128)
  assert np.all(np.abs(np.asarray(scanned)).max(axis=1) > 0)
  _check_taps(features, logits, variables)

  (eval_logits, _), _ = _apply_fn(model, False)(variables, x)
  assert not np.allclose(logits, eval_logits, atol=1e-3)


def _check_taps(features, logits, variables):
  for i in (1, 2, 3):
    # No activation ends a pre-activation stage: `_preact` is the consuming BatchNorm's output.
    np.testing.assert_array_equal(features[f"stage{i}_relu"],
                                  np.maximum(features[f"stage{i}_preact"], 0))
  np.testing.assert_array_equal(features["stage3_preact"], features["final_bn"])
  assert np.asarray(features["stage3"]).min() < 0
  np.testing.assert_array_equal(features["final_relu"], np.maximum(features["final_bn"], 0))
  np.testing.assert_allclose(features["pooled"], np.asarray(features["final_relu"]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  fc = variables["params"]["fc1"]["Dense_0"]
  np.testing.assert_allclose(logits, np.asarray(features["pooled"]) @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-5)


def test_input_batch_norm_learns_only_an_offset():
  # MXNet's fix_gamma=True: bn_data has an offset but no scale, and normalises the raw input.
  model = preact_resnet.PreActResNet(stage_sizes=(1, 1, 1, 1), stage_features=(16, 16, 32, 32),
                                     num_classes=10, stem_features=16, imagenet_stem=True,
                                     input_bn=True)
  x = 50.0 + 20.0 * _images(seed=4)
  variables = _variables(model, x)
  assert jax.tree.map(jnp.shape, variables["params"]["bn_data"]) == {"BatchNorm_0": {"bias": (3,)}}
  apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats", "intermediates"],
                                    capture_intermediates=lambda mdl, _: mdl.name == "bn_data"))
  (_, features), state = apply(variables, x)
  assert features["stem"].shape == (2, 16, 16, 16)
  assert features["stage4"].shape == (2, 1, 1, 32)
  normalised = np.asarray(state["intermediates"]["bn_data"]["__call__"][0])
  raw = np.asarray(x, np.float64)
  np.testing.assert_allclose(normalised, _batch_norm(raw, raw.mean(axis=(0, 1, 2)),
                                                     raw.var(axis=(0, 1, 2))), rtol=1e-4, atol=1e-4)


def test_bfloat16_activations_float32_params():
  model = preact_resnet.MODELS["preact_resnet101"](num_classes=1000, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=True, mutable=["batch_stats"])

  variables, ((logits, features), state) = jax.eval_shape(init_and_apply, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state["batch_stats"]))
  assert logits.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.bfloat16 for f in features.values())


def test_jit_matches_eager(resnet164):
  model, variables, x = resnet164
  jitted, _ = _apply_fn(model, False)(variables, x)
  eager = model.apply(variables, x, train=False)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), jitted, eager)


def test_axis_name_syncs_batch_norm_across_devices():
  # Two devices with half the batch each must match one device with the whole batch, scanned units
  # included.
  kwargs = dict(stage_sizes=(2, 2), stage_features=(16, 32), num_classes=10)
  model = preact_resnet.PreActResNet(axis_name="batch", **kwargs)
  single = preact_resnet.PreActResNet(**kwargs)
  x = _images(seed=2, batch=4, size=8)
  variables = _variables(single, x)
  mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2])

  def step(v, x):
    (logits, _), state = model.apply(v, x, train=True, mutable=["batch_stats"])
    return logits, state

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
  logits, state = jax.jit(sharded)(
      jax.device_put(variables, NamedSharding(mesh, P())),
      jax.device_put(x, NamedSharding(mesh, P("batch"))))
  (whole, _), whole_state = _apply_fn(single, True)(variables, x)
  np.testing.assert_allclose(logits, whole, rtol=1e-4, atol=1e-4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), state,
               whole_state)
