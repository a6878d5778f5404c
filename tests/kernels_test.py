"""Tests of nst_jax.kernels against the NumPy double sums of tests/np_reference.py."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nst_jax import kernels
from tests import np_reference as ref

CASES = [  # (kernel, params)
    ("linear", {}),
    ("polynomial", {}),
    ("poly", {"degree": 2, "c": 0.5}),
    ("polynomial", {"degree": 3, "c": 1.0}),
    ("polynomial", {"degree": 1, "c": 0.3}),
    ("gaussian", {}),
    ("gaussian", {"sigma2": 0.7}),
]


def _sets(n=6, m=4, d=9, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(np.float32) / 3,
          rng.normal(size=(m, d)).astype(np.float32) / 3)


@pytest.mark.parametrize("name,x,y", [("linear", [1., 2., 3.], [4., -5., 6.]),
                                      ("polynomial", [1., 2., 3.], [4., -5., 6.]),
                                      ("gaussian", [1., 2.], [0., 4.])])
def test_pairwise_kernels_hand_computed(name, x, y):
  # x.y = 4 - 10 + 18 = 12; (12)^2 = 144; ||(1,2)-(0,4)||^2 = 5, exp(-5 / (2*2.5)) = e^-1.
  expected = {"linear": 12.0, "polynomial": 144.0, "gaussian": np.exp(-1.0)}[name]
  params = {"sigma2": 2.5} if name == "gaussian" else {}
  got = kernels.get_kernel(name)(jnp.array(x), jnp.array(y), **params)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("name,params", CASES[:5] + [("gaussian", {"sigma2": 0.7})])
def test_gram_matches_numpy(name, params):
  X, Y = _sets()
  expected = np.array([[ref.kernel(name, x, y, **params) for y in Y] for x in X])
  np.testing.assert_allclose(kernels.gram(name, X, Y, **params), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("name,params", CASES)
def test_mmd2_every_method_matches_double_sums(name, params, unbiased):
  X, Y = _sets()
  expected = ref.mmd2(X, Y, name, unbiased, **params)
  k = kernels.get_kernel(name)
  methods = kernels.applicable_methods(k, **params)
  assert "vmap" in methods and "gram" in methods
  for method in ("auto", *methods):
    got = kernels.mmd2(X, Y, name, unbiased=unbiased, method=method, **params)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-6, err_msg=method)


def test_fast_forms_applicability():
  assert kernels.applicable_methods("linear") == ("mean", "gram", "vmap")
  assert kernels.applicable_methods("polynomial") == ("spatial", "gram", "vmap")
  assert kernels.applicable_methods("polynomial", degree=1) == ("mean", "gram", "vmap")
  assert kernels.applicable_methods("polynomial", degree=3) == ("gram", "vmap")
  assert kernels.applicable_methods("gaussian") == ("gram", "vmap")
  assert kernels.applicable_methods(lambda x, y: jnp.dot(x, y)) == ("vmap",)


@pytest.mark.parametrize("n,m,d,expected", [
    (64, 64, 64, "spatial"),    # CIFAR stage 3: 8x8 positions, 256 channels (here 64 vs 64+64)
    (256, 256, 64, "spatial"),
    (64, 64, 1024, "gram"),     # CIFAR stage 1: 32x32 positions, 64 channels
    (128, 128, 256, "gram"),
])
def test_auto_size_rule_both_sides(n, m, d, expected):
  assert kernels.choose_method("polynomial", n, m, d) == expected
  assert kernels.choose_method("linear", n, m, d) == "mean"
  assert kernels.choose_method("gaussian", n, m, d) == "gram"


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("d", [5, 40])  # below and above the spatial/gram switch for n=8, m=6
def test_fast_forms_equal_vmapped_definition(d, unbiased):
  X, Y = _sets(8, 6, d, seed=d)
  for name, params in CASES:
    k = kernels.get_kernel(name)
    reference = kernels.mmd2(X, Y, k, unbiased=unbiased, method="vmap", **params)
    for method in kernels.applicable_methods(k, **params):
      got = kernels.mmd2(X, Y, k, unbiased=unbiased, method=method, **params)
      np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6, err_msg=f"{name} {method}")


def test_custom_callable_kernel():
  laplace = lambda x, y, scale=1.0: jnp.exp(-jnp.sum(jnp.abs(x - y)) / scale)
  X, Y = _sets()
  got = kernels.mmd2(X, Y, laplace, scale=2.0)
  lap = lambda a, b: np.exp(-np.sum(np.abs(a - b)) / 2.0)
  Xd, Yd = X.astype(np.float64), Y.astype(np.float64)
  expected = (np.mean([[lap(a, b) for b in Xd] for a in Xd]) + np.mean(
      [[lap(a, b) for b in Yd] for a in Yd]) - 2 * np.mean([[lap(a, b) for b in Yd] for a in Xd]))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sigma2_heuristic_matches_pairwise_mean():
  X, Y = _sets()
  np.testing.assert_allclose(kernels.gaussian_sigma2(X, Y), ref.sigma2_heuristic(X, Y), rtol=1e-5)


@pytest.mark.parametrize("name,params", CASES)
def test_properties(name, params):
  X, Y = _sets(7, 5, 6, seed=3)
  for method in kernels.applicable_methods(name, **params):
    f = lambda a, b, method=method: float(kernels.mmd2(a, b, name, method=method, **params))
    value = f(X, Y)
    assert value >= -1e-6
    assert abs(f(X, X)) < 1e-5
    np.testing.assert_allclose(f(Y, X), value, rtol=1e-5, atol=1e-7)
    perm = np.random.default_rng(1).permutation(len(X))
    np.testing.assert_allclose(f(X[perm], Y[::-1]), value, rtol=1e-5, atol=1e-7)


def test_self_dots_gradient_float64():
  with jax.enable_x64(True):
    X = np.random.default_rng(0).normal(size=(5, 7))
    check_grads(kernels.self_dots, (X,), order=2, modes=["fwd", "rev"])
    np.testing.assert_allclose(kernels.self_dots(X), X @ X.T, rtol=1e-12)


@pytest.mark.parametrize("name,params", CASES)
def test_grad_matches_finite_differences_float64(name, params):
  with jax.enable_x64(True):
    X, Y = (a.astype(np.float64) for a in _sets(5, 4, 6, seed=7))
    if name == "gaussian" and "sigma2" not in params:
      # The heuristic bandwidth is under stop_gradient, so the gradient is that of the kernel with
      # sigma2 frozen at its value here; finite differences must freeze it too.
      sigma2 = float(kernels.gaussian_sigma2(X, Y))
      for method in ("gram", "vmap"):
        frozen = lambda a, method=method: kernels.mmd2(a, Y, name, method=method, sigma2=sigma2)
        heuristic = lambda a, method=method: kernels.mmd2(a, Y, name, method=method)
        np.testing.assert_allclose(jax.grad(heuristic)(X), jax.grad(frozen)(X), rtol=1e-10)
        check_grads(frozen, (X,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
      return
    for method in kernels.applicable_methods(name, **params):
      f = lambda a, method=method: kernels.mmd2(a, Y, name, method=method, **params)
      check_grads(f, (X,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_jit_and_vmap():
  X, Y = _sets()
  batched = jax.jit(jax.vmap(lambda a, b: kernels.mmd2(a, b, "gaussian")))
  got = batched(np.stack([X, X + 1]), np.stack([Y, Y]))
  np.testing.assert_allclose(got[0], ref.mmd2(X, Y, "gaussian"), rtol=1e-4)
  np.testing.assert_allclose(got[1], ref.mmd2(X + 1, Y, "gaussian"), rtol=1e-4)


@pytest.mark.parametrize("call,match", [
    (lambda X, Y: kernels.mmd2(X, Y, "rbf"), r"Unknown kernel 'rbf'. Valid kernels: linear, poly"),
    (lambda X, Y: kernels.mmd2(X, Y, "polynomial", degree=0), r"degree must be an integer >= 1"),
    (lambda X, Y: kernels.mmd2(X, Y, "polynomial", degree=1.5), r"degree must be an integer >= 1"),
    (lambda X, Y: kernels.mmd2(X, Y, "polynomial", c=-1.0), r"offset c must be >= 0"),
    (lambda X, Y: kernels.mmd2(X, Y, "gaussian", sigma2=0.0), r"sigma2 must be > 0"),
    (lambda X, Y: kernels.mmd2(X, Y, "gaussian", sigma2=-2), r"sigma2 must be > 0"),
    (lambda X, Y: kernels.mmd2(X, Y, "linear", degree=2), r"Valid parameters: none"),
    (lambda X, Y: kernels.mmd2(X, Y, "polynomial", sigma=1), r"Valid parameters: \['degree', 'c'\]"),
    (lambda X, Y: kernels.mmd2(X[0], Y), r"2-D sample matrices"),
    (lambda X, Y: kernels.mmd2(X, Y[:, :3]), r"same dimension"),
    (lambda X, Y: kernels.mmd2(X[:1], Y, unbiased=True), r"at least 2 samples"),
    (lambda X, Y: kernels.mmd2(X, Y, method="fast"), r"Valid methods: auto, mean, spatial"),
    (lambda X, Y: kernels.mmd2(X, Y, "gaussian", method="spatial"),
     r"Valid methods here: auto, gram, vmap"),
    (lambda X, Y: kernels.gram("gaussian", X, Y), r"needs sigma2"),
])
def test_bad_input_raises_with_valid_choices(call, match):
  X, Y = _sets()
  with pytest.raises(ValueError, match=match):
    call(X, Y)


def test_kernel_registry_names():
  assert set(kernels.KERNELS) == {"linear", "polynomial", "poly", "gaussian"}
  rng = np.random.default_rng(7)
  x, y = rng.normal(size=5), rng.normal(size=5)
  expected = {"linear": x @ y, "polynomial": (x @ y) ** 2, "poly": (x @ y) ** 2,
              "gaussian": np.exp(-np.sum((x - y) ** 2) / 2.0)}
  for name, value in expected.items():  # each name computes its own formula (defaults: d=2, c=0)
    params = {"sigma2": 1.0} if name == "gaussian" else {}
    np.testing.assert_allclose(float(kernels.get_kernel(name)(jnp.asarray(x), jnp.asarray(y), **params)),
                               value, rtol=1e-5, err_msg=name)
