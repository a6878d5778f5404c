"""nst_jax.taps against Flax's own `capture_intermediates` on the unwrapped model: the same paths and
bitwise the same values, in both modes and under jit; the variable tree unchanged; unknown taps, models
without `train`, a module called twice, lifted transforms, zoo models, FitNet's regressor on a wrapped
model, and the listing on the command line."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import models, taps
from nst_jax import objective as objective_lib
from nst_jax.tools import taps as taps_cli

pytestmark = pytest.mark.usefixtures("fast_compilation")


class Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.relu(x)


class Net(nn.Module):
  """Named and unnamed submodules, nesting, BatchNorm, and one module (`shared`) called twice."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Block(4, name="layer1")(x, train)
    x = Block(6)(nn.max_pool(x, (2, 2), (2, 2)), train)  # Flax names it Block_0
    shared = nn.Dense(6, name="shared")
    x = shared(shared(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class NoTrain(nn.Module):
  """No `train` argument: it runs the same in both modes."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(5, (3, 3))(x))
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


class Remat(nn.Module):
  """A block inside a lifted transform (nn.remat)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.remat(Block, static_argnums=(2,))(4, name="block")(x, train)
    return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


X = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))


def _flax_intermediates(model, variables, x, train, jit=False):
  """{"a/b": (outputs of each call)} from Flax's own capture_intermediates on the bare model."""
  kwargs = {"train": train} if taps.takes_train(model) else {}

  def run(v, x):
    return model.apply(v, x, capture_intermediates=True, mutable=["intermediates", "batch_stats"], **kwargs)

  _, state = (jax.jit(run) if jit else run)(variables, x)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      state["intermediates"], is_leaf=lambda v: isinstance(v, tuple))[0]:
    keys = [p.key for p in path]
    assert keys[-1] == "__call__"
    if len(keys) > 1:  # The root's own output is the model's output, not a tap.
      flat["/".join(keys[:-1])] = leaf
  return flat


def _expected_taps(intermediates):
  out = {}
  for path, calls in intermediates.items():
    if len(calls) == 1:
      out[path] = calls[0]
    else:
      out.update({f"{path}#{i}": value for i, value in enumerate(calls)})
  return out


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_every_tap_equals_flax_capture_intermediates_bitwise(train, jit):
  model = Net()
  variables = model.init(jax.random.key(0), X)
  expected = _expected_taps(_flax_intermediates(model, variables, X, train, jit))
  assert {"layer1", "layer1/conv", "layer1/bn", "Block_0/conv", "shared#0", "shared#1", "Dense_0"} <= set(
      expected)
  wrapped = taps.Tapped(model, taps=tuple(expected))
  maybe_jit = jax.jit if jit else lambda f: f
  logits, features = maybe_jit(lambda v, x: wrapped.apply(v, x, train=train, mutable=["batch_stats"])[0])(
      variables, X)
  reference_logits, _ = maybe_jit(lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"]))(
      variables, X)
  np.testing.assert_array_equal(logits, reference_logits)
  assert list(features) == list(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(features[name], value, err_msg=name)


def test_taps_none_exposes_every_path_in_call_order():
  model = Net()
  variables = model.init(jax.random.key(0), X)
  _, features = taps.Tapped(model, taps=None).apply(variables, X)
  expected = _expected_taps(_flax_intermediates(model, variables, X, False))
  assert sorted(features) == sorted(expected)
  assert list(features).index("layer1/conv") < list(features).index("layer1") < list(features).index(
      "Block_0/conv")


def test_variables_are_the_bare_models_whatever_the_taps():
  model = Net()
  bare = model.init(jax.random.key(0), X)
  for chosen in ((), ("layer1",), ("Block_0/bn", "shared#1")):
    wrapped = taps.Tapped(model, taps=chosen).init(jax.random.key(0), X)
    assert jax.tree.structure(wrapped) == jax.tree.structure(bare)
    jax.tree.map(np.testing.assert_array_equal, wrapped, bare)
  # A checkpoint of the bare model applies to the wrapper directly.
  logits, features = taps.Tapped(model, taps=("layer1",)).apply(bare, X)
  np.testing.assert_array_equal(logits, model.apply(bare, X))
  assert list(features) == ["layer1"]


def test_unknown_tap_names_the_nearest_paths_and_lists_all():
  model = Net()
  variables = model.init(jax.random.key(0), X)
  with pytest.raises(ValueError) as error:
    taps.Tapped(model, taps=("layer1/cnv",)).apply(variables, X)
  message = str(error.value)
  assert "'layer1/cnv' is not a tap of Net. Did you mean: 'layer1/conv'" in message
  assert "Available taps: layer1/conv, layer1/bn, layer1, Block_0/conv" in message
  with pytest.raises(ValueError, match=r"'shared': Net calls that submodule 2 times .* shared#0, shared#1\."):
    taps.Tapped(model, taps=("shared",)).apply(variables, X)
  with pytest.raises(TypeError, match=r"write taps=\('layer1',\)"):
    taps.Tapped(model, taps="layer1").apply(variables, X)


def test_a_model_without_train_runs_the_same_in_both_modes():
  model = NoTrain()
  assert not taps.takes_train(model) and taps.takes_train(Net())
  variables = model.init(jax.random.key(0), X)
  wrapped = taps.Tapped(model, taps=("Conv_0",))
  eval_out = wrapped.apply(variables, X, train=False)
  train_out = wrapped.apply(variables, X, train=True)
  jax.tree.map(np.testing.assert_array_equal, eval_out, train_out)
  expected = _flax_intermediates(model, variables, X, False)["Conv_0"][0]
  np.testing.assert_array_equal(eval_out[1]["Conv_0"], expected)


def test_lifted_transform_is_an_error_and_modules_outside_it_are_taps():
  model = Remat()
  variables = model.init(jax.random.key(0), X)
  expected = _flax_intermediates(model, variables, X, False)
  _, features = taps.Tapped(model, taps=("head",)).apply(variables, X)
  np.testing.assert_array_equal(features["head"], expected["head"][0])
  for inside in ("block", "block/conv"):
    with pytest.raises(ValueError, match=rf"'{inside}' .* inside a lifted transform .* tap a module outside"):
      jax.jit(lambda v, t=inside: taps.Tapped(model, taps=(t,)).apply(v, X))(variables)
  assert "block" not in taps.list_taps(model, X.shape[1:])


def test_zoo_model_keeps_its_taps_and_gains_module_paths():
  model = models.get_model("resnet8", num_classes=10)
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  logits, own = model.apply(variables, x, train=False)
  wrapped = models.get_model("resnet8", num_classes=10, taps=("stage2", "layer2_0/conv1"))
  assert isinstance(wrapped, taps.Tapped)
  w_logits, features = wrapped.apply(variables, x, train=False)
  np.testing.assert_array_equal(w_logits, logits)
  assert list(features) == [*own, "layer2_0/conv1"]
  expected = _flax_intermediates(model, variables, x, False)["layer2_0/conv1"][0]
  np.testing.assert_array_equal(features["layer2_0/conv1"], expected)
  listing = taps.list_taps(model, (16, 16, 3))
  assert list(listing)[:len(own)] == list(own)
  assert listing["layer2_0/conv1"] == (1, *expected.shape[1:])


def test_list_taps_shapes_are_flaxs():
  model = Net()
  variables = model.init(jax.random.key(0), X)
  expected = _expected_taps(_flax_intermediates(model, variables, X, False))
  listing = taps.list_taps(model, X.shape[1:])
  assert sorted(listing) == sorted(expected)
  for name, value in expected.items():
    assert listing[name] == (1, *value.shape[1:]), name
  assert listing == taps.list_taps(taps.Tapped(model, taps=("layer1",)), X.shape[1:])
  assert "Block_0/conv  (1, 4, 4, 6)" in taps.format_taps(listing)


def test_fitnet_regressor_on_a_wrapped_model():
  """objective.HintStudent reads dtype and axis_name, and shares the wrapper's scope: the model's own
  variables stay at the top of the tree, the regressor next to them."""
  student = taps.Tapped(Net(), taps=("layer1",))
  assert student.dtype == jnp.float32 and student.axis_name is None
  objective = objective_lib.Objective(fitnet_weight=1.0, fitnet_layer=("layer1", "stage1"))
  hinted = objective_lib.student_module(student, objective, {"stage1": (8, 8, 7)})
  variables = hinted.init(jax.random.key(0), X, train=False)
  bare = Net().init(jax.random.key(0), X)
  assert set(variables["params"]) == {*bare["params"], "regressor"}
  _, features = hinted.apply(variables, X, train=False)
  assert features[objective_lib.HINT].shape == (2, 8, 8, 7)


def test_command_line_lists_the_taps(capsys):
  assert taps_cli.main(["resnet8", "--image_shape", "16,16,1"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].split() == ["stem", "(1,", "16,", "16,", "16)"]
  assert any(line.split()[0] == "layer3_0/conv2" and line.endswith("(1, 4, 4, 64)") for line in out)
  with pytest.raises(SystemExit) as done:
    taps_cli.main(["--help"])
  assert done.value.code == 0
  with pytest.raises(SystemExit) as done:
    taps_cli.main(["resnet9"])
  assert done.value.code == 2
  assert "Unknown model 'resnet9'" in capsys.readouterr().err
