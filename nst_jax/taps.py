"""Feature taps for any `flax.linen` module, by module path, without changing the module.

`Tapped(model, taps)` is a `flax.linen.Module` that runs `model` unchanged and returns
`(output, {tap: array})`. A tap is named by the path of a submodule as Flax names it, its parts joined
by "/" (`"layer2/conv2"`, `"Conv_1"`, `"blocks_3"`), and its value is what that submodule's `__call__`
returned; this is the path under which `model.apply(..., capture_intermediates=True)` files the same
value in its `intermediates` collection. A submodule called more than once per forward pass has one tap
per call, `"path#0"`, `"path#1"`, ...

    model = taps.Tapped(MyNet(num_classes=10), taps=("layer2/conv2", "head"))
    variables = model.init(jax.random.key(0), x)                   # exactly MyNet's own variables
    logits, features = model.apply(variables, x, train=False)     # features["layer2/conv2"], ...

* Variables: the wrapper shares its model's scope (`nn.share_scope`), so its variable tree is the
  model's own, entry for entry, whatever taps it exposes: a checkpoint of the bare model (or of the
  wrapper with other taps) loads into it.
* `train`: passed on to the model when its `__call__` has a `train` parameter; a model without one runs
  the same for `train=True` and `train=False` (its BatchNorm and dropout are the model's own business).
* A model that already returns `(output, {name: array})` (the nst_jax zoo's models) keeps its features;
  taps add module paths to them, and its own feature names may be asked for as taps too.
* An unknown tap is a ValueError naming the nearest paths and listing every tappable one.
  `list_taps(model, image_shape)` lists them with their output shapes; so does
  `python -m nst_jax.tools.taps MODEL` for a zoo name, a registered name or an import path
  `package.module:attr`.
* Taps are recorded with `nn.intercept_methods` while the model runs, so they are the values of the same
  computation (no second forward pass) under `jit`, `grad` and `vmap` alike. A module made by a lifted
  transform (`nn.scan`, `nn.remat`, `nn.vmap`), and everything inside it, runs in a trace of its own and
  cannot be tapped: tap a module outside it (asking for one is a ValueError that says so).

`Tapped` also exposes its model's `dtype` and `axis_name` (float32 and None where the model has none),
so it can stand wherever an nst_jax zoo model does (`objective.HintStudent` reads them).
"""

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

Array = jax.Array
SEPARATOR = "/"  # Between the parts of a module path.
CALL_MARK = "#"  # "path#i": the i-th call of a submodule called more than once.


def takes_train(model: nn.Module) -> bool:
  """Whether `model.__call__` has a parameter named `train`."""
  return "train" in inspect.signature(type(model).__call__).parameters


def _features_of(output) -> tuple[Any, Mapping[str, Any] | None]:
  """(output, features) of a model that returns `(output, {name: array})`, else (output, None)."""
  if (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], Mapping)
      and all(isinstance(k, str) for k in output[1])):
    return output[0], output[1]
  return output, None


def nearest(name: str, valid: Sequence[str], n: int = 3) -> list[str]:
  """The names of `valid` closest to `name` (difflib), best first; also by the last path part."""
  close = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.6)
  if not close:
    leaf = name.rsplit(SEPARATOR, 1)[-1]
    close = [v for v in valid if difflib.get_close_matches(leaf, [v.rsplit(SEPARATOR, 1)[-1]], cutoff=0.8)]
  return close[:n]


def unknown_tap_message(tap: str, available: Sequence[str], where: str) -> str:
  """One line: `tap` is not a tap of `where`, the nearest names, and every available one."""
  close = nearest(tap, available)
  hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
  listed = ", ".join(available) if available else "(none: the model calls no submodules)"
  return f"{tap!r} is not a tap of {where}.{hint} Available taps: {listed}."


class Tapped(nn.Module):
  """`model`, returning `(output, {tap: array})` for `taps` (see the module docstring).

  Attributes:
    model: any `flax.linen.Module`; it is not changed.
    taps: module paths ("layer2/conv2"), "path#i" for the i-th call of a submodule called several times,
      or names of the features the model returns itself. None exposes every tappable path (what
      `list_taps` reads); the empty tuple none.
  """

  model: nn.Module
  taps: tuple[str, ...] | None = ()

  def setup(self):
    # The model's variables live at the wrapper's own level: no scope of its own, same tree as the model.
    nn.share_scope(self, self.model)

  @property
  def dtype(self):
    return getattr(self.model, "dtype", jnp.float32)

  @property
  def axis_name(self):
    return getattr(self.model, "axis_name", None)

  def __call__(self, x, train: bool = False, **kwargs):
    if isinstance(self.taps, str):
      raise TypeError(f"Tapped.taps must be a sequence of tap names, got the string {self.taps!r}; "
                      f"write taps=({self.taps!r},).")
    if takes_train(self.model):
      kwargs["train"] = train
    wanted = None if self.taps is None else set(self.taps)
    prefix = self.model.path
    trace = jax_core.get_opaque_trace_state()
    calls: dict[str, list] = {}  # Every submodule path called, in call order -> its outputs (or None).
    lifted: list[str] = []  # Wanted paths computed in a trace of their own (inside a lifted transform).

    def record(next_fun, args, kw, context):
      output = next_fun(*args, **kw)
      if context.method_name == "__call__" and context.module.scope is not None:
        path = context.module.path
        if len(path) > len(prefix) and path[:len(prefix)] == prefix:
          name = SEPARATOR.join(path[len(prefix):])
          outputs = calls.setdefault(name, [])
          keep = wanted is None or name in wanted or any(w.startswith(name + CALL_MARK) for w in wanted)
          if keep and jax_core.get_opaque_trace_state() != trace:
            lifted.append(name)
            keep = False
          outputs.append(output if keep else None)
      return output

    with nn.intercept_methods(record):
      output = self.model(x, **kwargs)
    output, own = _features_of(output)
    available = _tap_names(calls, own)
    features = dict(own or {})
    if self.taps is None:
      names = [n for n in available if n not in features and n.split(CALL_MARK)[0] not in lifted]
    else:
      names = list(self.taps)
    for name in names:
      if own is not None and name in own:
        continue
      path, _, index = name.partition(CALL_MARK)
      if path in lifted:
        raise ValueError(f"Tap {name!r} of {type(self.model).__name__} is computed inside a lifted "
                         "transform (nn.scan, nn.remat, nn.vmap, ...), in a trace of its own: tap a module "
                         "outside it (one that consumes its output, or its parent) instead.")
      outputs = calls.get(path)
      if not index and outputs is not None and len(outputs) > 1:
        raise ValueError(f"Tap {name!r}: {type(self.model).__name__} calls that submodule {len(outputs)} "
                         f"times per forward pass; name one call: "
                         f"{', '.join(f'{name}{CALL_MARK}{i}' for i in range(len(outputs)))}.")
      if name not in available or outputs is None:
        raise ValueError(unknown_tap_message(name, available, type(self.model).__name__))
      features[name] = outputs[int(index)] if index else outputs[0]
    if self.taps is not None:
      features = {n: features[n] for n in (own or {})} | {n: features[n] for n in self.taps}
    return output, features


def _tap_names(calls: Mapping[str, list], own: Mapping[str, Any] | None) -> list[str]:
  """The names a `Tapped` accepts: the model's own features, then each path ("path#i" when called more
  than once), in call order."""
  names = list(own or {})
  for path, outputs in calls.items():
    names += [path] if len(outputs) == 1 else [f"{path}{CALL_MARK}{i}" for i in range(len(outputs))]
  return names


def tap(model: nn.Module, taps: Sequence[str] | None = ()) -> Tapped:
  """`Tapped(model, taps)`, with `taps` as a tuple (a single string is one tap)."""
  if isinstance(taps, str):
    taps = (taps,)
  return Tapped(model=model, taps=None if taps is None else tuple(taps))


def _unwrap(model: nn.Module) -> nn.Module:
  return model.model if isinstance(model, Tapped) else model


def list_taps(model: nn.Module, image_shape: Sequence[int], *, train: bool = False,
              dtype=jnp.float32) -> dict[str, Any]:
  """Every tap of `model` (a `Tapped` model's inner model) for one input of per-example shape
  `image_shape` -> the shape of its value with the batch axis (a pytree of shapes for a submodule
  that returns several arrays). Order: the model's own features, then submodule paths in the order
  their calls return. Shapes only: nothing is computed (`jax.eval_shape`)."""
  everything = Tapped(model=_unwrap(model), taps=None)
  x = jax.ShapeDtypeStruct((1, *image_shape), dtype)

  names = []

  def run(x):
    (_, features), _ = everything.init_with_output(jax.random.key(0), x, train=train)
    names.extend(features)
    return list(features.values())  # A list keeps the call order (a dict's pytree order is sorted).

  values = jax.eval_shape(run, x)
  shapes = [jax.tree.map(lambda a: tuple(a.shape), value) for value in values]
  return dict(zip(names, shapes, strict=True))


def format_taps(listing: Mapping[str, Any]) -> str:
  """`list_taps`'s result as aligned text lines: path, then shape."""
  width = max((len(name) for name in listing), default=0)
  return "\n".join(f"{name:<{width}}  {shape}" for name, shape in listing.items())
