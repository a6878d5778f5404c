"""Distillation losses: NST (MMD of channel maps), Hinton's KD, attention transfer, FitNet, cross-entropy.

All are pure functions of arrays returning a float32 scalar (float64 for float64 inputs); lower-precision
inputs (bfloat16) are computed in float32 inside. Every teacher argument is under `stop_gradient`, so
`jax.grad` never sends a gradient into the teacher. Definitions: NST as in Huang and Wang, "Like What You
Like: Knowledge Distill via Neuron Selectivity Transfer" (arXiv 1707.01219), KD, AT and FitNet as
RepDistiller computes them (github.com/HobbitLong/RepDistiller); `docs/kernels.md` states them all, with
the exact fast forms. Weights are the caller's (the config's) business: nothing here applies the paper's
lambda / 2.

Feature maps are NHWC by default; the feature-map losses (`nst`, `nst_per_image`, `attention`) and
their helpers take `layout="NCHW"` for maps in PyTorch's layout, with the same value as for the
transposed NHWC maps. A pair of maps must show one image at two scales (per spatial axis, one size is
the other's times one common factor, up to a pixel of rounding); any other pair, typically NCHW maps
read as NHWC, is a ValueError that names the layout.

In your own training step. The settings (`kernel`, `resize`, `unbiased`, `method`, `layout`, the kernel
parameters) are Python values, not arrays, so under `jax.jit` they must be static. Any of:

    loss = losses.bind(losses.nst, kernel="linear")        # hashable, a pytree with no leaves
    jax.jit(loss)(s, t)                                    # or pass `loss` into a jitted function,
    jax.tree_util.Partial(loss)                            # or inside a Partial
    jax.jit(losses.nst, static_argnames=losses.STATIC_ARGNAMES)(s, t, kernel="linear")
    jax.jit(functools.partial(losses.nst, kernel="linear"))(s, t)

(`jax.jit(losses.nst)(s, t, kernel="linear")` fails: jit reads "linear" as an array argument.)
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nst_jax import kernels

Array = jax.Array

RESIZE_POLICIES = ("pool", "interpolate", "error")
LAYOUTS = ("NHWC", "NCHW")
# The settings of the losses here, static under jax.jit (see the module docstring).
STATIC_ARGNAMES = ("kernel", "resize", "unbiased", "method", "layout", "degree", "c", "sigma2", "p",
                   "temperature")

# F.normalize's epsilon: a channel whose L2 norm is below it is divided by eps instead.
NORM_EPS = 1e-12


def _compute_dtype(x: Array):
  """float32 for half/bfloat16 inputs, the input's own dtype for float32/float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def l2_normalize(x: Array, axis: int, eps: float = NORM_EPS) -> Array:
  """x / max(||x||_2, eps) along `axis`, with a finite gradient for all-zero vectors.

  Written with rsqrt(max(sum x^2, eps^2)) rather than jnp.linalg.norm, whose gradient at 0 is NaN.
  """
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


# ----------------------------------------------------------------------------------------------------
# Spatial size matching (`docs/kernels.md`, "Definitions": `resize`).


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) averaging matrix of PyTorch's adaptive average pooling along one axis.

  Output cell i averages input positions floor(i * in / out) .. ceil((i + 1) * in / out) - 1.
  """
  mat = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    mat[i, start:end] = 1.0 / (end - start)
  return mat


def adaptive_avg_pool(x: Array, height: int, width: int) -> Array:
  """Adaptive average pooling of an NHWC map to (height, width), each axis on its own."""
  _, h, w, _ = x.shape
  if (h, w) == (height, width):
    return x
  if h % height == 0 and w % width == 0:  # Plain block means: cheaper than the matrix products.
    b, _, _, c = x.shape
    return x.reshape(b, height, h // height, width, w // width, c).mean(axis=(2, 4))
  ph = jnp.asarray(_adaptive_pool_matrix(h, height), x.dtype)
  pw = jnp.asarray(_adaptive_pool_matrix(w, width), x.dtype)
  return jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x, precision=jax.lax.Precision.HIGHEST)


def match_spatial(student: Array, teacher: Array, resize: str = "pool") -> tuple[Array, Array]:
  """Brings two NHWC maps to the same H and W.

  "pool": per axis, the larger map is adaptively average-pooled to the smaller size (non-square maps
  work; RepDistiller's rule). "interpolate": per axis, the smaller map is bilinearly resized up to the
  larger size (half-pixel centres, as PyTorch's align_corners=False). "error": sizes must already agree.
  """
  if resize not in RESIZE_POLICIES:
    raise ValueError(f"Unknown resize policy {resize!r}. Valid policies: {', '.join(RESIZE_POLICIES)}.")
  (_, hs, ws, _), (_, ht, wt, _) = student.shape, teacher.shape
  if (hs, ws) == (ht, wt):
    return student, teacher
  if resize == "error":
    raise ValueError(f"Student and teacher maps differ in spatial size, {hs}x{ws} vs {ht}x{wt}, and "
                     f"resize='error'. Use resize='pool' or 'interpolate' (valid: "
                     f"{', '.join(RESIZE_POLICIES)}).")
  if resize == "pool":
    h, w = min(hs, ht), min(ws, wt)
    return adaptive_avg_pool(student, h, w), adaptive_avg_pool(teacher, h, w)
  h, w = max(hs, ht), max(ws, wt)
  up = lambda x: x if x.shape[1:3] == (h, w) else jax.image.resize(
      x, (x.shape[0], h, w, x.shape[3]), method="bilinear")
  return up(student), up(teacher)


def to_nhwc(feat: Array, layout: str = "NHWC") -> Array:
  """A rank-4 map in `layout` ("NHWC" or "NCHW") as NHWC."""
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}. Valid layouts: {', '.join(LAYOUTS)}.")
  feat = jnp.asarray(feat)
  if layout == "NCHW" and feat.ndim == 4:
    return jnp.transpose(feat, (0, 2, 3, 1))
  return feat


def one_scale(student_hw: tuple[int, int], teacher_hw: tuple[int, int]) -> bool:
  """Whether two spatial sizes (H, W) can be one image at two scales: one map is at least as large as
  the other along both axes, and one factor f takes the larger onto the smaller along both, each axis
  to within a pixel (|large / f - small| <= 1, which covers the rounding of strided layers)."""
  (hs, ws), (ht, wt) = student_hw, teacher_hw
  if hs >= ht and ws >= wt:
    pairs = ((hs, ht), (ws, wt))
  elif hs <= ht and ws <= wt:
    pairs = ((ht, hs), (wt, ws))
  else:
    return False
  low = max(large / (small + 1) for large, small in pairs)
  high = min(large / (small - 1) if small > 1 else float("inf") for large, small in pairs)
  return low <= high


def _check_feature_pair(student: Array, teacher: Array, loss: str, layout: str = "NHWC",
                        resize: str = "pool") -> tuple[Array, Array]:
  """The pair as NHWC arrays, or a ValueError naming what cannot be right about it in `layout`."""
  student, teacher = to_nhwc(student, layout), to_nhwc(teacher, layout)
  if student.ndim != 4 or teacher.ndim != 4:
    raise ValueError(f"{loss}: feature maps must be {layout} (rank 4), got student shape {student.shape} "
                     f"and teacher shape {teacher.shape}.")
  if student.shape[0] != teacher.shape[0]:
    raise ValueError(f"{loss}: student and teacher batch sizes differ: {student.shape[0]} vs "
                     f"{teacher.shape[0]} (shapes {student.shape} and {teacher.shape}).")
  (hs, ws), (ht, wt) = student.shape[1:3], teacher.shape[1:3]
  if resize != "error" and not one_scale((hs, ws), (ht, wt)):
    other = "NCHW" if layout == "NHWC" else "NHWC"
    shapes = [tuple(jnp.shape(x)) for x in (student, teacher)]
    if layout == "NCHW":
      shapes = [(b, c, h, w) for b, h, w, c in shapes]
    raise ValueError(
        f"{loss}: read as {layout}, the student map (shape {shapes[0]}) is {hs}x{ws} and the teacher map "
        f"(shape {shapes[1]}) is {ht}x{wt}, which cannot be one image at two scales (no common factor "
        f"along H and W); if the maps are {other}, pass layout={other!r}.")
  return student, teacher


# ----------------------------------------------------------------------------------------------------
# Losses.


def channel_distributions(feat: Array, layout: str = "NHWC") -> Array:
  """NHWC (B, H, W, C) (or NCHW with `layout`) -> (B, C, H*W): one L2-normalised row per channel, in
  float32 or wider."""
  feat = to_nhwc(feat, layout)
  b, h, w, c = feat.shape
  rows = feat.astype(_compute_dtype(feat)).reshape(b, h * w, c)
  return jnp.swapaxes(l2_normalize(rows, axis=1), 1, 2)


def _normalized_channel_dots(fs: Array, ft: Array) -> tuple[Array, Array, Array]:
  """Dot products of the L2-normalised channel rows of one image, from its raw (HW, C) maps.

  Normalising row c scales Gram entry (c, d) by r_c r_d with r = rsqrt(max(||f_c||^2, eps^2)), and
  ||f_c||^2 is the Gram diagonal. So the normalisation costs O(C^2) on the small matrices instead of a
  pass over the maps, and the backward pass needs nothing but the input maps: extra memory O(C^2).
  """
  hp = jax.lax.Precision.HIGHEST
  gss = kernels.self_dots(fs.T)
  gst = jnp.matmul(fs.T, ft, precision=hp)
  gtt = kernels.self_dots(ft.T)
  rs = jax.lax.rsqrt(jnp.maximum(kernels.diagonal(gss), NORM_EPS * NORM_EPS))
  rt = jax.lax.rsqrt(jnp.maximum(kernels.diagonal(gtt), NORM_EPS * NORM_EPS))
  return gss * jnp.outer(rs, rs), gtt * jnp.outer(rt, rt), gst * jnp.outer(rs, rt)


def nst_per_image(student_feat: Array, teacher_feat: Array, kernel: str | kernels.Kernel = "polynomial", *,
                  resize: str = "pool", unbiased: bool = False, method: str = "auto", layout: str = "NHWC",
                  **params) -> Array:
  """(B,) squared MMD between the L2-normalised channel maps of each image of a student (B, H, W, C_s)
  and a teacher (B, H', W', C_t) feature map; their mean is `nst`. Arguments as `nst`."""
  student, teacher = _check_feature_pair(student_feat, teacher_feat, "nst", layout, resize)
  teacher = jax.lax.stop_gradient(teacher)
  student, teacher = match_spatial(student, teacher, resize)
  b, h, w, cs = student.shape
  ct = teacher.shape[-1]
  if method == "auto":
    method = kernels.choose_method(kernel, cs, ct, h * w, **params)
  if method == "gram" and kernels.is_builtin(kernel):
    dtype = _compute_dtype(student)
    fs = student.astype(dtype).reshape(b, h * w, cs)
    ft = teacher.astype(dtype).reshape(b, h * w, ct)

    def per_image(fs, ft):
      gss, gtt, gst = _normalized_channel_dots(fs, ft)
      return kernels.mmd2_from_dots(gss, gtt, gst, kernel, unbiased=unbiased, **params)

    return jax.vmap(per_image)(fs, ft)
  X, Y = channel_distributions(student), channel_distributions(teacher.astype(_compute_dtype(student)))
  return jax.vmap(lambda x, y: kernels.mmd2(x, y, kernel, unbiased=unbiased, method=method, **params))(X, Y)


def nst(student_feat: Array, teacher_feat: Array, kernel: str | kernels.Kernel = "polynomial", *,
        resize: str = "pool", unbiased: bool = False, method: str = "auto", layout: str = "NHWC",
        **params) -> Array:
  """Neuron Selectivity Transfer loss: the batch mean of the per-image squared MMD between the
  L2-normalised channel maps of a student (B, H, W, C_s) and a teacher (B, H', W', C_t) feature map.

  Args:
    student_feat, teacher_feat: NHWC maps (NCHW with `layout="NCHW"`); channel counts may differ,
      spatial sizes are matched by `resize` ("pool", "interpolate" or "error"). The teacher is under
      stop_gradient.
    kernel: "linear", "polynomial"/"poly" (degree 2, c 0 by default), "gaussian", or a pairwise callable;
      the one setting that may also be given by position.
    unbiased: U-statistic instead of the default V-statistic.
    method: how MMD^2 is computed (see `kernels`); "auto" picks the cheapest exact form per layer.
    layout: "NHWC" (default) or "NCHW" (PyTorch's): the value is the same for a map and its transpose.
    **params: kernel parameters (`degree`, `c`, `sigma2`).

  Under `jax.jit` the settings must be static: see the module docstring (`bind`, `STATIC_ARGNAMES`).
  """
  return jnp.mean(nst_per_image(student_feat, teacher_feat, kernel, resize=resize, unbiased=unbiased,
                                method=method, layout=layout, **params))


def kd(student_logits: Array, teacher_logits: Array, temperature: float = 4.0) -> Array:
  """Hinton's KD: T^2 * KL(softmax(t / T) || softmax(s / T)), summed over classes, batch mean."""
  s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
  if s.ndim != 2 or s.shape != t.shape:
    raise ValueError(f"kd: logits must be (batch, classes) of equal shape, got student {s.shape} and "
                     f"teacher {t.shape}.")
  if not temperature > 0:
    raise ValueError(f"kd: temperature must be > 0, got {temperature!r}.")
  dtype = _compute_dtype(s)
  log_p_s = jax.nn.log_softmax(s.astype(dtype) / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(t).astype(dtype) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * jnp.mean(kl)


def attention_map(feat: Array, p: float = 2, layout: str = "NHWC") -> Array:
  """Zagoruyko's spatial attention: L2-normalise(flatten(mean over channels of |f|^p)), (B, H*W)."""
  feat = to_nhwc(feat, layout)
  f = feat.astype(_compute_dtype(feat))
  am = jnp.mean(jnp.abs(f) ** p, axis=-1)
  return l2_normalize(am.reshape(am.shape[0], -1), axis=1)


def attention(student_feat: Array, teacher_feat: Array, p: float = 2, resize: str = "pool",
              layout: str = "NHWC") -> Array:
  """Attention transfer: mean((a_s - a_t)^2) over batch and positions (RepDistiller's AT). Maps NHWC, or
  NCHW with `layout="NCHW"`."""
  student, teacher = _check_feature_pair(student_feat, teacher_feat, "attention", layout, resize)
  if not p > 0:
    raise ValueError(f"attention: p must be > 0, got {p!r}.")
  student, teacher = match_spatial(student, jax.lax.stop_gradient(teacher), resize)
  return jnp.mean((attention_map(student, p) - attention_map(teacher, p)) ** 2)


def fitnet(student_hint: Array, teacher_feat: Array) -> Array:
  """FitNet hint loss: mean squared error between the (already regressed) student hint and the
  teacher map. The regressor is a student-side module (see the model zoo / train step). An elementwise
  mean over equal shapes: the same in any layout."""
  s, t = jnp.asarray(student_hint), jnp.asarray(teacher_feat)
  if s.shape != t.shape:
    raise ValueError(f"fitnet: the regressed student hint must have the teacher map's shape, got "
                     f"{s.shape} vs {t.shape}; configure the regressor to output {t.shape[1:]}.")
  dtype = _compute_dtype(s)
  return jnp.mean((s.astype(dtype) - jax.lax.stop_gradient(t).astype(dtype)) ** 2)


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy with integer labels, batch mean."""
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"cross_entropy: expected logits (batch, classes) and labels (batch,), got "
                     f"{logits.shape} and {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"cross_entropy: labels must be integer class indices, got dtype {labels.dtype}.")
  logits = logits.astype(_compute_dtype(logits))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# ----------------------------------------------------------------------------------------------------
# Settings bound once, for jit.


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BoundLoss:
  """A loss with its settings bound: call it with the arrays only. Hashable, and a pytree with no
  leaves, so it can be jitted, passed as an argument of a jitted function, or put in a
  `jax.tree_util.Partial` (whose other arguments are leaves: no strings there)."""

  loss: Callable[..., Array]
  settings: tuple[tuple[str, Any], ...] = ()

  def __call__(self, *arrays: Array) -> Array:
    return self.loss(*arrays, **dict(self.settings))


def bind(loss: Callable[..., Array], **settings) -> BoundLoss:
  """`loss` (any function here) with keyword `settings` fixed, e.g. `bind(nst, kernel="linear",
  layout="NCHW")`; the settings must be hashable (strings, numbers, bools, functions)."""
  frozen = tuple(sorted(settings.items()))
  try:
    hash(frozen)
  except TypeError:
    raise TypeError(f"bind: settings must be hashable (strings, numbers, functions), got "
                    f"{ {k: type(v).__name__ for k, v in settings.items()} }.") from None
  return BoundLoss(loss, frozen)
