"""The model zoo: teachers and students as Flax modules with named feature taps, chosen by name; and
models from the user's own package, by import path or by a registered name.

Every zoo model is a `flax.linen.Module` whose `__call__(x, train: bool)` takes NHWC images and returns
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

Your own models. Wherever a model name is accepted (`get_model`, the configs' `student.model` and
`teacher.model`, evaluation), two more forms are:

* an import path `"package.module:attr"`, `attr` being a `flax.linen.Module` class, a function that
  returns a Module, or a Module instance; the module must be importable (its folder on `PYTHONPATH`);
* a name added with `register(name, factory)` in this process (`factory` one of the same three kinds).

`num_classes`, `dtype` and `axis_name` are passed to a class or function that takes them (by that
name, or through `**kwargs`) and left out otherwise. Such a model returns what it returns (plain logits,
usually): `get_model` wraps it in `taps.Tapped`, which returns `(logits, {tap: array})` for the `taps`
asked for, named by module path (`"layer2/conv2"`, `"Conv_1"`), with the model's variable tree unchanged
(see `nst_jax.taps`). `source_record(name)` says which file an import path or a registered name came
from, with its SHA-256, for a run's `run.json`.
"""

import difflib
import hashlib
import importlib
import inspect
import os
import re
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nst_jax import taps as taps_lib

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

# Arguments given to a user's model only when it takes them (the zoo's constructors all do).
_OPTIONAL_ARGUMENTS = ("num_classes", "dtype", "axis_name")
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

Factory = Callable[..., nn.Module] | nn.Module
_registered: dict[str, Factory] = {}  # register()'s names, this process only.


def _zoo() -> dict[str, Callable[..., nn.Module]]:
  registry = {}
  for family in _FAMILIES:
    module = importlib.import_module(f"{__name__}.{family}")
    for name, ctor in module.MODELS.items():
      if name in registry:
        raise RuntimeError(f"Model name {name!r} is defined twice (second time in {family}).")
      registry[name] = ctor
  return registry


def is_zoo(name: str) -> bool:
  """Whether `name` is one of the zoo's own models (which return their named taps themselves)."""
  return name in _zoo()


def is_import_path(name: str) -> bool:
  """Whether `name` has the form of an import path, `package.module:attr`."""
  return ":" in name


def list_models() -> list[str]:
  """All model names, the zoo's and those added with `register`, sorted."""
  return sorted({*_zoo(), *_registered})


def register(name: str, factory: Factory, *, replace: bool = False) -> None:
  """Makes `name` a model name in this process: `factory` is a Module class, a function returning a
  Module, or a Module instance. A zoo name cannot be taken; a registered one only with `replace`."""
  if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", name):
    raise ValueError(f"register: a model name is letters, digits, '_', '.', '-', starting with a letter "
                     f"or '_'; got {name!r} (import paths need no registration).")
  if name in _zoo():
    raise ValueError(f"register: {name!r} is a model of the zoo; choose another name.")
  if name in _registered and _registered[name] is not factory and not replace:
    raise ValueError(f"register: {name!r} is registered already (with {_registered[name]!r}); pass "
                     "replace=True to replace it.")
  _check_factory(factory, f"register({name!r}, ...)")
  _registered[name] = factory


def unregister(name: str) -> None:
  """Removes a name added with `register` (a KeyError for any other)."""
  del _registered[name]


def _check_factory(factory, where: str) -> None:
  if isinstance(factory, nn.Module) or (inspect.isclass(factory) and issubclass(factory, nn.Module)):
    return
  if inspect.isclass(factory) or not callable(factory):
    raise ValueError(f"{where}: expected a flax.linen.Module class, a function returning a Module, or a "
                     f"Module instance; got {factory!r}.")


def _import(name: str) -> Factory:
  """The object an import path `package.module:attr` names, or a ValueError saying what is wrong."""
  if not _IMPORT_PATH.fullmatch(name):
    raise ValueError(f"Model import path {name!r} is not of the form 'package.module:attr' (an importable "
                     "module, a colon, a name in it).")
  module_name, attr = name.split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name and module_name.startswith(error.name):
      raise ValueError(f"Model {name!r}: no module named {error.name!r}; put the folder that holds it on "
                       "PYTHONPATH (or run from that folder).") from None
    raise ValueError(f"Model {name!r}: importing {module_name!r} failed: {error}") from error
  except Exception as error:  # noqa: BLE001 -- the user's module may raise anything while importing.
    raise ValueError(f"Model {name!r}: importing {module_name!r} failed: {type(error).__name__}: "
                     f"{error}") from error
  value = module
  for part in attr.split("."):
    if not hasattr(value, part):
      found = sorted(n for n, v in vars(module).items() if not n.startswith("_") and (
          inspect.isclass(v) and issubclass(v, nn.Module) or inspect.isfunction(v)))
      close = difflib.get_close_matches(attr, found, n=3, cutoff=0.6)
      hint = f" Did you mean: {', '.join(close)}?" if close else ""
      raise ValueError(f"Model {name!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has "
                       f"no attribute {attr!r}.{hint} Module classes and functions there: "
                       f"{', '.join(found) or 'none'}.")
    value = getattr(value, part)
  _check_factory(value, f"Model {name!r}")
  return value


def resolve(name: str) -> Factory:
  """What `name` builds: a zoo constructor, a registered factory or an imported one. An unknown name is
  a ValueError listing the valid names; a bad import path one that says why it does not import."""
  if is_import_path(name):
    return _import(name)
  zoo = _zoo()
  if name in zoo:
    return zoo[name]
  if name in _registered:
    return _registered[name]
  raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(list_models())}; or an import path "
                   "'package.module:attr'.")


def _accepted(factory, kwargs: dict) -> dict:
  """`kwargs` less the optional arguments that `factory` does not take."""
  try:
    parameters = inspect.signature(factory).parameters
  except (TypeError, ValueError):  # No signature to read: pass everything.
    return kwargs
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return kwargs
  return {k: v for k, v in kwargs.items() if k in parameters or k not in _OPTIONAL_ARGUMENTS}


def get_model(name: str, num_classes: int, *, taps: Sequence[str] | None = None, **kwargs) -> nn.Module:
  """Builds the model called `name`: a zoo name, a registered name or an import path (see the module
  docstring); an unknown name raises with the valid names.

  Args:
    num_classes: passed to every zoo model, and to a user's model that takes it.
    taps: feature taps by module path (`nst_jax.taps`). A user's model is always returned wrapped in
      `taps.Tapped` (with no taps when None), so it returns `(logits, features)` like the zoo's; a zoo
      model is wrapped only when `taps` is given, its own tap names staying valid.
    **kwargs: `dtype`, `axis_name` (passed on where the user's model takes them) and others.
  """
  factory = resolve(name)
  if is_zoo(name):
    model = factory(num_classes=num_classes, **kwargs)
    return model if taps is None else taps_lib.tap(model, taps)
  if isinstance(factory, nn.Module):
    model = factory.clone()
  else:
    model = factory(**_accepted(factory, {"num_classes": num_classes, **kwargs}))
    if not isinstance(model, nn.Module):
      raise ValueError(f"Model {name!r}: {factory!r} returned a {type(model).__name__}, not a "
                       "flax.linen.Module.")
  return taps_lib.tap(model, () if taps is None else taps)


def _file_record(path: str | None) -> dict:
  if not path or not os.path.isfile(path):
    return {"file": path, "sha256": None}
  with open(path, "rb") as f:
    return {"file": os.path.abspath(path), "sha256": hashlib.sha256(f.read()).hexdigest()}


def source_record(name: str) -> dict | None:
  """Where a user's model came from: {"name", "module", "file", "sha256"} for an import path or a
  registered name (the file of the module that defines its factory), None for a zoo model. For a run's
  `run.json`, so the run can be repeated with the same code."""
  if not name or is_zoo(name):
    return None
  factory = resolve(name)
  target = type(factory) if isinstance(factory, nn.Module) else factory
  module_name = name.split(":")[0] if is_import_path(name) else getattr(target, "__module__", None)
  module = importlib.import_module(module_name) if module_name else None
  path = getattr(module, "__file__", None)
  return {"name": name, "module": module_name, **_file_record(path)}


def variables_template(model: nn.Module, image_shape) -> dict:
  """The shapes and dtypes of `model`'s variables for images of `image_shape` (H, W, C); nothing computed."""
  sample = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)


def tap_shapes(model: nn.Module, image_shape) -> dict[str, tuple[int, ...]]:
  """Each feature tap of `model` -> its per-example shape, for images of `image_shape` (shapes only)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  _, features = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  return {name: f.shape[1:] for name, f in features.items()}
