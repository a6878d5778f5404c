"""Tests of nst_jax.losses against the NumPy references of tests/np_reference.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nst_jax import kernels, losses
from tests import np_reference as ref

KERNELS = [("linear", {}), ("polynomial", {}), ("polynomial", {"degree": 3, "c": 0.5}),
           ("gaussian", {}), ("gaussian", {"sigma2": 0.5})]


def _maps(*shapes, seed=0, relu=False):
  rng = np.random.default_rng(seed)
  out = [rng.normal(size=s).astype(np.float32) for s in shapes]
  return [np.maximum(o, 0) for o in out] if relu else out


def test_adaptive_pool_hand_computed():
  # 5 -> 3 cells cover [0, 2), [1, 4), [3, 5) (PyTorch's floor/ceil rule); 4 -> 2 is block means.
  x = np.arange(20, dtype=np.float32).reshape(1, 5, 4, 1)  # x[h, w] = 4h + w
  got = np.asarray(losses.adaptive_avg_pool(jnp.asarray(x), 3, 2))[0, :, :, 0]
  rows = [np.mean([0, 1]), np.mean([1, 2, 3]), np.mean([3, 4])]
  cols = [0.5, 2.5]
  expected = np.array([[4 * r + c for c in cols] for r in rows])
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("s_shape,t_shape,resize", [
    ((2, 8, 6, 3), (2, 4, 3, 5), "pool"),        # divisible: block means
    ((2, 7, 5, 3), (2, 3, 4, 2), "pool"),        # non-divisible, and each axis on its own
    ((2, 4, 3, 3), (2, 8, 6, 5), "interpolate"),
    ((2, 3, 5, 3), (2, 7, 4, 2), "interpolate"),
])
def test_match_spatial_against_numpy(s_shape, t_shape, resize):
  s, t = _maps(s_shape, t_shape)
  got_s, got_t = losses.match_spatial(jnp.asarray(s), jnp.asarray(t), resize)
  exp_s, exp_t = ref.match(s, t, resize)
  np.testing.assert_allclose(got_s, exp_s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_t, exp_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel,params", KERNELS)
@pytest.mark.parametrize("s_shape,t_shape,resize", [
    ((3, 4, 6, 5), (3, 4, 6, 7), "pool"),          # C_s != C_t, non-square
    ((2, 8, 4, 6), (2, 4, 2, 3), "pool"),          # mismatched spatial sizes
    ((2, 3, 2, 4), (2, 6, 4, 3), "interpolate"),
])
def test_nst_matches_numpy(kernel, params, unbiased, s_shape, t_shape, resize):
  s, t = _maps(s_shape, t_shape, seed=1, relu=True)
  expected = ref.nst(s, t, kernel, resize, unbiased, **params)
  got = losses.nst(s, t, kernel=kernel, resize=resize, unbiased=unbiased, **params)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("hw,channels", [((4, 4), (16, 12)), ((8, 6), (10, 8))])
def test_nst_fast_forms_equal_vmapped_form(hw, channels, unbiased):
  # (4x4 = 16 positions vs 16 + 12 channels: below the 0.75 (n + m) switch, spatial Gram);
  # (48 positions vs 18 channels: above it, channel Gram).
  s, t = _maps((2, *hw, channels[0]), (2, *hw, channels[1]), seed=2, relu=True)
  expected_auto = "spatial" if hw == (4, 4) else "gram"
  assert kernels.choose_method("polynomial", *channels, hw[0] * hw[1]) == expected_auto
  for kernel, params in KERNELS:
    reference = losses.nst(s, t, kernel=kernel, unbiased=unbiased, method="vmap", **params)
    for method in ("auto", *kernels.applicable_methods(kernel, **params)):
      got = losses.nst(s, t, kernel=kernel, unbiased=unbiased, method=method, **params)
      np.testing.assert_allclose(got, reference, rtol=2e-5, atol=1e-7, err_msg=f"{kernel} {method}")


@pytest.mark.parametrize("kernel,params", KERNELS)
def test_nst_properties(kernel, params):
  s, t = _maps((2, 5, 3, 6), (2, 5, 3, 6), seed=3, relu=True)
  f = lambda a, b: float(losses.nst(a, b, kernel=kernel, **params))
  value = f(s, t)
  assert value >= -1e-6
  assert abs(f(t, t)) < 1e-6
  np.testing.assert_allclose(f(t, s), value, rtol=1e-5, atol=1e-7)  # symmetric
  perm = np.random.default_rng(0).permutation(6)
  np.testing.assert_allclose(f(s[..., perm], t), value, rtol=1e-5, atol=1e-7)  # channel order
  scale = np.array([0.1, 3.0, 1.0, 7.5, 2.0, 0.5], np.float32)
  np.testing.assert_allclose(f(s * scale, t), value, rtol=1e-5, atol=1e-7)  # per-channel scale


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel,params", KERNELS)
def test_nst_gradient_finite_for_dead_channels_and_maps(kernel, params, dtype):
  s, t = _maps((2, 4, 4, 6), (2, 4, 4, 5), seed=4, relu=True)
  s[..., 2] = 0.0  # a dead student channel
  t[..., 0] = 0.0  # a dead teacher channel
  cases = [(s, t), (np.zeros_like(s), t), (s, np.zeros_like(t)), (np.zeros_like(s), np.zeros_like(t))]
  for a, b in cases:
    for method in kernels.applicable_methods(kernel, **params):
      value, grad = jax.value_and_grad(
          lambda a, b, method=method: losses.nst(a, b, kernel=kernel, method=method, **params))(
              jnp.asarray(a, dtype), jnp.asarray(b, dtype))
      assert grad.dtype == dtype
      assert np.isfinite(float(value)), (method, value)
      assert np.all(np.isfinite(np.asarray(grad, np.float32))), method


@pytest.mark.parametrize("kernel,params", KERNELS)
def test_no_gradient_reaches_teacher(kernel, params):
  s, t = _maps((2, 4, 4, 6), (2, 4, 4, 5), seed=5, relu=True)
  for method in kernels.applicable_methods(kernel, **params):
    g_t = jax.grad(lambda a, b, m=method: losses.nst(a, b, kernel=kernel, method=m, **params),
                   argnums=1)(s, t)
    assert not np.any(np.asarray(g_t))
  logits = _maps((4, 10), (4, 10), seed=6)
  assert not np.any(np.asarray(jax.grad(losses.kd, argnums=1)(*logits)))
  assert not np.any(np.asarray(jax.grad(losses.attention, argnums=1)(s, t[..., :3])))
  assert not np.any(np.asarray(jax.grad(losses.fitnet, argnums=1)(s, s + 1)))


@pytest.mark.parametrize("kernel,params", KERNELS)
def test_nst_grad_matches_finite_differences_float64(kernel, params):
  with jax.enable_x64(True):
    s, t = (a.astype(np.float64) for a in _maps((2, 3, 3, 4), (2, 3, 3, 5), seed=7, relu=True))
    s = s + 0.1  # keep every channel away from zero, where normalisation has a kink
    if kernel == "gaussian" and "sigma2" not in params:
      params = {"sigma2": 0.3}  # the heuristic is under stop_gradient: check the frozen kernel
    for method in kernels.applicable_methods(kernel, **params):
      f = lambda a, m=method: losses.nst(a, t, kernel=kernel, method=m, **params)
      check_grads(f, (s,), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)


def test_nst_jit_does_not_retrace_for_repeated_shapes():
  traces = []

  @jax.jit
  def step(s, t):
    traces.append(1)
    return jax.value_and_grad(losses.nst)(s, t)

  for seed in range(3):
    step(*_maps((2, 4, 4, 6), (2, 4, 4, 5), seed=seed))
  assert len(traces) == 1


def test_bfloat16_inputs_are_computed_in_float32():
  s, t = _maps((2, 6, 6, 8), (2, 6, 6, 8), seed=8, relu=True)
  s_bf, t_bf = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = losses.nst(s_bf, t_bf)
  assert got.dtype == jnp.float32
  # The same bf16 values, as float64 in NumPy: agreement to float32 precision, far below bf16's 4e-3.
  expected = ref.nst(np.asarray(s_bf, np.float64), np.asarray(t_bf, np.float64))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  for loss in (losses.kd, losses.cross_entropy):
    assert loss(jnp.ones((2, 3), jnp.bfloat16), *(
        [jnp.zeros((2, 3), jnp.bfloat16)] if loss is losses.kd else [jnp.array([0, 1])])).dtype == (
            jnp.float32)


def test_kd_matches_numpy():
  s, t = _maps((5, 7), (5, 7), seed=9)
  for T in (1.0, 4.0):
    np.testing.assert_allclose(losses.kd(s * 3, t * 3, temperature=T), ref.kd(s * 3, t * 3, T),
                               rtol=1e-5)
  assert abs(float(losses.kd(s, s))) < 1e-6


@pytest.mark.parametrize("s_shape,t_shape,resize,p", [
    ((2, 4, 6, 5), (2, 4, 6, 3), "pool", 2),
    ((2, 8, 8, 5), (2, 4, 4, 3), "pool", 2),
    ((2, 4, 4, 5), (2, 8, 8, 3), "interpolate", 2),
    ((2, 4, 4, 5), (2, 4, 4, 3), "pool", 1),
])
def test_attention_matches_numpy(s_shape, t_shape, resize, p):
  s, t = _maps(s_shape, t_shape, seed=10)
  np.testing.assert_allclose(losses.attention(s, t, p=p, resize=resize),
                             ref.attention(s, t, p, resize), rtol=1e-5, atol=1e-8)


def test_fitnet_and_cross_entropy_match_numpy():
  s, t = _maps((2, 4, 4, 8), (2, 4, 4, 8), seed=11)
  np.testing.assert_allclose(losses.fitnet(s, t), np.mean((s.astype(np.float64) - t) ** 2),
                             rtol=1e-6)
  logits = _maps((6, 10), seed=12)[0] * 4
  labels = np.array([0, 3, 9, 2, 2, 7])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), ref.cross_entropy(logits, labels),
                             rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda s, t: losses.nst(s[0], t), r"must be NHWC \(rank 4\)"),
    (lambda s, t: losses.nst(s, t[:1]), r"batch sizes differ: 2 vs 1"),
    (lambda s, t: losses.nst(s, t, kernel="rbf"), r"Unknown kernel 'rbf'. Valid kernels"),
    (lambda s, t: losses.nst(s, t, resize="crop"),
     r"Unknown resize policy 'crop'. Valid policies: pool, interpolate, error"),
    (lambda s, t: losses.nst(s, t[:, :2], resize="error"), r"differ in spatial size, 4x4 vs 2x4"),
    (lambda s, t: losses.nst(s, t, kernel="gaussian", sigma2=0.0), r"sigma2 must be > 0"),
    (lambda s, t: losses.nst(s, t, kernel="polynomial", degree=0), r"degree must be an integer >= 1"),
    (lambda s, t: losses.nst(s, t, method="fft"), r"Valid methods: auto, mean, spatial, gram"),
    (lambda s, t: losses.attention(s, t[:1]), r"batch sizes differ"),
    (lambda s, t: losses.fitnet(s, t), r"must have the teacher map's shape"),
    (lambda s, t: losses.kd(s[:, 0, 0], t[:, 0, 0]), r"equal shape"),
    (lambda s, t: losses.cross_entropy(s[:, 0, 0], np.zeros(2, np.float32)), r"integer class"),
])
def test_bad_input_raises_with_valid_choices(call, match):
  s, t = _maps((2, 4, 4, 6), (2, 4, 4, 5))
  with pytest.raises(ValueError, match=match):
    call(s, t)


@pytest.mark.parametrize("kernel", ["linear", "polynomial", "gaussian"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_nst_per_image_is_the_double_sum_formula_after_pooling(kernel, unbiased):
  rng = np.random.default_rng(4)
  student = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  teacher = np.abs(rng.normal(size=(2, 8, 6, 5))).astype(np.float32)  # pooled to 4 x 4 per axis
  got = np.asarray(losses.nst_per_image(student, teacher, kernel=kernel, unbiased=unbiased))
  s, t = ref.match(student, teacher, "pool")
  expected = [ref.mmd2(ref.channel_rows(s[b]), ref.channel_rows(t[b]), kernel, unbiased) for b in range(2)]
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# In a user's own step: the kernel by position, layouts, jit.


def test_kernel_may_be_given_by_position():
  s, t = _maps((2, 4, 4, 6), (2, 4, 4, 5), seed=20, relu=True)
  for kernel in ("linear", "gaussian"):
    assert float(losses.nst(s, t, kernel)) == float(losses.nst(s, t, kernel=kernel))
    np.testing.assert_array_equal(losses.nst_per_image(s, t, kernel),
                                  losses.nst_per_image(s, t, kernel=kernel))
  np.testing.assert_allclose(losses.nst(s, t, "linear"), ref.nst(s, t, "linear"), rtol=2e-4)


@pytest.mark.parametrize("s_shape,t_shape,resize", [
    ((2, 8, 6, 5), (2, 4, 3, 7), "pool"),
    ((2, 4, 4, 3), (2, 8, 8, 6), "interpolate"),
    ((3, 5, 5, 4), (3, 5, 5, 4), "pool"),
])
def test_nchw_layout_equals_nhwc_of_the_transposed_maps(s_shape, t_shape, resize):
  s, t = _maps(s_shape, t_shape, seed=21, relu=True)
  to_nchw = lambda a: np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
  for kernel, params in KERNELS:
    expected = ref.nst(s, t, kernel, resize, **params)  # the NumPy reference, NHWC
    got = losses.nst(to_nchw(s), to_nchw(t), kernel, resize=resize, layout="NCHW", **params)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6, err_msg=kernel)
    np.testing.assert_allclose(
        losses.nst_per_image(to_nchw(s), to_nchw(t), kernel, resize=resize, layout="NCHW", **params),
        losses.nst_per_image(s, t, kernel, resize=resize, **params), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses.attention(to_nchw(s), to_nchw(t), resize=resize, layout="NCHW"),
                             ref.attention(s, t, 2, resize), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(losses.channel_distributions(to_nchw(s), layout="NCHW"),
                             losses.channel_distributions(s), rtol=1e-6)


def test_nchw_maps_read_as_nhwc_are_an_error_naming_the_layout():
  # PyTorch-style (B, C, H, W) maps of a 64- and a 128-channel layer at 8 x 8: read as NHWC they are
  # 64 x 8 and 128 x 8 "images", which no single scale factor relates.
  s, t = _maps((2, 64, 8, 8), (2, 128, 8, 8), seed=22, relu=True)
  for loss in (losses.nst, losses.nst_per_image, losses.attention):
    with pytest.raises(ValueError, match=r"read as NHWC, the student map \(shape \(2, 64, 8, 8\)\) is 64x8 "
                                         r"and the teacher map \(shape \(2, 128, 8, 8\)\) is 128x8, .* "
                                         r"pass layout='NCHW'"):
      loss(s, t)
  assert np.isfinite(float(losses.nst(s, t, layout="NCHW")))
  # NHWC maps given as NCHW: (2, 16, 16, 8) and (2, 8, 8, 16) read as H x W = 16 x 8 and 8 x 16.
  a, b = _maps((2, 16, 16, 8), (2, 8, 8, 16), seed=23)
  with pytest.raises(ValueError, match=r"read as NCHW.*shape \(2, 16, 16, 8\).* pass layout='NHWC'"):
    losses.nst(a, b, layout="NCHW")
  with pytest.raises(ValueError, match=r"Unknown layout 'HWC'. Valid layouts: NHWC, NCHW"):
    losses.nst(a, b, layout="HWC")
  with pytest.raises(ValueError, match=r"feature maps must be NCHW \(rank 4\)"):
    losses.nst(a[0], b[0], layout="NCHW")


@pytest.mark.parametrize("student_hw,teacher_hw,valid", [
    ((8, 8), (8, 8), True), ((16, 16), (8, 8), True), ((4, 4), (32, 32), True),
    ((15, 20), (8, 10), True),   # strided layers round 15 / 2 up
    ((15, 20), (4, 5), True),    # 15 / 4 -> 4 (within a pixel), 20 / 4 = 5
    ((30, 22), (16, 12), True),  # 'VALID' convolutions, then stride 2
    ((1, 1), (7, 7), True),      # a pooled map
    ((8, 6), (4, 4), True),      # the per-axis pooling test above: factors 2 and 1.5 meet within a pixel
    ((64, 8), (128, 8), False),  # NCHW read as NHWC
    ((16, 8), (8, 16), False),   # larger along one axis, smaller along the other
    ((32, 32), (8, 2), False),
])
def test_one_scale_hand_cases(student_hw, teacher_hw, valid):
  assert losses.one_scale(student_hw, teacher_hw) is valid
  assert losses.one_scale(teacher_hw, student_hw) is valid


def test_jit_forms_equal_the_eager_value_and_do_not_retrace():
  s, t = (jnp.asarray(a) for a in _maps((2, 6, 6, 5), (2, 3, 3, 4), seed=24, relu=True))
  eager = float(losses.nst(s, t, kernel="gaussian", sigma2=0.5))
  bound = losses.bind(losses.nst, kernel="gaussian", sigma2=0.5)
  assert bound == losses.bind(losses.nst, sigma2=0.5, kernel="gaussian") and hash(bound)
  assert jax.tree.leaves(bound) == []  # a static pytree: no strings become jit arguments
  traces = []

  @jax.jit
  def step(loss, s, t):
    traces.append(1)
    return loss(s, t)

  partial = jax.tree_util.Partial(bound)
  forms = {
      "bind + jit": jax.jit(bound)(s, t),
      "bind as an argument": step(bound, s, t),
      "bind in a Partial": step(partial, s, t),
      "static_argnames": jax.jit(losses.nst, static_argnames=losses.STATIC_ARGNAMES)(
          s, t, kernel="gaussian", sigma2=0.5),
      "functools.partial": jax.jit(functools.partial(losses.nst, kernel="gaussian", sigma2=0.5))(s, t),
  }
  for name, value in forms.items():
    np.testing.assert_allclose(float(value), eager, rtol=1e-6, err_msg=name)
  assert len(traces) == 2  # one trace for the bound loss, one for the Partial (another pytree type)
  step(losses.bind(losses.nst, kernel="gaussian", sigma2=0.5), s * 2, t)  # an equal binding: no retrace
  assert len(traces) == 2
  np.testing.assert_allclose(jax.jit(losses.bind(losses.attention, layout="NCHW"))(
      jnp.transpose(s, (0, 3, 1, 2)), jnp.transpose(t, (0, 3, 1, 2))), losses.attention(s, t), rtol=1e-6)
  with pytest.raises(TypeError, match=r"not marked as static"):  # what the module docstring warns of
    jax.jit(losses.nst)(s, t, kernel="linear")
  with pytest.raises(TypeError, match=r"bind: settings must be hashable"):
    losses.bind(losses.nst, kernel=["linear"])
