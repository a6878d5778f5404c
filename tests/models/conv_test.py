"""Tests for nst_jax.models.conv: every convolution configuration of the zoo, value and both gradients,
against `jax.vjp` of `lax.conv_general_dilated` (the independent reference), under jit, vmap, jit over a
sharded batch and pmap; every gradient formulation of `groups == 1` convolutions on its own (strides,
asymmetric paddings) and through `conv2d` under each table choice; the choice itself (table lookup,
nearest batch, fallbacks, unreadable tables); the batch chunking of the copying forms; the implementation
switch; the platform choice; whole models and layers.Conv.

Errors are relative to the largest entry of the reference: max |ours - ref| / max |ref|. Float32:
1e-5. Bfloat16 (inputs, kernel and output cotangent rounded to bfloat16, results in bfloat16): 2e-2
against XLA's bfloat16 convolution and 1e-2 against the float32 convolution of the same rounded
inputs; bfloat16 has an 8-bit significand (one rounding of the result is 4e-3 relative) and the two
implementations sum in different orders.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nst_jax import models
from nst_jax.models import conv, layers, shufflenet
from tests.models import model_testing

F32_TOL, BF16_TOL, BF16_VS_F32_TOL = 1e-5, 2e-2, 1e-2

# (name, input NHWC, kernel HWIO, stride, padding, groups): the kinds of convolution the zoo builds,
# at small sizes (odd sizes too, where strides leave a remainder).
CONFIGS = [
    ("stem_3x3", (4, 8, 8, 3), (3, 3, 3, 8), 1, 1, 1),
    ("3x3_s1", (4, 8, 8, 8), (3, 3, 8, 16), 1, 1, 1),
    ("3x3_s1_wide", (2, 5, 5, 128), (3, 3, 128, 128), 1, 1, 1),
    ("3x3_s2", (4, 9, 9, 8), (3, 3, 8, 16), 2, 1, 1),
    ("1x1_s1", (4, 8, 8, 8), (1, 1, 8, 16), 1, 0, 1),
    ("1x1_s2", (4, 8, 8, 8), (1, 1, 8, 16), 2, 0, 1),
    ("7x7_s2_imagenet_stem", (2, 15, 15, 3), (7, 7, 3, 8), 2, 3, 1),
    ("depthwise_3x3_s1", (4, 8, 8, 12), (3, 3, 1, 12), 1, 1, 12),
    ("depthwise_3x3_s2", (4, 9, 9, 12), (3, 3, 1, 12), 2, 1, 12),
    ("grouped_1x1_g3", (4, 8, 8, 12), (1, 1, 4, 24), 1, 0, 3),
    ("explicit_padding_0", (4, 8, 8, 8), (3, 3, 8, 8), 1, 0, 1),
]
IDS = [c[0] for c in CONFIGS]


PARAMS = "name,x_shape,k_shape,stride,pad,groups"


def configs(*names):
  """pytest.param of the named CONFIGS entries."""
  return [pytest.param(*c, id=c[0]) for c in CONFIGS if c[0] in names]


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def arrays(x_shape, k_shape, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=x_shape), dtype), jnp.asarray(rng.normal(size=k_shape), dtype))


def xla_fn(stride, pad, groups):
  return lambda x, k: lax.conv_general_dilated(x, k, (stride, stride), ((pad, pad), (pad, pad)),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                               feature_group_count=groups)


def ours_fn(stride, pad, groups):
  return functools.partial(conv.conv2d, strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                           groups=groups)


def reference(x, kernel, stride, pad, groups, grad):
  """Value and (dx, dkernel) of `lax.conv_general_dilated` by `jax.vjp`: the independent reference."""
  out, vjp = jax.vjp(xla_fn(stride, pad, groups), x, kernel)
  return out, vjp(grad)


def ours(stride, pad, groups):
  """Jitted value and (dx, dkernel) of `conv.conv2d` ("auto") for cotangent `grad`."""

  def value_and_grads(x, kernel, grad):
    out, vjp = jax.vjp(ours_fn(stride, pad, groups), x, kernel)
    return out, vjp(grad)

  return jax.jit(value_and_grads)


def cotangent(x, kernel, stride, pad, groups, seed=1, lead=()):
  """A random output cotangent (with extra leading axes `lead`), in the input's dtype."""
  shape = jax.eval_shape(xla_fn(stride, pad, groups), x, kernel).shape
  return jnp.asarray(np.random.default_rng(seed).normal(size=(*lead, *shape)), x.dtype)


@pytest.mark.parametrize(PARAMS, configs(*IDS))
def test_float32_value_and_gradients_match_xla(name, x_shape, k_shape, stride, pad, groups):
  x, kernel = arrays(x_shape, k_shape)
  grad = cotangent(x, kernel, stride, pad, groups)
  out, (dx, dk) = ours(stride, pad, groups)(x, kernel, grad)
  ref_out, (ref_dx, ref_dk) = reference(x, kernel, stride, pad, groups, grad)
  assert out.shape == ref_out.shape and dx.shape == x.shape and dk.shape == kernel.shape
  for what, a, b in (("value", out, ref_out), ("dx", dx, ref_dx), ("dkernel", dk, ref_dk)):
    assert rel_err(a, b) < F32_TOL, (name, what, rel_err(a, b))


@pytest.mark.parametrize(PARAMS, configs("3x3_s1", "3x3_s1_wide", "3x3_s2", "depthwise_3x3_s1",
                                         "depthwise_3x3_s2", "grouped_1x1_g3"))
def test_bfloat16_value_and_gradients(name, x_shape, k_shape, stride, pad, groups):
  x, kernel = arrays(x_shape, k_shape, jnp.bfloat16)
  grad = cotangent(x, kernel, stride, pad, groups)
  out, (dx, dk) = ours(stride, pad, groups)(x, kernel, grad)
  assert out.dtype == dx.dtype == dk.dtype == jnp.bfloat16
  xla = reference(x, kernel, stride, pad, groups, grad)
  f32 = lambda a: a.astype(jnp.float32)
  exact = reference(f32(x), f32(kernel), stride, pad, groups, f32(grad))
  for what, a, b, c in zip(("value", "dx", "dkernel"), (out, dx, dk), (xla[0], *xla[1]),
                           (exact[0], *exact[1]), strict=True):
    assert rel_err(a, b) < BF16_TOL, (name, what, "vs XLA bf16", rel_err(a, b))
    assert rel_err(a, c) < BF16_VS_F32_TOL, (name, what, "vs float32", rel_err(a, c))


@pytest.mark.parametrize(PARAMS, configs("3x3_s2", "depthwise_3x3_s2", "grouped_1x1_g3"))
def test_vmap_over_inputs_and_kernels(name, x_shape, k_shape, stride, pad, groups):
  # A leading axis of 3 on the input and the kernel: each slice is its own convolution.
  x, kernel = arrays((3, *x_shape), (3, *k_shape))
  grad = cotangent(x[0], kernel[0], stride, pad, groups, lead=(3,))
  out, (dx, dk) = jax.jit(jax.vmap(ours(stride, pad, groups)))(x, kernel, grad)
  for i in range(3):
    ref_out, (ref_dx, ref_dk) = reference(x[i], kernel[i], stride, pad, groups, grad[i])
    for what, a, b in (("value", out[i], ref_out), ("dx", dx[i], ref_dx), ("dkernel", dk[i], ref_dk)):
      assert rel_err(a, b) < F32_TOL, (name, i, what, rel_err(a, b))


# (name, input NHWC, kernel HWIO, strides, explicit padding): groups == 1 configurations for the forward
# and gradient formulations on their own, with asymmetric paddings ("SAME" at stride 2 pads (0, 1)), a
# padding wider than the kernel reaches, and a batch of 5 (odd, prime) for the chunked forms.
FORM_CONFIGS = [
    ("3x3_s1", (4, 8, 8, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1))),
    ("3x3_s2_same", (3, 9, 8, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (0, 1))),
    ("5x5_s1_asym", (5, 7, 9, 4), (5, 5, 4, 6), (1, 1), ((2, 1), (0, 3))),
    ("3x2_s1x2", (2, 8, 9, 5), (3, 2, 5, 7), (1, 2), ((1, 0), (1, 1))),
    ("1x1_s1", (4, 8, 8, 8), (1, 1, 8, 16), (1, 1), ((0, 0), (0, 0))),
    ("1x1_s2_pad1", (4, 8, 8, 8), (1, 1, 8, 16), (2, 2), ((1, 1), (1, 1))),
    ("7x7_s2", (2, 15, 15, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
]
FORM_IDS = [c[0] for c in FORM_CONFIGS]


def _xla_grads(x, kernel, strides, padding, grad):
  _, vjp = jax.vjp(lambda x_, k_: conv.xla_conv(x_, k_, strides, padding, 1), x, kernel)
  return vjp(grad)


def _form_arrays(x_shape, k_shape, strides, padding):
  x, kernel = arrays(x_shape, k_shape)
  out = jax.eval_shape(lambda a, b: conv.xla_conv(a, b, strides, padding, 1), x, kernel)
  return x, kernel, jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)


@pytest.mark.parametrize("name,x_shape,k_shape,strides,padding", FORM_CONFIGS, ids=FORM_IDS)
def test_every_applicable_form_matches_xla(name, x_shape, k_shape, strides, padding, monkeypatch):
  # A 2 KiB bound on the copies of "concat" and "col2im", so that they run over chunks of the batch in
  # every configuration here but the copy-free 1x1 stride-1 one.
  monkeypatch.setattr(conv, "CONCAT_CHUNK_BYTES", 2048)
  x, kernel, grad = _form_arrays(x_shape, k_shape, strides, padding)
  ref_out = conv.xla_conv(x, kernel, strides, padding, 1)
  ref_dx, ref_dk = _xla_grads(x, kernel, strides, padding, grad)
  tried = []
  for form in conv.FWD_FORMS[1:]:
    out = jax.jit(conv.forward, static_argnums=(2, 3, 4))(x, kernel, strides, padding, form)
    assert out.shape == ref_out.shape and rel_err(out, ref_out) < F32_TOL, (name, form, rel_err(out, ref_out))
    tried.append(form)
  for form in conv.DW_FORMS[1:]:
    if conv.form_applies("dw", form, k_shape, strides, padding):
      dk = jax.jit(conv.kernel_grad, static_argnums=(2, 3, 4, 5))(x, grad, k_shape[:2], strides, padding,
                                                                    form)
      assert dk.shape == kernel.shape and rel_err(dk, ref_dk) < F32_TOL, (name, form, rel_err(dk, ref_dk))
      tried.append(form)
  for form in conv.DX_FORMS[1:]:
    if conv.form_applies("dx", form, k_shape, strides, padding):
      dx = jax.jit(conv.input_grad, static_argnums=(2, 3, 4, 5))(grad, kernel, x_shape[1:3], strides, padding,
                                                                   form)
      assert dx.shape == x.shape and rel_err(dx, ref_dx) < F32_TOL, (name, form, rel_err(dx, ref_dx))
      tried.append(form)
  # Which forms apply, by hand: "rows" at stride 1 with k_w > 1, "flip" at stride 1 with padding <= k - 1.
  expected = {"3x3_s1": ["concat", "taps", "rows", "concat", "flip", "col2im"],
              "5x5_s1_asym": ["concat", "taps", "rows", "concat", "flip", "col2im"],
              "1x1_s1": ["concat", "taps", "concat", "flip", "col2im"]}.get(name, ["concat", "taps", "concat",
                                                                                  "col2im"])
  assert tried == expected


def test_inapplicable_forms_are_refused_with_the_valid_ones():
  x, kernel, grad = _form_arrays((2, 8, 8, 4), (3, 3, 4, 4), (2, 2), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="Valid: taps, concat, rows"):
    conv.kernel_grad(x, grad, (3, 3), (2, 2), ((1, 1), (1, 1)), "rows")
  with pytest.raises(ValueError, match="Valid: col2im, flip"):
    conv.input_grad(grad, kernel, (8, 8), (2, 2), ((1, 1), (1, 1)), "flip")
  with pytest.raises(ValueError, match="Valid: taps"):
    conv.kernel_grad(x, grad, (3, 3), (2, 2), ((1, 1), (1, 1)), "im2col")
  with pytest.raises(ValueError, match="Valid: concat"):
    conv.forward(x, kernel, (2, 2), ((1, 1), (1, 1)), "winograd")


def test_concat_chunk_is_the_largest_divisor_within_the_bound():
  # 64 images of 1000 bytes under 4096: 4 (8 would be 8000); a prime batch has chunks of 1 or all of it.
  assert conv.concat_chunk(64, 1000, 4096) == 4
  assert conv.concat_chunk(64, 1000, 64_000) == 64
  assert conv.concat_chunk(7, 1000, 6999) == 1 and conv.concat_chunk(7, 1000, 7000) == 7
  assert conv.concat_chunk(6, 10**9, 4096) == 1  # One image at least, however large.
  # The default bound: 64 images at 32x32 with 64 channels, 3x3: 2.25 MiB of copy per image -> 2 at 8 MiB.
  assert conv.CONCAT_CHUNK_BYTES == 8 * 2**20
  assert conv.concat_chunk(64, 32 * 32 * 9 * 64 * 4) == 2
  assert conv.concat_chunk(64, 8 * 8 * 9 * 256 * 4) == 8  # 0.56 MiB per image.


def test_concat_over_the_bound_runs_as_a_scan_over_batch_chunks(monkeypatch):
  x, kernel, grad = _form_arrays((6, 8, 8, 4), (3, 3, 4, 8), (1, 1), ((1, 1), (1, 1)))
  # A fresh function per trace: JAX caches traces by function, and the bound is read when tracing.
  fn = lambda: lambda x_, g_: conv.kernel_grad(x_, g_, (3, 3), (1, 1), ((1, 1), (1, 1)), "concat")
  per_image = 8 * 8 * 9 * 4 * 4
  monkeypatch.setattr(conv, "CONCAT_CHUNK_BYTES", 2 * per_image)  # Chunks of 2 images: 3 iterations.
  jaxpr = jax.make_jaxpr(fn())(x, grad)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == 3
  concat = [e for e in scans[0].params["jaxpr"].jaxpr.eqns if e.primitive.name == "concatenate"]
  assert concat[0].outvars[0].aval.shape == (2, 8, 8, 36)  # The bounded copy: 2 images.
  _, ref_dk = _xla_grads(x, kernel, (1, 1), ((1, 1), (1, 1)), grad)
  assert rel_err(jax.jit(fn())(x, grad), ref_dk) < F32_TOL
  monkeypatch.setattr(conv, "CONCAT_CHUNK_BYTES", 6 * per_image)  # The whole batch fits: no scan.
  assert "scan" not in str(jax.make_jaxpr(fn())(x, grad))


@pytest.mark.parametrize("form", ["fwd concat", "dx col2im"])
def test_chunked_outputs_come_back_in_batch_order(form, monkeypatch):
  # Chunks of 2 images under 8 devices: blocks of 2 images per device, each step takes one image from
  # every block; the output must be put back in the input's order, sharded or not.
  x, kernel, grad = _form_arrays((32, 6, 6, 4), (3, 3, 4, 8), (1, 1), ((1, 1), (1, 1)))
  monkeypatch.setattr(conv, "CONCAT_CHUNK_BYTES", 6 * 6 * 9 * 4 * 4)
  ref_out = conv.xla_conv(x, kernel, (1, 1), ((1, 1), (1, 1)), 1)
  ref_dx, _ = _xla_grads(x, kernel, (1, 1), ((1, 1), (1, 1)), grad)
  if form == "fwd concat":
    fn, arg, ref = lambda: lambda a: conv.forward(a, kernel, (1, 1), ((1, 1), (1, 1))), x, ref_out
  else:
    fn = lambda: lambda g: conv.input_grad(g, kernel, (6, 6), (1, 1), ((1, 1), (1, 1)), "col2im")
    arg, ref = grad, ref_dx
  maps = [e for e in jax.make_jaxpr(fn())(arg).jaxpr.eqns if e.primitive.name == "scan"]
  assert len(maps) == 1 and maps[0].params["length"] == 4  # 32 images: 4 steps of 8.
  assert rel_err(jax.jit(fn())(arg), ref) < F32_TOL
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  assert rel_err(jax.jit(fn())(jax.device_put(arg, sharded)), ref) < F32_TOL


def test_concat_chunks_take_images_from_every_device_block(monkeypatch):
  # 16 images over the 8 devices: blocks of 2; a 1-image bound gives 2 steps of 8 images, one per block,
  # so that a sharded batch is never regrouped across devices inside the loop.
  x, kernel, grad = _form_arrays((16, 8, 8, 4), (3, 3, 4, 8), (1, 1), ((1, 1), (1, 1)))
  fn = lambda: lambda x_, g_: conv.kernel_grad(x_, g_, (3, 3), (1, 1), ((1, 1), (1, 1)), "concat")
  monkeypatch.setattr(conv, "CONCAT_CHUNK_BYTES", 8 * 8 * 9 * 4 * 4)
  jaxpr = jax.make_jaxpr(fn())(x, grad)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert jax.device_count() == 8 and len(scans) == 1 and scans[0].params["length"] == 2
  concat = [e for e in scans[0].params["jaxpr"].jaxpr.eqns if e.primitive.name == "concatenate"]
  assert concat[0].outvars[0].aval.shape == (8, 8, 8, 36)
  _, ref_dk = _xla_grads(x, kernel, (1, 1), ((1, 1), (1, 1)), grad)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  got = jax.jit(fn())(jax.device_put(x, sharded), jax.device_put(grad, sharded))
  assert rel_err(got, ref_dk) < F32_TOL


def _table(entries):
  """A table of {key: (fwd, dx, dw)}."""
  return {"machine": "test", "entries": {k: dict(zip(("fwd", "dx", "dw"), forms, strict=True))
                                         for k, forms in entries.items()}}


KEY_ARGS = ((64, 32, 32, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), jnp.float32)


def test_table_key_spells_out_the_configuration():
  assert conv.table_key(*KEY_ARGS) == "float32 64x32x32x64 3x3x64x64 s1x1 p1,1,1,1"
  assert conv.table_key((8, 9, 8, 3), (3, 3, 3, 16), (2, 2), ((1, 1), (0, 1)), jnp.bfloat16) == \
      "bfloat16 8x9x8x3 3x3x3x16 s2x2 p1,1,0,1"


def test_choose_reads_the_table_then_the_nearest_batch_then_the_default():
  key = lambda batch, dtype="float32": conv.table_key((batch, *KEY_ARGS[0][1:]), *KEY_ARGS[1:4], dtype)
  table = _table({key(64): ("concat", "flip", "rows"), key(16): ("xla", "col2im", "taps"),
                  key(64, "bfloat16"): ("xla", "xla", "xla")})
  with conv.use_table(table):
    choose = lambda batch, dtype=jnp.float32: conv.choose((batch, 32, 32, 64), *KEY_ARGS[1:4], dtype)
    assert choose(64) == conv.Choice(fwd="concat", dx="flip", dw="rows")
    assert choose(16) == conv.Choice(fwd="xla", dx="col2im", dw="taps")
    assert choose(40) == conv.Choice("concat", "flip", "rows")  # 64/40 = 1.6 < 40/16 = 2.5.
    assert choose(24) == conv.Choice("xla", "col2im", "taps")
    assert choose(64, jnp.bfloat16) == conv.Choice("xla", "xla", "xla")
    assert choose(8, jnp.float16) == conv.DEFAULT_CHOICE  # No float16 entries at any batch.
    # Another spatial size, kernel, stride or padding is another configuration: the default.
    assert conv.choose((64, 16, 16, 64), *KEY_ARGS[1:]) == conv.DEFAULT_CHOICE
    assert conv.choose(KEY_ARGS[0], KEY_ARGS[1], (1, 1), ((0, 0), (0, 0)), jnp.float32) == conv.DEFAULT_CHOICE
  # Forms a configuration cannot take become XLA's: "rows" and "flip" at stride 2 (this entry is
  # hand-made: a measured table never holds them).
  s2 = conv.table_key((4, 8, 8, 4), (3, 3, 4, 4), (2, 2), ((1, 1), (1, 1)), jnp.float32)
  with conv.use_table(_table({s2: ("concat", "flip", "rows")})):
    assert conv.choose((4, 8, 8, 4), (3, 3, 4, 4), (2, 2), ((1, 1), (1, 1)), jnp.float32) == conv.Choice(
        "concat", "xla", "xla")


def test_a_table_without_forward_forms_keeps_xla_forward():
  # Tables written before the forward pass had formulations of its own name only dx and dw.
  key = conv.table_key(*KEY_ARGS)
  with conv.use_table({"machine": "test", "entries": {key: {"dx": "col2im", "dw": "rows"}}}):
    assert conv.choose(*KEY_ARGS) == conv.Choice("xla", "col2im", "rows")


def test_shipped_table_covers_the_cifar_resnets_and_names_its_machine():
  table = json.loads(conv.TABLE_FILE.read_text())
  assert table["machine"] and table["command"].startswith("python bench/conv.py")
  loaded = conv.load_table(conv.TABLE_FILE)
  assert set(loaded) == set(table["entries"])
  assert all(form in conv.FORMS[part] for c in loaded.values() for part, form in c._asdict().items())
  # resnet8x4's 32x32 stage: 3x3 64 -> 64 at batch 64.
  assert conv.table_key(*KEY_ARGS) in loaded


@pytest.mark.parametrize("content,problem", [
    (None, "FileNotFoundError"),
    ("{not json", "JSONDecodeError"),
    ('{"entries": {"k": {"dx": "fft", "dw": "xla"}}}', "valid fwd: xla, concat, dx: xla, flip, col2im"),
])
def test_an_unusable_table_warns_once_and_falls_back_to_the_shipped_one(content, problem, tmp_path):
  path = tmp_path / "table.json"
  if content is not None:
    path.write_text(content)
  with pytest.warns(UserWarning, match=problem):
    loaded = conv.load_table(path)
  assert loaded == conv.load_table(conv.TABLE_FILE)


def test_table_from_the_environment_variable(tmp_path, monkeypatch):
  key = conv.table_key(*KEY_ARGS)
  path = tmp_path / "machine.json"
  path.write_text(json.dumps(_table({key: ("concat", "flip", "taps")})))
  monkeypatch.setenv(conv.TABLE_ENV, str(path))
  with conv.use_table(None):
    assert conv.choose(*KEY_ARGS) == conv.Choice("concat", "flip", "taps")
  monkeypatch.setenv(conv.TABLE_ENV, str(tmp_path / "missing.json"))
  with conv.use_table(None), pytest.warns(UserWarning, match="missing.json"):
    conv.choose(*KEY_ARGS)


@pytest.mark.parametrize("fwd,dx,dw", [(conv.FWD_FORMS[i % len(conv.FWD_FORMS)], dx, dw) for i, (dx, dw) in
                                       enumerate((dx, dw) for dx in conv.DX_FORMS for dw in conv.DW_FORMS)])
def test_conv2d_under_every_table_choice_matches_xla(fwd, dx, dw):
  # Through the custom VJP: each (dx, dw) pair the table can name, with each forward form in turn, on a
  # stride-1 configuration where all apply, and on a stride-2 one, where "flip" and "rows" fall back to
  # XLA's.
  for name, x_shape, k_shape, stride, pad, groups in [c for c in CONFIGS if c[0] in ("3x3_s1", "3x3_s2")]:
    x, kernel = arrays(x_shape, k_shape)
    grad = cotangent(x, kernel, stride, pad, groups)
    key = conv.table_key(x_shape, k_shape, (stride, stride), ((pad, pad), (pad, pad)), jnp.float32)
    with conv.use_table(_table({key: (fwd, dx, dw)})):
      out, (gx, gk) = ours(stride, pad, groups)(x, kernel, grad)
    ref_out, (ref_dx, ref_dk) = reference(x, kernel, stride, pad, groups, grad)
    for what, a, b in (("value", out, ref_out), ("dx", gx, ref_dx), ("dkernel", gk, ref_dk)):
      assert rel_err(a, b) < F32_TOL, (name, fwd, dx, dw, what, rel_err(a, b))


def _loss_grads(fn):
  """d/d(x, kernel) of sum(conv(x, kernel) * weights): a loss whose kernel gradient sums over the batch."""
  return jax.grad(lambda x, k, w: jnp.sum(fn(x, k) * w), argnums=(0, 1))


@pytest.mark.parametrize(PARAMS, configs("3x3_s1_wide", "1x1_s2", "depthwise_3x3_s2"))
def test_jit_over_a_sharded_batch(name, x_shape, k_shape, stride, pad, groups):
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  x, kernel = arrays((8, *x_shape[1:]), k_shape)
  weights = cotangent(x, kernel, stride, pad, groups)
  fn = ours_fn(stride, pad, groups)
  shard, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  step = jax.jit(_loss_grads(fn), in_shardings=(shard, rep, shard), out_shardings=(shard, rep))
  dx, dk = step(jax.device_put(x, shard), jax.device_put(kernel, rep), jax.device_put(weights, shard))
  _, (ref_dx, ref_dk) = reference(x, kernel, stride, pad, groups, weights)
  assert rel_err(dx, ref_dx) < F32_TOL, rel_err(dx, ref_dx)
  assert rel_err(dk, ref_dk) < F32_TOL, rel_err(dk, ref_dk)


@pytest.mark.parametrize(PARAMS, configs("3x3_s2", "depthwise_3x3_s2"))
def test_pmap_with_summed_kernel_gradient(name, x_shape, k_shape, stride, pad, groups):
  x, kernel = arrays((8, *x_shape[1:]), k_shape)
  weights = cotangent(x, kernel, stride, pad, groups)
  fn = ours_fn(stride, pad, groups)

  def per_device(x, k, w):
    dx, dk = _loss_grads(fn)(x, k, w)
    return dx, lax.psum(dk, "batch")

  split = lambda a: a.reshape(8, 1, *a.shape[1:])
  dx, dk = jax.pmap(per_device, axis_name="batch", in_axes=(0, None, 0))(split(x), kernel, split(weights))
  _, (ref_dx, ref_dk) = reference(x, kernel, stride, pad, groups, weights)
  assert rel_err(dx.reshape(x.shape), ref_dx) < F32_TOL
  assert rel_err(dk[0], ref_dk) < F32_TOL


def _kernel_grad_program(platform, fwd="xla"):
  x, kernel = arrays((2, 4, 4, 128), (3, 3, 128, 128))
  fn = lambda x_, k_: jnp.sum(conv.conv2d(x_, k_, (1, 1), ((1, 1), (1, 1))) ** 2)
  key = conv.table_key(x.shape, kernel.shape, (1, 1), ((1, 1), (1, 1)), x.dtype)
  with conv.use_table(_table({key: (fwd, "xla", "concat")})):
    exported = jax.export.export(jax.jit(jax.grad(fn, argnums=1)), platforms=(platform,))(x, kernel)
  return exported.mlir_module()


def test_platform_choice_cpu_uses_matrix_products_gpu_keeps_xla_convolution():
  # The kernel gradient is the only convolution-shaped work in this program besides the forward pass.
  cpu, gpu = _kernel_grad_program("cpu"), _kernel_grad_program("cuda")
  assert cpu.count("stablehlo.convolution") == 1 and "stablehlo.dot_general" in cpu
  assert gpu.count("stablehlo.convolution") == 2 and "stablehlo.dot_general" not in gpu
  # With the forward pass as "concat" too, the CPU program has no convolution left; the GPU one is the same.
  assert "stablehlo.convolution" not in _kernel_grad_program("cpu", "concat")
  assert _kernel_grad_program("cuda", "concat").count("stablehlo.convolution") == 2


def test_switch_selects_plain_xla_and_is_scoped():
  x, kernel = arrays((2, 8, 8, 8), (3, 3, 8, 8))
  # A fresh function per trace: JAX caches traces by function, and the choice is made when tracing.
  jaxpr = lambda: str(jax.make_jaxpr(lambda x_, k_: conv.conv2d(x_, k_, (1, 1), ((1, 1), (1, 1))))(x, kernel))
  assert conv.get_impl() == "auto" and conv.IMPLS == ("auto", "xla")
  assert "custom_vjp_call" in jaxpr()
  with conv.use_impl("xla"):
    assert conv.get_impl() == "xla"
    assert "custom_vjp_call" not in jaxpr() and "conv_general_dilated" in jaxpr()
  assert conv.get_impl() == "auto" and "custom_vjp_call" in jaxpr()
  with pytest.raises(ValueError, match="auto, xla"):
    conv.set_impl("fast")


@pytest.mark.parametrize("groups,kernel_size,strides,use_bias",
                         [(1, 3, 2, True), (12, 3, 1, True), (3, 1, 1, False)])
def test_layers_conv_matches_flax_conv_with_the_same_parameters(groups, kernel_size, strides, use_bias):
  # Same parameter tree as a plain flax.linen.Conv (so checkpoints carry over), same values and gradients.
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 9, 9, 12)), jnp.float32)
  module = layers.Conv(24 if groups == 3 else 12, kernel_size, strides, groups=groups, use_bias=use_bias)
  params = jax.jit(module.init)(jax.random.key(0), x)["params"]["Conv_0"]
  pad = kernel_size // 2
  plain = nn.Conv(module.features, (kernel_size, kernel_size), strides=(strides, strides),
                  padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=use_bias)
  plain_shapes = jax.eval_shape(plain.init, jax.random.key(0), x)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(plain_shapes)
  if use_bias:  # A non-zero bias, so that its effect on the value is checked too.
    params = {**params, "bias": jnp.linspace(-1.0, 1.0, module.features)}
  loss = lambda apply, p: jnp.sum(jnp.sin(apply(p, x)))
  value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, lambda p, x_: module.apply(
      {"params": {"Conv_0": p}}, x_))))(params)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(functools.partial(loss, lambda p, x_: plain.apply(
      {"params": p}, x_))))(params)
  scale = float(jnp.sum(jnp.abs(plain.apply({"params": params}, x))))
  assert abs(float(value) - float(ref_value)) <= 1e-5 * scale
  for name in params:
    assert rel_err(grads[name], ref_grads[name]) < F32_TOL, name


class _ShuffleUnits(nn.Module):
  """Two ShuffleNet v1 units (stride 2, then 1): grouped 1x1 and depthwise 3x3 convolutions, both strides."""

  @nn.compact
  def __call__(self, x, train: bool):
    x, _ = shufflenet.ShuffleV1Unit(24, strides=2, groups=3, first_groups=3)(x, train)
    x, _ = shufflenet.ShuffleV1Unit(48, strides=1, groups=3, first_groups=3)(x, train)
    return jnp.mean(x, axis=(1, 2)), {}


@pytest.mark.parametrize("name", ["resnet8", "shufflev1_units"])
def test_whole_model_gradient_equals_the_xla_convolution_model(name):
  # resnet8: 3x3 and 1x1 convolutions at strides 1 and 2; the ShuffleNet units: grouped and depthwise.
  # BatchNorm in inference mode (a fixed affine of random running statistics): in training mode, at the
  # tiny batches of a test, its gradient amplifies float32 rounding to ~1e-2 in either implementation
  # (measured: both 5% from float64 on a batch of 4), which would hide what this test is about.
  model = models.get_model(name, num_classes=10) if name == "resnet8" else _ShuffleUnits()
  x = model_testing.images(batch=2, size=16, channels=3 if name == "resnet8" else 24)
  variables = model_testing.numpy_variables(model, x)
  out_features = 10 if name == "resnet8" else 48
  weights = jnp.asarray(np.random.default_rng(4).normal(size=(2, out_features)), jnp.float32)
  loss = lambda params: jnp.sum(model.apply({**variables, "params": params}, x, train=False)[0] * weights)
  grads = {}
  for impl in conv.IMPLS:
    with conv.use_impl(impl):
      grads[impl] = jax.jit(jax.grad(loss))(variables["params"])
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(grads["xla"])]
  for path, a, b in zip(paths, jax.tree.leaves(grads["auto"]), jax.tree.leaves(grads["xla"]), strict=True):
    assert rel_err(a, b) < F32_TOL, (path, rel_err(a, b))
