"""The zoo's 2-D convolution: XLA's own on GPU and TPU, exact faster formulations of its gradients on CPU.

XLA:CPU computes the kernel gradient of a convolution as another convolution with the batch as the
contracted feature axis, which ran 2-10x slower than the forward pass on the development machines, and
its grouped and depthwise convolutions, forward and backward, 10-50x slower than the same arithmetic as
shifted elementwise products (bench/conv.py measures each). `conv2d` is a `jax.custom_vjp` whose
forward pass and gradients are chosen, per configuration, at lowering time by `lax.platform_dependent`:

* every platform but CPU: `lax.conv_general_dilated` and its autodiff gradients, i.e. exactly what the
  model would compute without this module (cuDNN on GPU);
* CPU, `groups == 1`: XLA's forward pass and input gradient (fast there), and the kernel gradient as
  matrix products of shifted input views with the output gradient, (input view)^T @ grad per kernel
  offset, contracted over all output positions (`kernel_grad`), except for narrow stride-1 k x k
  convolutions, where XLA's own was faster (`_ROWS_MIN_CHANNELS`);
* CPU, depthwise (one input channel per group, as in MobileNetV2 and ShuffleNet): the convolution as
  k*k shifted elementwise products, and its gradients by autodiff of that form (pads and reductions);
* CPU, grouped 1x1 (ShuffleNet v1): a batched matrix product over the groups, gradients by autodiff.

Every formulation is exact up to float32 summation order (the tests compare each one with `jax.vjp` of
`lax.conv_general_dilated`). In bfloat16 the matrix products and the depthwise sums accumulate in
float32 and round once, as XLA's own convolution does.

The implementation is chosen when a function is traced, process-wide: `set_impl("xla")` (e.g. from
`config.conv_impl`) or, for a block, `use_impl("xla")` makes every convolution traced afterwards a
plain `lax.conv_general_dilated`, the reference path. JAX caches traces by function: a function that is
already jitted keeps the implementation it was traced with, so choose before building the step.
"""

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla")

# Process-wide, not per thread: a config switch set once in the main thread must also hold for
# functions traced in other threads.
_impl = "auto"

# NHWC images, HWIO kernels: the layout of every model of the zoo (and of `flax.linen.Conv`).
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def get_impl() -> str:
  """The implementation convolutions traced now will use."""
  return _impl


def set_impl(name: str) -> None:
  """Sets the implementation of every convolution traced from now on: "auto" or "xla"."""
  global _impl
  if name not in IMPLS:
    raise ValueError(f"Unknown convolution implementation {name!r}. Valid: {', '.join(IMPLS)}.")
  _impl = name


@contextlib.contextmanager
def use_impl(name: str):
  """Within the block, convolutions are traced with implementation `name`; the previous one after it."""
  previous = get_impl()
  set_impl(name)
  try:
    yield
  finally:
    set_impl(previous)


def xla_conv(x, kernel, strides, padding, groups):
  """`lax.conv_general_dilated` on NHWC / HWIO: the reference every formulation here must equal."""
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSION_NUMBERS,
                                  feature_group_count=groups)


def conv2d(x, kernel, strides: Sequence[int] = (1, 1), padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
           groups: int = 1):
  """2-D convolution of NHWC `x` with an HWIO `kernel` (in channels per group on axis 2), explicit
  (low, high) `padding` per spatial axis. With implementation "xla" it is `xla_conv`."""
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if get_impl() == "xla" or not _supported(x, kernel, padding, groups):
    return xla_conv(x, kernel, strides, padding, groups)
  return _conv(x, kernel, strides, padding, groups)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated`'s signature, for `flax.linen.Conv(conv_general_dilated=...)`: NHWC /
  HWIO convolutions with explicit padding and no dilation go through `conv2d`, anything else to lax."""
  plain = (lhs.ndim == 4 and not isinstance(padding, str) and _is_nhwc_hwio(dimension_numbers)
           and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and batch_group_count == 1 and precision is None and preferred_element_type is None)
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)
  return conv2d(lhs, rhs, window_strides, padding, feature_group_count)


def _is_nhwc_hwio(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _DIMENSION_NUMBERS


def _supported(x, kernel, padding, groups) -> bool:
  """Configurations with a CPU formulation here; the others (e.g. grouped k x k) stay XLA's alone."""
  if any(p < 0 for pair in padding for p in pair) or x.dtype != kernel.dtype:
    return False
  return groups == 1 or _is_depthwise(x, kernel, groups) or _is_grouped_pointwise(kernel, groups)


def _is_depthwise(x, kernel, groups) -> bool:
  return groups == x.shape[-1] and kernel.shape[2] == 1 and kernel.shape[3] == groups


def _is_grouped_pointwise(kernel, groups) -> bool:
  return groups > 1 and kernel.shape[:2] == (1, 1)


# ---------------------------------------------------------------------------------------------------------
# The custom VJP: the platform picks the formulation at lowering time.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, groups):
  return _forward(x, kernel, strides, padding, groups)


def _forward(x, kernel, strides, padding, groups):
  if groups == 1:  # XLA's forward pass is its fastest on CPU too.
    return xla_conv(x, kernel, strides, padding, groups)
  return lax.platform_dependent(x, kernel, cpu=functools.partial(_cpu_grouped, strides=strides,
                                                                  padding=padding, groups=groups),
                                default=functools.partial(xla_conv, strides=strides, padding=padding,
                                                          groups=groups))


def _conv_fwd(x, kernel, strides, padding, groups):
  return _forward(x, kernel, strides, padding, groups), (x, kernel)


def _conv_bwd(strides, padding, groups, residuals, grad):
  x, kernel = residuals
  return lax.platform_dependent(x, kernel, grad, cpu=functools.partial(_cpu_vjp, strides=strides,
                                                                        padding=padding, groups=groups),
                                default=functools.partial(_xla_vjp, strides=strides, padding=padding,
                                                          groups=groups))


_conv.defvjp(_conv_fwd, _conv_bwd)


def _xla_vjp(x, kernel, grad, *, strides, padding, groups):
  _, vjp = jax.vjp(functools.partial(xla_conv, strides=strides, padding=padding, groups=groups), x, kernel)
  return vjp(grad)


def _cpu_vjp(x, kernel, grad, *, strides, padding, groups):
  if groups == 1 and _xla_kernel_grad_is_faster(kernel.shape, strides):
    return _xla_vjp(x, kernel, grad, strides=strides, padding=padding, groups=groups)
  if groups == 1:
    _, vjp_x = jax.vjp(lambda x_: xla_conv(x_, kernel, strides, padding, 1), x)
    (dx,) = vjp_x(grad)
    return dx, kernel_grad(x, grad, kernel.shape[:2], strides, padding).astype(kernel.dtype)
  _, vjp = jax.vjp(functools.partial(_cpu_grouped, strides=strides, padding=padding, groups=groups), x,
                   kernel)
  return vjp(grad)


# ---------------------------------------------------------------------------------------------------------
# CPU formulations.

# Stride-1 k x k convolutions with fewer channels (in or out) than this keep XLA's kernel gradient:
# measured in the training step (bench/step_torch.py --no-torch), it was the faster one for resnet8's
# 16-64 channels, and `_kernel_grad_rows` from 128 channels up (resnet8x4). 1x1 and strided
# convolutions always take `kernel_grad`, which was faster at every width measured.
_ROWS_MIN_CHANNELS = 128


def _xla_kernel_grad_is_faster(kernel_shape, strides) -> bool:
  kh, kw, cin, cout = kernel_shape
  return strides == (1, 1) and (kh, kw) != (1, 1) and min(cin, cout) < _ROWS_MIN_CHANNELS


def _accumulation_dtype(dtype):
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def shifted_inputs(x, kernel_hw, strides, padding, out_hw):
  """The k*k (shifted, strided) views of the padded input that kernel offset (i, j) meets, each
  (B, OH, OW, C), in row-major (i, j) order."""
  (pt, pb), (pl, pr) = padding
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  (kh, kw), (sh, sw), (oh, ow) = kernel_hw, strides, out_hw
  batch, channels = x.shape[0], x.shape[-1]
  return [lax.slice(xp, (0, i, j, 0), (batch, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, channels),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def kernel_grad(x, grad, kernel_hw, strides, padding):
  """d loss / d kernel of a `groups == 1` convolution, (kh, kw, C_in, C_out), float32 accumulation.

  Entry (i, j) is (input view (i, j))^T @ grad contracted over all output positions. Stride 1 (k > 1):
  `_kernel_grad_rows`; otherwise one matrix product per kernel offset on its strided input view (at
  stride 2 the views are a quarter of the input each, so copying them is cheap).
  """
  if strides == (1, 1) and kernel_hw[1] > 1:
    return _kernel_grad_rows(x, grad, kernel_hw, padding)
  batch, oh, ow, out_channels = grad.shape
  g = grad.reshape(batch * oh * ow, out_channels)
  views = shifted_inputs(x, kernel_hw, strides, padding, (oh, ow))
  taps = [_contract_rows(v.reshape(batch * oh * ow, -1), g) for v in views]
  return jnp.stack(taps).reshape(*kernel_hw, x.shape[-1], out_channels)


def _kernel_grad_rows(x, grad, kernel_hw, padding):
  """Stride-1 kernel gradient with k_h copies of the input instead of k_h * k_w.

  The column offset j moves to the (smaller) gradient: G[b, h, w', j * C_out + o] = grad[b, h, w' - j, o]
  (zero outside) over the padded width W_p, so sum_{b,h,w'} x_pad[b, h + i, w', c] G[b, h, w', j C_out + o]
  is entry (i, j, c, o). One matrix product per kernel row i, (C_in) x (k_w C_out), contracted over
  B * OH * W_p positions: W_p / OW more products than needed (1.06x at 32x32), fewer and larger copies.
  """
  (kh, kw), ((pt, pb), (pl, pr)) = kernel_hw, padding
  batch, oh, ow, out_channels = grad.shape
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  wp = xp.shape[2]
  shifted = [lax.pad(grad, zero, ((0, 0, 0), (0, 0, 0), (j, wp - ow - j, 0), (0, 0, 0))) for j in range(kw)]
  g = jnp.concatenate(shifted, axis=-1).reshape(batch * oh * wp, kw * out_channels)
  rows = [_contract_rows(lax.slice_in_dim(xp, i, i + oh, axis=1).reshape(batch * oh * wp, -1), g)
          for i in range(kh)]
  return jnp.stack(rows).reshape(kh, x.shape[-1], kw, out_channels).transpose(0, 2, 1, 3)


def _contract_rows(a, b):
  """a^T @ b for (N, M) and (N, K): the sum over the N positions, accumulated in float32 for bfloat16."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_accumulation_dtype(a.dtype))


def _output_hw(x, kernel_hw, strides, padding):
  return tuple((x.shape[1 + a] + sum(padding[a]) - kernel_hw[a]) // strides[a] + 1 for a in range(2))


def _cpu_grouped(x, kernel, *, strides, padding, groups):
  """Depthwise or grouped 1x1 convolution without XLA's grouped convolution."""
  if _is_depthwise(x, kernel, groups):
    return depthwise(x, kernel, strides, padding)
  return grouped_pointwise(x, kernel, strides, padding, groups)


def depthwise(x, kernel, strides, padding):
  """Depthwise convolution (kernel (kh, kw, 1, C)) as the sum over offsets of view * kernel[i, j]."""
  kernel_hw = kernel.shape[:2]
  out_hw = _output_hw(x, kernel_hw, strides, padding)
  acc = _accumulation_dtype(x.dtype)
  taps = kernel.reshape(-1, kernel.shape[-1]).astype(acc)
  views = shifted_inputs(x, kernel_hw, strides, padding, out_hw)
  out = functools.reduce(jnp.add, [v.astype(acc) * taps[t] for t, v in enumerate(views)])
  return out.astype(x.dtype)


def grouped_pointwise(x, kernel, strides, padding, groups):
  """Grouped 1x1 convolution as one matrix product per group (a batched dot over the groups)."""
  (x_view,) = shifted_inputs(x, (1, 1), strides, padding, _output_hw(x, (1, 1), strides, padding))
  batch, oh, ow, _ = x_view.shape
  per_group_in, out_channels = kernel.shape[2], kernel.shape[3]
  lhs = x_view.reshape(batch * oh * ow, groups, per_group_in)
  # HWIO grouped kernel: output channel g * (out / groups) + o reads input channels of group g.
  rhs = kernel.reshape(per_group_in, groups, out_channels // groups)
  acc = _accumulation_dtype(x.dtype)
  out = lax.dot_general(lhs, rhs, (((2,), (0,)), ((1,), (1,))), preferred_element_type=acc)  # (G, N, out/G)
  return jnp.moveaxis(out, 0, 1).reshape(batch, oh, ow, out_channels).astype(x.dtype)
