"""The model registry: every zoo name resolves, unknown names list the valid ones; a user's models by import
path (class, function, instance) and by registered name, bad paths and attributes, source records."""

import hashlib
import sys
import textwrap
import uuid

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import models, taps

# Every registered name, in the order `list_models` promises (Python's string order: capitals first,
# "resnet110" before "resnet14"), written out by hand. By family: RepDistiller's CIFAR networks
# (resnet8 ... resnet110, resnet8x4, resnet32x4, wrn_*, vgg*, MobileNetV2, ShuffleV1, ShuffleV2,
# ResNet50), the paper's CIFAR networks (preact_resnet164, preact_resnet1001, inception_bn_cifar) and the
# ImageNet ones (inception_bn, preact_resnet101, resnet18, resnet34, resnet50, resnet101).
EXPECTED_SORTED = [
    "MobileNetV2", "ResNet50", "ShuffleV1", "ShuffleV2",
    "inception_bn", "inception_bn_cifar",
    "preact_resnet1001", "preact_resnet101", "preact_resnet164",
    "resnet101", "resnet110", "resnet14", "resnet18", "resnet20", "resnet32", "resnet32x4", "resnet34",
    "resnet44", "resnet50", "resnet56", "resnet8", "resnet8x4",
    "vgg11", "vgg13", "vgg16", "vgg19", "vgg8",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
]


def test_list_models_is_every_name_sorted():
  assert models.list_models() == EXPECTED_SORTED


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet9'. Valid names: .*resnet8x4.*wrn_40_2"):
    models.get_model("resnet9", num_classes=10)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_common_interface(name):
  """(logits, features) with the common tap names, the dtype and axis_name options accepted."""
  model = models.get_model(name, num_classes=7, dtype=jnp.bfloat16, axis_name=None)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  logits, features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(x.shape), train=False),
                                    variables)
  assert logits.shape == (2, 7) and logits.dtype == jnp.bfloat16
  assert {"stage1", "stage1_preact", "stage2", "stage3", "pooled"} <= set(features)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))


# ----------------------------------------------------------------------------------------------------
# Models from the user's own package: import paths and registered names.

USER_MODULE = '''
import flax.linen as nn


class Net(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


class Fixed(nn.Module):
  """Takes no num_classes, dtype or axis_name: always 3 classes."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def make(num_classes, width=4, **kwargs):
  assert set(kwargs) <= {"dtype", "axis_name"}, kwargs
  return Net(num_classes=num_classes)


def make_plain():
  return Fixed()


instance = Fixed()
not_a_model = 3


def returns_a_number():
  return 3
'''

X = np.ones((2, 8, 8, 3), np.float32)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  """A package-less module `user_models_<n>` in a folder on sys.path, as a user's PYTHONPATH puts it."""
  name = f"user_models_{uuid.uuid4().hex[:8]}"
  (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
  monkeypatch.syspath_prepend(str(tmp_path))
  yield name, tmp_path / f"{name}.py"
  sys.modules.pop(name, None)


def test_import_path_forms_build_wrapped_models(user_module):
  name, _ = user_module
  for attr, classes in (("Net", 7), ("make", 7), ("make_plain", 3), ("instance", 3)):
    model = models.get_model(f"{name}:{attr}", num_classes=7, dtype=jnp.float32, axis_name=None)
    assert isinstance(model, taps.Tapped), attr
    variables = model.init(jax.random.key(0), X)
    logits, features = model.apply(variables, X, train=False)
    assert logits.shape == (2, classes) and features == {}, attr
    # The wrapper adds no scope: the variables are the bare model's.
    bare = model.model.init(jax.random.key(0), X)
    assert jax.tree.structure(bare) == jax.tree.structure(variables), attr


def test_import_path_with_taps_and_train_mode(user_module):
  name, _ = user_module
  model = models.get_model(f"{name}:Net", num_classes=5, taps=("conv", "bn"))
  variables = model.init(jax.random.key(0), X)
  bare = model.model
  (logits, features), _ = model.apply(variables, X, train=True, mutable=["batch_stats"])
  (ref_logits, state) = bare.apply(variables, X, train=True, mutable=["batch_stats", "intermediates"],
                                   capture_intermediates=True)
  np.testing.assert_array_equal(logits, ref_logits[0] if isinstance(ref_logits, tuple) else ref_logits)
  np.testing.assert_array_equal(features["bn"], state["intermediates"]["bn"]["__call__"][0])
  np.testing.assert_array_equal(features["conv"], state["intermediates"]["conv"]["__call__"][0])


@pytest.mark.parametrize("attr,match", [
    ("Nett", r"has no attribute 'Nett'. Did you mean: Net\? Module classes and functions there: Fixed, Net, "
             r"make, make_plain, returns_a_number"),
    ("not_a_model", r"expected a flax.linen.Module class, a function returning a Module, or a Module "
                    r"instance; got 3"),
    ("returns_a_number", r"returned a int, not a flax.linen.Module"),
])
def test_bad_attribute(user_module, attr, match):
  name, _ = user_module
  with pytest.raises(ValueError, match=match):
    models.get_model(f"{name}:{attr}", num_classes=10)


@pytest.mark.parametrize("path,match", [
    ("no_such_package.models:Net", r"no module named 'no_such_package'; put the folder that holds it on "
                                   r"PYTHONPATH"),
    ("a.b:", r"is not of the form 'package.module:attr'"),
    ("a:b:c", r"is not of the form 'package.module:attr'"),
])
def test_bad_import_paths(path, match):
  with pytest.raises(ValueError, match=match):
    models.get_model(path, num_classes=10)


def test_a_module_that_fails_to_import_says_why(tmp_path, monkeypatch):
  (tmp_path / "broken_user_models.py").write_text("import flax.linen as nn\nraise RuntimeError('boom')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ValueError, match=r"importing 'broken_user_models' failed: RuntimeError: boom"):
    models.resolve("broken_user_models:Net")


def test_register_adds_a_name(user_module):
  name, _ = user_module
  module = sys.modules.get(name) or __import__(name)
  models.register("my_net", module.Net)
  try:
    assert "my_net" in models.list_models() and not models.is_zoo("my_net")
    model = models.get_model("my_net", num_classes=4)
    assert isinstance(model, taps.Tapped) and model.model.num_classes == 4
    models.register("my_net", module.Net)  # the same factory again: nothing to replace
    with pytest.raises(ValueError, match=r"'my_net' is registered already .* replace=True"):
      models.register("my_net", module.make)
    models.register("my_net", module.make, replace=True)
    assert models.get_model("my_net", num_classes=2).model.num_classes == 2
  finally:
    models.unregister("my_net")
  assert "my_net" not in models.list_models()
  with pytest.raises(ValueError, match=r"'resnet8' is a model of the zoo"):
    models.register("resnet8", module.Net)
  with pytest.raises(ValueError, match=r"a model name is letters"):
    models.register("pkg.mod:Net", module.Net)
  with pytest.raises(ValueError, match=r"expected a flax.linen.Module class"):
    models.register("not_a_model", dict)


def test_source_record_names_the_file_and_its_hash(user_module):
  name, path = user_module
  record = models.source_record(f"{name}:Net")
  assert record == {"name": f"{name}:Net", "module": name, "file": str(path),
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
  assert models.source_record("resnet8") is None and models.source_record("") is None
  models.register("recorded_net", sys.modules[name].make)
  try:
    assert models.source_record("recorded_net")["file"] == str(path)
  finally:
    models.unregister("recorded_net")


def test_zoo_models_are_unchanged_without_taps():
  assert not isinstance(models.get_model("resnet8", 10), taps.Tapped)
  assert isinstance(models.get_model("resnet8", 10, taps=()), taps.Tapped)
  assert isinstance(models.get_model("resnet8", 10), nn.Module)
