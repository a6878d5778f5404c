"""MMD kernels: pure pairwise kernel functions and the squared Maximum Mean Discrepancy between two sets.

The pairwise kernels take two 1-D vectors and return a scalar; `gram` vmaps one of them over the rows of
two sample matrices, which is the definition. `mmd2` computes the squared MMD between sample sets
X (n, D) and Y (m, D) (the NST paper's Eq. 4, Huang and Wang, arXiv 1707.01219; `docs/kernels.md`,
"Definitions"):

    MMD^2 = 1/n^2 sum_jj' k(x_j, x_j') + 1/m^2 sum_ii' k(y_i, y_i') - 2/(nm) sum_ji k(x_j, y_i)

biased (V-statistic) by default, or unbiased (U-statistic, the j = j' and i = i' terms left out of the
first two sums). For the built-in kernels `mmd2` does not call the pairwise function n*m times: it uses
exact identities that give the same number for far less work (`docs/kernels.md`, "The exact fast forms"),
picked by `method`:

* "mean" (linear kernel; polynomial of degree 1): MMD^2 = ||mean_j x_j - mean_i y_i||^2 + ...; O((n+m) D).
* "spatial" (polynomial of degree 2): sum_ji (x_j . y_i)^2 = <X^T X, Y^T Y>_F, so the biased value is
  ||X^T X / n - Y^T Y / m||_F^2 (+ 2c ||mean x - mean y||^2), with D x D Gram matrices; cheap when D is small.
* "gram" (every built-in kernel): the n x n, m x m and n x m dot-product matrices from matrix products,
  the kernel applied elementwise (||x - y||^2 = ||x||^2 + ||y||^2 - 2 x . y for the Gaussian).
* "vmap": the definition itself, the pairwise kernel vmapped over every pair (`gram`). Works for any
  kernel, including a user's own callable; the reference the fast forms are tested against.
* "auto" (default): "mean" where it applies, else the cheaper of "spatial" and "gram" by a FLOP count,
  else "vmap" for a custom kernel.

Everything here is a pure function of arrays and static Python parameters, safe under `jax.jit`,
`jax.vmap` and `jax.grad`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Kernel = Callable[..., Array]

# Exact float32 products on every backend: MMD^2 is a small difference of large sums, and the
# reduced-precision default of TPU/GPU matrix units (bf16 passes, TF32) would swamp it.
_PRECISION = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------
# Pairwise kernels: k(x, y) for two 1-D vectors.


def linear(x: Array, y: Array) -> Array:
  """k(x, y) = x . y"""
  return jnp.dot(x, y, precision=_PRECISION)


def polynomial(x: Array, y: Array, degree: int = 2, c: float = 0.0) -> Array:
  """k(x, y) = (x . y + c)^degree; the paper uses degree 2, c = 0."""
  return (jnp.dot(x, y, precision=_PRECISION) + c) ** degree


def gaussian(x: Array, y: Array, sigma2: float | Array) -> Array:
  """k(x, y) = exp(-||x - y||^2 / (2 sigma2))."""
  return jnp.exp(-jnp.sum((x - y) ** 2) / (2.0 * sigma2))


KERNELS: dict[str, Kernel] = {
    "linear": linear,
    "polynomial": polynomial,
    "poly": polynomial,
    "gaussian": gaussian,
}

# The keyword parameters each built-in kernel accepts (sigma2 is optional: see `gaussian_sigma2`).
_KERNEL_PARAMS = {linear: (), polynomial: ("degree", "c"), gaussian: ("sigma2",)}

METHODS = ("auto", "mean", "spatial", "gram", "vmap")


def is_builtin(kernel: str | Kernel) -> bool:
  """Whether `kernel` names (or is) one of the built-in kernels, which have fast exact forms."""
  return get_kernel(kernel) in _KERNEL_PARAMS


def get_kernel(kernel: str | Kernel) -> Kernel:
  """Resolves a kernel name (or passes a callable through); an unknown name lists the valid ones."""
  if callable(kernel):
    return kernel
  if kernel not in KERNELS:
    raise ValueError(f"Unknown kernel {kernel!r}. Valid kernels: {', '.join(KERNELS)}.")
  return KERNELS[kernel]


def _concrete_float(value) -> float | None:
  """float(value) for a Python, NumPy or concrete JAX scalar; None for a traced or non-scalar value,
  which cannot be checked at trace time (e.g. a learned bandwidth)."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _validate_params(kernel: Kernel, params: dict[str, Any]) -> dict[str, Any]:
  """Checks a built-in kernel's parameters; returns them with defaults filled in."""
  if kernel not in _KERNEL_PARAMS:
    return params  # A user's kernel: its own signature is the check.
  valid = _KERNEL_PARAMS[kernel]
  unknown = sorted(set(params) - set(valid))
  if unknown:
    raise ValueError(f"Unknown parameter(s) {unknown} for kernel '{kernel.__name__}'. "
                     f"Valid parameters: {list(valid) or 'none'}.")
  if kernel is polynomial:
    degree = params.get("degree", 2)
    if isinstance(degree, bool) or not isinstance(degree, int | np.integer) or degree < 1:
      raise ValueError(f"Polynomial kernel degree must be an integer >= 1, got {degree!r}.")
    c = params.get("c", 0.0)
    if (c_value := _concrete_float(c)) is not None and c_value < 0:
      raise ValueError(f"Polynomial kernel offset c must be >= 0 (positive-definite kernel), got {c!r}.")
    return {"degree": int(degree), "c": c}
  if kernel is gaussian:
    sigma2 = params.get("sigma2")
    if sigma2 is not None and (value := _concrete_float(sigma2)) is not None and not value > 0:
      raise ValueError(f"Gaussian kernel sigma2 must be > 0, got {sigma2!r}; "
                       "leave it unset for the mean-squared-distance heuristic (gaussian_sigma2).")
  return params


def gram(kernel: str | Kernel, X: Array, Y: Array, **params) -> Array:
  """The (n, m) matrix of k(X[i], Y[j]), by vmapping the pairwise kernel over the rows of X and Y."""
  k = get_kernel(kernel)
  params = _validate_params(k, params)
  if k is gaussian and params.get("sigma2") is None:
    raise ValueError("gram() with the Gaussian kernel needs sigma2 (see gaussian_sigma2).")
  pairwise = lambda x, y: k(x, y, **params)
  return jax.vmap(jax.vmap(pairwise, in_axes=(None, 0)), in_axes=(0, None))(X, Y)


# ----------------------------------------------------------------------------------------------------
# Squared MMD.


def gaussian_sigma2(X: Array, Y: Array, eps: float = 1e-12) -> Array:
  """The Gaussian bandwidth heuristic: the mean of ||z_i - z_j||^2 over all pairs i != j of the pooled
  rows Z = [X; Y], under `stop_gradient`.

  Computed in O((n + m) D) from sum_{i != j} ||z_i - z_j||^2 = 2 N sum_i ||z_i||^2 - 2 ||sum_i z_i||^2
  (N = n + m), never from the N x N distance matrix. Floored at `eps` so identical rows stay finite.
  """
  Z = jax.lax.stop_gradient(jnp.concatenate([X, Y], axis=0))
  N = Z.shape[0]
  total = 2.0 * N * jnp.sum(Z * Z) - 2.0 * jnp.sum(jnp.sum(Z, axis=0) ** 2)
  return jnp.maximum(total / (N * (N - 1)), eps)


def diagonal(g: Array) -> Array:
  """The diagonal of a square matrix, as a masked row sum.

  Elementwise, so it and its gradient fuse with their neighbours; `jnp.diagonal` lowers to a gather
  whose gradient is a scatter, which costs more than the rest of the loss's small-matrix work on CPU.
  """
  return jnp.sum(g * jnp.eye(g.shape[-1], dtype=g.dtype), axis=-1)


def _combine(kxx_sum, kyy_sum, kxy_sum, kxx_diag, kyy_diag, n, m, unbiased):
  """MMD^2 from kernel sums (and the diagonal sums, for the unbiased estimator)."""
  if unbiased:
    xx = (kxx_sum - kxx_diag) / (n * (n - 1))
    yy = (kyy_sum - kyy_diag) / (m * (m - 1))
  else:
    xx = kxx_sum / (n * n)
    yy = kyy_sum / (m * m)
  return xx + yy - 2.0 * kxy_sum / (n * m)


def _dot(a, b):
  return jnp.matmul(a, b, precision=_PRECISION)


@jax.custom_jvp
def self_dots(X: Array) -> Array:
  """X X^T, the (n, n) matrix of dot products of the rows of X, with a one-product derivative.

  Autodiff of X X^T treats the two factors separately and spends two matrix products on the backward
  pass; since the result is symmetric, d(X X^T) = M + M^T with M = dX X^T, whose transpose needs one.
  """
  return _dot(X, X.T)


@self_dots.defjvp
def _self_dots_jvp(primals, tangents):
  (X,), (dX,) = primals, tangents
  m = _dot(dX, X.T)
  return self_dots(X), m + m.T


def _mmd2_vmap(k, X, Y, unbiased, params):
  n, m = X.shape[0], Y.shape[0]
  kxx, kyy, kxy = gram(k, X, X, **params), gram(k, Y, Y, **params), gram(k, X, Y, **params)
  return _combine(kxx.sum(), kyy.sum(), kxy.sum(), jnp.sum(diagonal(kxx)), jnp.sum(diagonal(kyy)), n, m,
                  unbiased)


def mmd2_from_dots(gxx: Array, gyy: Array, gxy: Array, kernel: str | Kernel = "polynomial", *,
                   unbiased: bool = False, **params) -> Array:
  """Squared MMD of a built-in kernel from the dot-product matrices of the two sets.

  gxx = X X^T (n, n), gyy = Y Y^T (m, m), gxy = X Y^T (n, m). Every built-in kernel is a function of
  x . y (linear, polynomial) or of ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x . y (Gaussian), so these three
  matrices are all MMD^2 needs; callers that can form them more cheaply than from X and Y (the NST loss
  normalises channels *after* the matrix product) use this directly.
  """
  k = get_kernel(kernel)
  if k not in _KERNEL_PARAMS:
    raise ValueError(f"mmd2_from_dots needs a built-in kernel ({', '.join(KERNELS)}), got {kernel!r}.")
  params = _validate_params(k, dict(params))
  n, m = gxx.shape[0], gyy.shape[0]
  if k is linear:
    kxx, kyy, kxy = gxx, gyy, gxy
  elif k is polynomial:
    d, c = params["degree"], params["c"]
    kxx, kyy, kxy = (gxx + c) ** d, (gyy + c) ** d, (gxy + c) ** d
  else:
    sx, sy = diagonal(gxx), diagonal(gyy)
    sigma2 = params.get("sigma2")
    if sigma2 is None:
      sigma2 = gaussian_sigma2_from_dots(gxx, gyy, gxy)
    dist = lambda g, a, b: jnp.maximum(a[:, None] + b[None, :] - 2.0 * g, 0.0)
    scale = -0.5 / sigma2
    kxx = jnp.exp(scale * dist(gxx, sx, sx))
    kyy = jnp.exp(scale * dist(gyy, sy, sy))
    kxy = jnp.exp(scale * dist(gxy, sx, sy))
  return _combine(kxx.sum(), kyy.sum(), kxy.sum(), jnp.sum(diagonal(kxx)), jnp.sum(diagonal(kyy)), n, m,
                  unbiased)


def gaussian_sigma2_from_dots(gxx: Array, gyy: Array, gxy: Array, eps: float = 1e-12) -> Array:
  """`gaussian_sigma2` from the dot-product matrices: ||sum z||^2 is the sum of the joint Gram matrix."""
  gxx, gyy, gxy = (jax.lax.stop_gradient(g) for g in (gxx, gyy, gxy))
  N = gxx.shape[0] + gyy.shape[0]
  sum_sq = jnp.sum(diagonal(gxx)) + jnp.sum(diagonal(gyy))
  sq_sum = jnp.sum(gxx) + jnp.sum(gyy) + 2.0 * jnp.sum(gxy)
  return jnp.maximum((2.0 * N * sum_sq - 2.0 * sq_sum) / (N * (N - 1)), eps)


def _mmd2_gram(k, X, Y, unbiased, params):
  """Dot-product matrices from matrix products, then the kernel elementwise."""
  return mmd2_from_dots(self_dots(X), self_dots(Y), _dot(X, Y.T), k, unbiased=unbiased, **params)


def _mmd2_mean(X, Y, unbiased, c=0.0):
  """Linear kernel (x . y + c), exactly, from the set means: O((n + m) D)."""
  n, m = X.shape[0], Y.shape[0]
  if not unbiased:
    # The c terms cancel: c (1 + 1 - 2) = 0.
    return jnp.sum((jnp.mean(X, axis=0) - jnp.mean(Y, axis=0)) ** 2)
  sx, sy = jnp.sum(X, axis=0), jnp.sum(Y, axis=0)
  kxx_sum, kyy_sum, kxy_sum = jnp.sum(sx * sx) + c * n * n, jnp.sum(sy * sy) + c * m * m, jnp.sum(
      sx * sy) + c * n * m
  kxx_diag, kyy_diag = jnp.sum(X * X) + c * n, jnp.sum(Y * Y) + c * m
  return _combine(kxx_sum, kyy_sum, kxy_sum, kxx_diag, kyy_diag, n, m, unbiased)


def _mmd2_spatial(X, Y, unbiased, c=0.0):
  """Polynomial kernel of degree 2, exactly, from D x D 'spatial' Gram matrices.

  sum_ji (x_j . y_i + c)^2 = ||X^T Y||... expanded: <X^T X, Y^T Y>_F + 2c (sum x).(sum y) + c^2 nm.
  The biased value is assembled as a squared norm of a difference, which never goes negative.
  """
  n, m = X.shape[0], Y.shape[0]
  ax, ay = self_dots(X.T), self_dots(Y.T)
  if not unbiased:
    mean_term = jnp.sum((jnp.mean(X, axis=0) - jnp.mean(Y, axis=0)) ** 2)
    return jnp.sum((ax / n - ay / m) ** 2) + 2.0 * c * mean_term
  sx, sy = jnp.sum(X, axis=0), jnp.sum(Y, axis=0)
  kxx_sum = jnp.sum(ax * ax) + 2.0 * c * jnp.sum(sx * sx) + c * c * n * n
  kyy_sum = jnp.sum(ay * ay) + 2.0 * c * jnp.sum(sy * sy) + c * c * m * m
  kxy_sum = jnp.sum(ax * ay) + 2.0 * c * jnp.sum(sx * sy) + c * c * n * m
  kxx_diag = jnp.sum((jnp.sum(X * X, axis=1) + c) ** 2)
  kyy_diag = jnp.sum((jnp.sum(Y * Y, axis=1) + c) ** 2)
  return _combine(kxx_sum, kyy_sum, kxy_sum, kxx_diag, kyy_diag, n, m, unbiased)


def applicable_methods(kernel: str | Kernel, **params) -> tuple[str, ...]:
  """The exact methods that apply to a kernel and its parameters, fastest first ("auto" aside)."""
  k = get_kernel(kernel)
  params = _validate_params(k, dict(params))
  if k is linear or (k is polynomial and params["degree"] == 1):
    return ("mean", "gram", "vmap")
  if k is polynomial and params["degree"] == 2:
    return ("spatial", "gram", "vmap")
  if k in _KERNEL_PARAMS:
    return ("gram", "vmap")
  return ("vmap",)


def choose_method(kernel: str | Kernel, n: int, m: int, dim: int, **params) -> str:
  """The method "auto" resolves to for sets of n and m rows of dimension `dim`.

  The spatial form costs ~(n + m) D^2 multiply-adds, the Gram form ~(n + m)^2 D; the spatial form wins
  when D < (n + m), but its backward pass is relatively dearer, so it is taken below 0.75 (n + m)
  (D < 1.5 C for equal channel counts; `docs/kernels.md`, "The exact fast forms").
  """
  k = get_kernel(kernel)
  applicable = applicable_methods(k, **params)
  if "spatial" in applicable and dim >= 0.75 * (n + m):
    return "gram"
  return applicable[0]


def mmd2(X: Array, Y: Array, kernel: str | Kernel = "polynomial", *, unbiased: bool = False,
         method: str = "auto", **params) -> Array:
  """Squared MMD between the sample sets X (n, D) and Y (m, D).

  Args:
    X, Y: 2-D arrays of samples (rows) of the same dimension D; n and m may differ.
    kernel: "linear", "polynomial" (alias "poly"), "gaussian", or a pairwise callable k(x, y, **params).
    unbiased: the U-statistic (diagonal terms left out; needs n, m >= 2) instead of the V-statistic.
    method: "auto", "mean", "spatial", "gram" or "vmap" (see the module docstring); all give the same
      value up to rounding.
    **params: kernel parameters: `degree`, `c` (polynomial); `sigma2` (gaussian; default: the
      mean-pairwise-squared-distance heuristic of `gaussian_sigma2`, under stop_gradient).
  Returns:
    A scalar in X's floating dtype.
  """
  k = get_kernel(kernel)
  params = _validate_params(k, dict(params))
  if method not in METHODS:
    raise ValueError(f"Unknown MMD method {method!r}. Valid methods: {', '.join(METHODS)}.")
  X, Y = jnp.asarray(X), jnp.asarray(Y)
  if X.ndim != 2 or Y.ndim != 2:
    raise ValueError(f"mmd2 expects 2-D sample matrices (n, D) and (m, D), got shapes {X.shape} and "
                     f"{Y.shape}.")
  if X.shape[1] != Y.shape[1]:
    raise ValueError(f"Samples of X and Y must have the same dimension, got X {X.shape} and Y {Y.shape}.")
  n, m = X.shape[0], Y.shape[0]
  if n < 1 or m < 1 or (unbiased and min(n, m) < 2):
    raise ValueError(f"Need at least {2 if unbiased else 1} samples in each set for the "
                     f"{'unbiased' if unbiased else 'biased'} estimator, got n={n}, m={m}.")
  applicable = applicable_methods(k, **params)
  if method == "auto":
    method = choose_method(k, n, m, X.shape[1], **params)
  elif method not in applicable:
    raise ValueError(f"Method {method!r} does not apply to this kernel and parameters. "
                     f"Valid methods here: {', '.join(('auto', *applicable))}.")
  if method == "vmap":
    if k is gaussian and params.get("sigma2") is None:
      params = {**params, "sigma2": gaussian_sigma2(X, Y)}
    return _mmd2_vmap(k, X, Y, unbiased, params)
  if method == "gram":
    return _mmd2_gram(k, X, Y, unbiased, params)
  c = params.get("c", 0.0)
  if method == "mean":
    return _mmd2_mean(X, Y, unbiased, c)
  return _mmd2_spatial(X, Y, unbiased, c)
