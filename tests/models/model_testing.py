"""Helpers shared by the model tests: cheap variables, traced shapes, NumPy BatchNorm and common checks.

Everything here avoids `model.init` and un-jitted work on large models, which take seconds to tens of
seconds on CPU: variables are drawn in NumPy into the structure `jax.eval_shape` traces, and the large
models are only traced. Model-specific checks (tap definitions, block layouts) stay in the test files.

This is not a test module, so pytest does not rewrite its `assert`s: they carry their own messages.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nst_jax.models import layers

BATCH = 2
EPS = 1e-5  # `layers.BatchNorm`'s epsilon (PyTorch's).


def images(seed=0, batch=BATCH, size=32, channels=3):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels), jnp.float32)


def image_spec(size=32, batch=BATCH, channels=3):
  """An input for tracing only."""
  return jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)


def num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def tap_shapes(features):
  return {k: v.shape for k, v in features.items()}


def with_stage_aliases(shapes, suffixes=("_preact",)):
  """`shapes` plus, for every `stage{i}` tap, the same shape again under `stage{i}{suffix}`."""
  out = dict(shapes)
  for key in [k for k in shapes if k.startswith("stage") and k[len("stage"):].isdigit()]:
    for suffix in suffixes:
      out[key + suffix] = shapes[key]
  return out


def init_shapes(model, *args, **kwargs):
  """The structure, shapes and dtypes of `model.init(key, *args, train=False, **kwargs)`, traced only."""
  return jax.eval_shape(functools.partial(model.init, train=False, **kwargs), jax.random.key(0), *args)


def numpy_variables(model, *args, seed=0, init_like=False, **kwargs):
  """Variables with the model's structure, drawn in NumPy from `seed`.

  Kernels of convolutions (and of scanned stacks of them) are He-normal with fan-out. By default biases,
  BatchNorm affines and running statistics are random too, which makes the BatchNorm checks stricter
  than the fresh (1, 0, 0, 1), and dense kernels have std 1/sqrt(fan_in). `init_like=True` gives what
  `init` leaves instead (zero biases, BatchNorm scale 1 / bias 0, running mean 0 / var 1), with He
  fan-out dense kernels as well: the values the tests that ask for it were written against.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      if len(shape) >= 4:
        fan = shape[-1] * int(np.prod(shape[-4:-2]))
      else:
        fan = shape[-1] if init_like else 2 * shape[0]
      value = rng.normal(0.0, np.sqrt(2.0 / fan), shape)
    elif init_like:
      value = np.full(shape, 1.0 if name in ("scale", "var") else 0.0)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.uniform(-0.2, 0.2, shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, init_shapes(model, *args, **kwargs))


def trace(model, size=32, batch=BATCH, train=False, mutable=False):
  """Traces init and one apply: (variables, outputs), shapes and dtypes only.

  The outputs are `(logits, features)`, or `((logits, features), state)` with `mutable`.
  """

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=train, mutable=mutable)

  return jax.eval_shape(init_and_apply, image_spec(size, batch))


def check_trace(model, param_count, logits_shape, taps, size=32):
  """Checks the parameter count, the logits' shape and every tap's shape; returns the traced variables."""
  variables, (logits, features) = trace(model, size)
  count = num_params(variables["params"])
  assert count == param_count, f"{count:,} parameters, expected {param_count:,}"
  assert logits.shape == logits_shape, f"logits {logits.shape}, expected {logits_shape}"
  got = tap_shapes(features)
  assert got == taps, f"taps {got}, expected {taps}"
  return variables


@functools.cache  # One compilation per model and mode across the tests that share them.
def apply_fn(model, train, capture=None, jit=True):
  """`model.apply` with mutable batch statistics: `f(variables, x) -> ((logits, features), state)`.

  `capture`: a module path, e.g. ("conv1",), whose output lands in `state["intermediates"]`.
  """
  kwargs = dict(mutable=["batch_stats"])
  if capture is not None:
    kwargs = dict(mutable=["batch_stats", "intermediates"],
                  capture_intermediates=lambda mdl, _: mdl.path == capture)
  fn = functools.partial(model.apply, train=train, **kwargs)
  return jax.jit(fn) if jit else fn


def captured(run, train):
  """The output of the module at `run`'s capture path in its eval or train step."""
  tree = run["train_state" if train else "eval_state"]["intermediates"]
  for key in run["capture"]:
    tree = tree[key]
  return tree["__call__"][0]


def run_eval_and_train(model, x, variables, capture=None, jit=True):
  """One evaluation and one training step of `model` on `x`, for a module-scoped fixture to share."""
  eval_out, eval_state = apply_fn(model, False, capture, jit)(variables, x)
  train_out, train_state = apply_fn(model, True, capture, jit)(variables, x)
  return dict(model=model, variables=variables, x=x, capture=capture, jit=jit, eval=eval_out,
              eval_state=eval_state, train=train_out, train_state=train_state)


def mode_outputs(run, train, every_bn_moves=False):
  """(logits, features) of `run`'s eval or train step, after the checks on the mode itself.

  Evaluation leaves the running statistics exactly as they were; training gives other logits (and, with
  `every_bn_moves`, moves every BatchNorm's running statistics).
  """
  variables = run["variables"]
  if not train:
    jax.tree.map(np.testing.assert_array_equal, run["eval_state"]["batch_stats"],
                 variables["batch_stats"])
    return run["eval"]
  logits, features = run["train"]
  if every_bn_moves:
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), run["train_state"]["batch_stats"],
                           variables["batch_stats"])
    unchanged = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(changed) if not v]
    assert not unchanged, f"running statistics kept in training: {unchanged}"
  assert not np.allclose(logits, run["eval"][0], atol=1e-3), "train and eval logits agree"
  return logits, features


def bn_variables(tree, path):
  """The `layers.BatchNorm` variables at a "/"-separated module path of a params or batch_stats tree."""
  for key in path.split("/"):
    tree = tree[key]
  return tree["BatchNorm_0"]


def batch_norm(x, mean, var, bn_params=None):
  """NumPy BatchNorm; without `bn_params` the affine is the identity (scale 1, bias 0)."""
  y = (x - mean) / np.sqrt(var + EPS)
  if bn_params is None:
    return y
  return y * bn_params.get("scale", 1.0) + bn_params["bias"]


def check_batch_norm(run, out, x, path, train=False, relu=False, tol=1e-4, var_rtol=1e-5):
  """`out`, from `run`'s eval or train step, is the BatchNorm at `path` (then a ReLU if `relu`) of `x`.

  Evaluation normalises with the running statistics. Training normalises with the batch mean and biased
  variance and takes one momentum-0.1 step of the running ones towards the batch mean and the unbiased
  variance (PyTorch's rule).
  """
  # The reference in float64 throughout (NumPy would hand a mixed expression to JAX, in float32).
  x = np.asarray(x, np.float64)
  running, params = (jax.tree.map(functools.partial(np.asarray, dtype=np.float64),
                                  bn_variables(run["variables"][col], path))
                     for col in ("batch_stats", "params"))
  if train:
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  else:
    mean, var = running["mean"], running["var"]
  expected = batch_norm(x, mean, var, params)
  if relu:
    expected = np.maximum(expected, 0)
  np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
  if train:
    new = bn_variables(run["train_state"]["batch_stats"], path)
    n = x.size // x.shape[-1]
    np.testing.assert_allclose(new["mean"], 0.9 * running["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * running["var"] + 0.1 * var * n / (n - 1), rtol=var_rtol)


def check_stem_batch_norm(run, train, path, conv=None, tol=1e-4, var_rtol=1e-5, every_bn_moves=False):
  """`mode_outputs` plus `check_batch_norm` of the `stem` tap: ReLU(BatchNorm at `path`) of the stem
  convolution's output `conv` (by default the one `run` captured). Returns (logits, features)."""
  logits, features = mode_outputs(run, train, every_bn_moves)
  conv = captured(run, train) if conv is None else conv
  check_batch_norm(run, features["stem"], conv, path, train, relu=True, tol=tol, var_rtol=var_rtol)
  return logits, features


def conv_nhwc(x, kernel, stride=1):
  """Plain NumPy convolution (HWIO kernel, "same" zero padding for odd kernels) in float64."""
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  pad = kh // 2
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      out = out + x[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :] @ kernel[i, j]
  return out


def check_relu(features, preact, out):
  """Tap `out` is the ReLU of tap `preact`, which is signed (so the ReLU did something)."""
  pre = np.asarray(features[preact])
  np.testing.assert_array_equal(features[out], np.maximum(pre, 0))
  assert pre.min() < 0, f"{preact} has no negative value"


def check_head(features, logits, variables, last, fc, atol=1e-5):
  """`pooled` is the spatial mean of tap `last`, and the logits the dense layer `fc` applied to it."""
  np.testing.assert_allclose(features["pooled"], np.asarray(features[last]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  dense = variables["params"][fc]["Dense_0"]
  np.testing.assert_allclose(logits, np.asarray(features["pooled"]) @ dense["kernel"] + dense["bias"],
                             rtol=1e-4, atol=atol)


def _check_bfloat16_dtypes(params, batch_stats, logits, features):
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params)), "parameters not all float32"
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(batch_stats)), "statistics not all float32"
  assert logits.dtype == jnp.bfloat16, f"logits are {logits.dtype}"
  assert all(f.dtype == jnp.bfloat16 for f in features.values()), "features not all bfloat16"


def check_bfloat16(model, run, ref_atol=None, jit=True):
  """`model` (built with dtype=bfloat16) keeps float32 variables and computes in bfloat16.

  Evaluates on `run`'s (float32) variables and inputs, jitted or not as `jit` says; with `ref_atol` the
  logits must match `run`'s float32 ones to rtol 0.1 and that atol.
  """
  shapes = init_shapes(model, run["x"])
  apply = functools.partial(model.apply, train=False)
  logits, features = (jax.jit(apply) if jit else apply)(run["variables"], run["x"])
  _check_bfloat16_dtypes(shapes["params"], shapes["batch_stats"], logits, features)
  if ref_atol is not None:
    np.testing.assert_allclose(np.asarray(logits, np.float32), run["eval"][0], rtol=0.1, atol=ref_atol)


def check_bfloat16_traced(model, size):
  """`check_bfloat16` for models too large to run here: init and one training step, traced only."""
  variables, ((logits, features), state) = trace(model, size, train=True, mutable=["batch_stats"])
  _check_bfloat16_dtypes(variables["params"], state["batch_stats"], logits, features)


def check_jit_matches_eager(run, tol=1e-4):
  model, variables, x = run["model"], run["variables"], run["x"]
  eager = model.apply(variables, x, train=False)
  jitted = run["eval"] if run["jit"] else jax.jit(functools.partial(model.apply, train=False))(variables, x)
  # XLA fuses differently under jit: equal up to float32 rounding.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=tol, atol=tol), jitted, eager)


def check_axis_name_syncs_batch_norm(model, single, x, variables, jit=False):
  """`model` (axis_name="batch") on two devices with half the batch each matches `single` on one device
  with the whole batch (run jitted or not as `jit` says), logits and updated statistics."""
  mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2])

  def step(v, x):
    (logits, _), state = model.apply(v, x, train=True, mutable=["batch_stats"])
    return logits, state

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
  logits, state = jax.jit(sharded)(
      jax.device_put(variables, NamedSharding(mesh, P())),
      jax.device_put(x, NamedSharding(mesh, P("batch"))))
  (whole, _), whole_state = apply_fn(single, True, jit=jit)(variables, x)
  np.testing.assert_allclose(logits, whole, rtol=1e-4, atol=1e-4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), state,
               whole_state)


def check_axis_name_reaches_every_batch_norm(model, count, axis_name="batch"):
  """Every one of the `count` BatchNorms of `model` gets `axis_name`.

  Recorded from the module calls while tracing init, so a BatchNorm built without `axis_name` shows up
  without paying for a cross-device run.
  """
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
      seen.append(context.module.axis_name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    init_shapes(model, image_spec())
  assert seen == [axis_name] * count, f"BatchNorm axis names {seen}, expected {count} x {axis_name!r}"
