"""The model zoo: teachers and students as Flax modules with named feature taps, chosen by name.

Every model is a `flax.linen.Module` whose `__call__(x, train: bool)` takes NHWC images and returns
`(logits, features)`, where `features` maps tap names to arrays. Tap names common to all families:

* `stem`: the output of the input stem (after its activation).
* `stage{i}` / `stage{i}_preact`: the output of stage i (1-based) after / before its final activation.
  Pre-activation networks (`wrn_*`, `preact_resnet*`) end a stage with a bare residual sum, which is
  their `stage{i}` (RepDistiller's default feature for them); their `stage{i}_preact` is that sum
  through the BatchNorm that consumes it, before its ReLU (RepDistiller's `preact=True` feature; for the
  last stage the final BatchNorm, the official NST teacher layer), and `stage{i}_relu` is after it.
  MobileNetV2's stages end in a linear bottleneck: its `_preact` is the stage output itself.
* `pooled`: the pooled penultimate vector fed to the classifier, (B, D).

Families document further taps in their module docstrings. Every constructor accepts `num_classes`,
`dtype` (compute dtype; parameters stay float32) and `axis_name` (BatchNorm's cross-device axis for the
pmap path, None by default).

    model = models.get_model("resnet8x4", num_classes=100)
    variables = model.init(jax.random.key(0), x, train=False)
    logits, features = model.apply(variables, x, train=False)
"""

import importlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Each family module defines `MODELS: dict[str, Callable[..., nn.Module]]`.
_FAMILIES = (
    "cifar_resnet",
    "wrn",
    "vgg",
    "mobilenetv2",
    "shufflenet",
    "resnetv2",
    "resnet",
    "preact_resnet",
    "inception_bn",
)


def _registry() -> dict[str, Callable[..., nn.Module]]:
  registry = {}
  for family in _FAMILIES:
    module = importlib.import_module(f"{__name__}.{family}")
    for name, ctor in module.MODELS.items():
      if name in registry:
        raise RuntimeError(f"Model name {name!r} is defined twice (second time in {family}).")
      registry[name] = ctor
  return registry


def list_models() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_registry())


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds the model registered under `name`; an unknown name raises with the valid names."""
  registry = _registry()
  if name not in registry:
    raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(sorted(registry))}.")
  return registry[name](num_classes=num_classes, **kwargs)


def variables_template(model: nn.Module, image_shape) -> dict:
  """The shapes and dtypes of `model`'s variables for images of `image_shape` (H, W, C); nothing computed."""
  sample = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)


def tap_shapes(model: nn.Module, image_shape) -> dict[str, tuple[int, ...]]:
  """Each feature tap of `model` -> its per-example shape, for images of `image_shape` (shapes only)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  _, features = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  return {name: f.shape[1:] for name, f in features.items()}
