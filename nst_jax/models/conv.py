"""The zoo's 2-D convolution: XLA's own on GPU and TPU, exact formulations of it and of its gradients
chosen by measurement on CPU.

XLA:CPU's gradients of a convolution are themselves convolutions (the kernel gradient one with the batch
as the contracted feature axis), and its grouped and depthwise convolutions, forward and backward, ran
10-50x slower than the same arithmetic as shifted elementwise products (bench/conv.py measures each).
`conv2d` is a `jax.custom_vjp` whose forward pass and gradients are chosen per configuration, at lowering
time by `lax.platform_dependent`:

* every platform but CPU: `lax.conv_general_dilated` and its autodiff gradients, i.e. exactly what the
  model would compute without this module (cuDNN on GPU);
* CPU, `groups == 1`: the forward pass and each gradient in the formulation a measured table names for
  that configuration (input and kernel shape, strides, padding, dtype): the fastest when
  `bench/conv.py --write-table` timed them all, where it beat XLA's own by a margin (`choose`,
  `TABLE_FILE`):

  - forward pass (`forward`): "xla" or "concat" (the k*k shifted views concatenated along channels times
    the kernel as one (k*k*C_in) x C_out matrix);
  - kernel gradient (`kernel_grad`): "xla" (XLA's own), "taps" (one matrix product per kernel offset,
    (shifted input view)^T @ grad, contracted over all output positions), "rows" (stride 1: one product
    per kernel row, the column offset moved to the gradient) or "concat" (the k*k shifted views
    concatenated along channels, one (k*k*C_in) x C_out contraction; over chunks of the batch, summed, so
    that the concatenated copy stays below `CONCAT_CHUNK_BYTES`);
  - input gradient (`input_grad`): "xla", "flip" (stride 1: the forward convolution of the output
    gradient with the spatially flipped, transposed kernel) or "col2im" (one matrix product of the output
    gradient with the kernel, each offset's block then added at its place: over chunks of the batch, as
    "concat");

* CPU, depthwise (one input channel per group, as in MobileNetV2 and ShuffleNet): the convolution as
  k*k shifted elementwise products, and its gradients by autodiff of that form (pads and reductions);
* CPU, grouped 1x1 (ShuffleNet v1): a batched matrix product over the groups, gradients by autodiff.

Every formulation is exact up to float32 summation order (the tests compare each one with `jax.vjp` of
`lax.conv_general_dilated`), so the table decides speed only, never values beyond rounding. In bfloat16
the matrix products and the depthwise sums accumulate in float32 and round once, as XLA's own
convolution does.

The shipped table (`conv_table.json` beside this file) was measured on one machine, named in it;
configurations it lacks take the entry of the same configuration at the nearest batch size, else
`DEFAULT_CHOICE`. `bench/conv.py --write-table PATH` measures a table for the machine it runs on;
`set_table(PATH)` or the environment variable `NST_JAX_CONV_TABLE` (read when the first convolution is
traced) makes it the one in use. A table that cannot be read falls back to the shipped one with one
warning, so it never stops a run.

The implementation is chosen when a function is traced, process-wide: `set_impl("xla")` (e.g. from
`config.conv_impl`) or, for a block, `use_impl("xla")` makes every convolution traced afterwards a
plain `lax.conv_general_dilated`, the reference path. JAX caches traces by function: a function that is
already jitted keeps the implementation (and table) it was traced with, so choose before building the
step.
"""

import contextlib
import functools
import json
import math
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

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
  cpu = _cpu_forward if groups == 1 else _cpu_grouped
  return lax.platform_dependent(x, kernel, cpu=functools.partial(cpu, strides=strides, padding=padding,
                                                                  groups=groups),
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


def _cpu_forward(x, kernel, *, strides, padding, groups):
  assert groups == 1, groups
  form = choose(x.shape, kernel.shape, strides, padding, x.dtype).fwd
  if form == "xla":
    return xla_conv(x, kernel, strides, padding, 1)
  return forward(x, kernel, strides, padding, form)


def _cpu_vjp(x, kernel, grad, *, strides, padding, groups):
  if groups != 1:
    _, vjp = jax.vjp(functools.partial(_cpu_grouped, strides=strides, padding=padding, groups=groups), x,
                     kernel)
    return vjp(grad)
  choice = choose(x.shape, kernel.shape, strides, padding, x.dtype)
  if (choice.dx, choice.dw) == ("xla", "xla"):
    return _xla_vjp(x, kernel, grad, strides=strides, padding=padding, groups=1)
  if choice.dx == "xla":
    (dx,) = jax.vjp(lambda x_: xla_conv(x_, kernel, strides, padding, 1), x)[1](grad)
  else:
    dx = input_grad(grad, kernel, x.shape[1:3], strides, padding, choice.dx)
  if choice.dw == "xla":
    (dw,) = jax.vjp(lambda k_: xla_conv(x, k_, strides, padding, 1), kernel)[1](grad)
  else:
    dw = kernel_grad(x, grad, kernel.shape[:2], strides, padding, choice.dw).astype(kernel.dtype)
  return dx, dw


# ---------------------------------------------------------------------------------------------------------
# Choosing a formulation: the measured table.

# Formulations of the forward pass and of each gradient of a `groups == 1` convolution, XLA's own first.
FWD_FORMS = ("xla", "concat")
DX_FORMS = ("xla", "flip", "col2im")
DW_FORMS = ("xla", "taps", "rows", "concat")
FORMS = {"fwd": FWD_FORMS, "dx": DX_FORMS, "dw": DW_FORMS}
TABLE_FILE = pathlib.Path(__file__).with_name("conv_table.json")
TABLE_ENV = "NST_JAX_CONV_TABLE"


class Choice(NamedTuple):
  """The formulation of the forward pass (`fwd`, of FWD_FORMS), of the input gradient (`dx`, of DX_FORMS)
  and of the kernel gradient (`dw`, of DW_FORMS)."""
  fwd: str
  dx: str
  dw: str


# Configurations neither in the table nor at another batch size in it. The gradients take "col2im" and
# "concat", which apply at every stride and, where the shipped table took them (9 and 4 of its 18
# configurations), ran 1.3-4.3x and 1.4-3.8x as fast as XLA's own. The forward pass keeps XLA's own, which
# XLA fuses with the BatchNorm and ReLU around it: alone a form may look faster and still slow a model
# down (XLA_MARGIN in bench/conv.py).
DEFAULT_CHOICE = Choice(fwd="xla", dx="col2im", dw="concat")

# The bound on the copy of "concat" and "col2im" (the concatenated views, the col2im products), per chunk
# of the batch: the largest divisor of the batch whose copy fits (one image at least, however large).
# Copies of about 2-8 MiB per chunk ran fastest for the CIFAR ResNets' shapes: the whole batch at once
# (151 MiB for 64 images at 32x32 with 64 channels) ran 2-3x slower, one image per chunk (2.25 MiB there)
# 1.1-1.3x slower than two.
CONCAT_CHUNK_BYTES = 8 * 2**20

_table_source: str | os.PathLike | Mapping | None = None  # None: $NST_JAX_CONV_TABLE, else TABLE_FILE.
_table_cache: dict | None = None


def table_key(x_shape, kernel_shape, strides, padding, dtype) -> str:
  """The table's key of a `groups == 1` configuration, e.g. "float32 64x32x32x64 3x3x64x64 s1x1 p1,1,1,1"."""
  dims = lambda shape: "x".join(str(int(d)) for d in shape)
  pads = ",".join(str(int(p)) for pair in padding for p in pair)
  return f"{jnp.dtype(dtype).name} {dims(x_shape)} {dims(kernel_shape)} s{dims(strides)} p{pads}"


def _parse_key(key: str):
  dtype, x_shape, rest = key.split(" ", 2)
  return dtype, tuple(int(d) for d in x_shape.split("x")), rest


def set_table(table: str | os.PathLike | Mapping | None) -> None:
  """The table convolutions traced from now on are chosen by: a JSON file written by `bench/conv.py
  --write-table`, its contents as a mapping, or None for `$NST_JAX_CONV_TABLE` if set, else TABLE_FILE."""
  global _table_source, _table_cache
  _table_source, _table_cache = table, None


@contextlib.contextmanager
def use_table(table: str | os.PathLike | Mapping | None):
  """Within the block, convolutions are chosen by `table` (as in `set_table`); the previous one after it."""
  previous = _table_source
  set_table(table)
  try:
    yield
  finally:
    set_table(previous)


def load_table(source: str | os.PathLike | Mapping | None = None) -> dict:
  """{key: Choice} of a table (see `set_table`); an unreadable or malformed one gives the shipped table
  and one warning, naming the problem."""
  if source is None:
    source = os.environ.get(TABLE_ENV) or TABLE_FILE
  try:
    data = source if isinstance(source, Mapping) else json.loads(pathlib.Path(source).read_text())
    return {key: _checked_choice(key, entry) for key, entry in data["entries"].items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    if not isinstance(source, Mapping) and pathlib.Path(source) == TABLE_FILE:
      raise  # The shipped table is part of the package: a broken one is a bug, not a machine's state.
    warnings.warn(f"Convolution table {source!r} unusable ({type(e).__name__}: {e}); using the shipped "
                  f"table {TABLE_FILE.name}.", stacklevel=2)
    return load_table(TABLE_FILE)


def _checked_choice(key, entry) -> Choice:
  # Tables measured before the forward pass had formulations name none: XLA's.
  choice = Choice(fwd=entry.get("fwd", "xla"), dx=entry["dx"], dw=entry["dw"])
  if any(form not in FORMS[part] for part, form in choice._asdict().items()):
    raise ValueError(f"entry {key!r}: {tuple(choice)}; valid fwd: {', '.join(FWD_FORMS)}, "
                     f"dx: {', '.join(DX_FORMS)}, dw: {', '.join(DW_FORMS)}")
  return choice


def _table() -> dict:
  global _table_cache
  if _table_cache is None:
    _table_cache = load_table(_table_source)
  return _table_cache


def choose(x_shape, kernel_shape, strides, padding, dtype) -> Choice:
  """The formulations of a `groups == 1` convolution on CPU, forward pass and gradients: the table's
  entry for the configuration; else that of the same configuration at the nearest batch size (by
  ratio); else DEFAULT_CHOICE. Forms a configuration cannot take (e.g. "rows" or "flip" at stride 2)
  become "xla"."""
  table = _table()
  key = table_key(x_shape, kernel_shape, strides, padding, dtype)
  choice = table.get(key)
  if choice is None:
    dtype_name, _, rest = _parse_key(key)
    same = [(abs(math.log(shape[0] / x_shape[0])), shape[0], k) for k in table
            for d, shape, r in [_parse_key(k)] if d == dtype_name and r == rest and shape[1:] == x_shape[1:]]
    choice = table[min(same)[2]] if same else DEFAULT_CHOICE
  return Choice(*(form if form_applies(part, form, kernel_shape, strides, padding) else "xla"
                  for part, form in choice._asdict().items()))


def form_applies(part: str, form: str, kernel_shape, strides, padding) -> bool:
  """Whether `part` ("fwd", "dx" or "dw") of this configuration can take formulation `form`: "rows" needs
  stride 1 and k_w > 1; "flip" stride 1 and padding <= k - 1 per side (it pads by k - 1 - p); the others
  apply to every configuration."""
  if form not in FORMS[part]:
    return False
  if form == "rows":
    return tuple(strides) == (1, 1) and kernel_shape[1] > 1
  if form == "flip":
    return tuple(strides) == (1, 1) and all(
        p <= k - 1 for k, pair in zip(kernel_shape[:2], padding, strict=True) for p in pair)
  return True


# ---------------------------------------------------------------------------------------------------------
# CPU formulations.


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


def kernel_grad(x, grad, kernel_hw, strides, padding, form: str = "concat"):
  """d loss / d kernel of a `groups == 1` convolution, (kh, kw, C_in, C_out), float32 accumulation.

  Entry (i, j) is (input view (i, j))^T @ grad contracted over all output positions, computed as `form`:
  "taps" (one matrix product per (i, j)), "rows" (stride 1, k_w > 1: `_kernel_grad_rows`) or "concat"
  (`_kernel_grad_concat`).
  """
  if form == "concat":
    return _kernel_grad_concat(x, grad, kernel_hw, strides, padding)
  if form == "rows" and form_applies("dw", form, kernel_hw, strides, padding):
    return _kernel_grad_rows(x, grad, kernel_hw, padding)
  if form != "taps":
    raise ValueError(f"Unknown or inapplicable kernel gradient form {form!r} for kernel {kernel_hw} at "
                     f"strides {strides}. Valid: taps, concat, rows (stride 1, k_w > 1).")
  batch, oh, ow, out_channels = grad.shape
  g = grad.reshape(batch * oh * ow, out_channels)
  views = shifted_inputs(x, kernel_hw, strides, padding, (oh, ow))
  taps = [_contract_rows(v.reshape(batch * oh * ow, -1), g) for v in views]
  return jnp.stack(taps).reshape(*kernel_hw, x.shape[-1], out_channels)


def concat_chunk(batch: int, bytes_per_image: int, max_bytes: int | None = None) -> int:
  """Images per chunk of a batch-chunked formulation: the largest divisor of `batch` whose
  `bytes_per_image` x chunk is at most `max_bytes` (CONCAT_CHUNK_BYTES), and 1 at least."""
  max_bytes = CONCAT_CHUNK_BYTES if max_bytes is None else max_bytes
  return max([d for d in range(1, batch + 1) if batch % d == 0 and d * bytes_per_image <= max_bytes],
             default=1)


def over_batch_chunks(fn, arrays, bytes_per_image: int, *, summed: bool):
  """`fn(*arrays)` over chunks of the batch (axis 0 of every array) whose temporary copy, `bytes_per_image`
  per image, stays within CONCAT_CHUNK_BYTES (`concat_chunk`): the chunks' results summed (`summed`: a
  kernel gradient) or put back together along the batch (an output or an input gradient). A batch that
  fits is one call; otherwise a `lax.scan` (summed) or `lax.map` runs over the chunks."""
  batch = arrays[0].shape[0]
  # Under jit over several devices the batch is sharded in `groups` contiguous blocks: every chunk takes
  # `chunk` images from each block, so no chunk straddles two devices. (Chunks of consecutive images made
  # XLA regroup the batch across subsets of the devices inside the loop, and its CPU collectives then
  # deadlocked.) Under pmap, or where the batch does not divide, `groups` is 1.
  groups = jax.device_count() if batch % jax.device_count() == 0 else 1
  per_group = batch // groups
  chunk = concat_chunk(per_group, bytes_per_image)
  if chunk == per_group:
    return fn(*arrays)
  steps = per_group // chunk

  def split(a):  # (B, ...) -> (steps, groups * chunk, ...): step s holds images [s*chunk, (s+1)*chunk)
    a = a.reshape(groups, steps, chunk, *a.shape[1:])  # of every block.
    return jnp.swapaxes(a, 0, 1).reshape(steps, groups * chunk, *a.shape[3:])

  chunks = tuple(split(a) for a in arrays)
  if summed:
    init = jax.tree.map(lambda r: jnp.zeros(r.shape, r.dtype), jax.eval_shape(fn, *(c[0] for c in chunks)))
    out, _ = lax.scan(lambda acc, cs: (acc + fn(*cs), None), init, chunks)
    return out
  out = lax.map(lambda cs: fn(*cs), chunks)  # (steps, groups * chunk, ...), back to batch order:
  out = out.reshape(steps, groups, chunk, *out.shape[2:])
  return jnp.swapaxes(out, 0, 1).reshape(batch, *out.shape[3:])


def _copy_bytes(kernel_hw, strides, positions: int, channels: int, dtype) -> int:
  """Bytes per image of the k*k views concatenated at `positions` positions: none for a stride-1 1x1
  convolution, whose one view is the array itself."""
  if tuple(kernel_hw) == (1, 1) and tuple(strides) == (1, 1):
    return 0
  return positions * kernel_hw[0] * kernel_hw[1] * channels * jnp.dtype(dtype).itemsize


def _concatenated_views(x, kernel_hw, strides, padding, out_hw):
  views = shifted_inputs(x, kernel_hw, strides, padding, out_hw)
  return views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)


def forward(x, kernel, strides, padding, form: str = "concat"):
  """The output of a `groups == 1` convolution, computed as `form`.

  "concat": the k*k shifted views of the input concatenated along channels, (B, OH, OW, k_h k_w C_in),
  times the kernel as a (k_h k_w C_in) x C_out matrix; over chunks of the batch (`over_batch_chunks`) so
  that the copy stays within CONCAT_CHUNK_BYTES. In bfloat16 the products accumulate in float32 and round
  once.
  """
  if form != "concat":
    raise ValueError(f"Unknown forward form {form!r}. Valid: concat.")
  kernel_hw = kernel.shape[:2]
  out_hw = _output_hw(x, kernel_hw, strides, padding)
  matrix = kernel.reshape(-1, kernel.shape[3])

  def product(x_):
    a = _concatenated_views(x_, kernel_hw, strides, padding, out_hw)
    out = lax.dot_general(a, matrix, (((3,), (0,)), ((), ())),
                          preferred_element_type=_accumulation_dtype(x.dtype))
    return out.astype(x.dtype)

  image_bytes = _copy_bytes(kernel_hw, strides, out_hw[0] * out_hw[1], x.shape[-1], x.dtype)
  return over_batch_chunks(product, (x,), image_bytes, summed=False)


def _kernel_grad_concat(x, grad, kernel_hw, strides, padding):
  """The kernel gradient as one contraction: the k*k shifted views concatenated along channels,
  (B OH OW) x (k_h k_w C_in), contracted with the (B OH OW) x C_out gradient, reshaped to (k_h, k_w, C_in,
  C_out). The concatenation is a copy of k_h k_w C_in values per output position, made over chunks of the
  batch (`over_batch_chunks`, the chunks' products summed) within CONCAT_CHUNK_BYTES."""
  batch, oh, ow, out_channels = grad.shape

  def contract(x_, g_):
    n = x_.shape[0] * oh * ow
    a = _concatenated_views(x_, kernel_hw, strides, padding, (oh, ow))
    return _contract_rows(a.reshape(n, -1), g_.reshape(n, out_channels))

  image_bytes = _copy_bytes(kernel_hw, strides, oh * ow, x.shape[-1], x.dtype)
  out = over_batch_chunks(contract, (x, grad), image_bytes, summed=True)
  return out.reshape(*kernel_hw, x.shape[-1], out_channels)


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


def input_grad(grad, kernel, x_hw, strides, padding, form: str = "col2im"):
  """d loss / d input of a `groups == 1` convolution, (B, H, W, C_in), for output gradient `grad`, as
  `form`:

  * "flip" (stride 1, padding <= k - 1 per side): XLA's forward convolution of `grad`, padded by k - 1 - p
    per side, with the kernel flipped in both spatial axes and its channel axes swapped;
    dx[b, h, w, c] = sum_{i, j, o} grad_pad[b, h + i, w + j, o] kernel[k_h - 1 - i, k_w - 1 - j, c, o].
  * "col2im" (any stride): the products P = grad @ kernel^T, (B, OH, OW, k_h k_w C_in), in one matrix
    product, then each offset's block (i, j) added at its place in the padded input,
    dx_pad[b, s_h h + i, s_w w + j, c] += P[b, h, w, (i, j, c)], and the padding cut off. P is the copy
    bounded by CONCAT_CHUNK_BYTES (over chunks of the batch, `over_batch_chunks`); products accumulate in
    float32 for bfloat16.
  """
  if form == "col2im":
    return _input_grad_col2im(grad, kernel, x_hw, strides, padding)
  kh, kw = kernel.shape[:2]
  if form != "flip" or not form_applies("dx", form, kernel.shape, strides, padding):
    raise ValueError(f"Unknown or inapplicable input gradient form {form!r} for kernel {kernel.shape} at "
                     f"strides {strides}, padding {padding}. Valid: col2im, flip (stride 1, padding <= "
                     "k - 1).")
  (pt, pb), (pl, pr) = padding
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx = xla_conv(grad, flipped, (1, 1), ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)), 1)
  assert dx.shape[1:3] == tuple(x_hw), (dx.shape, x_hw)
  return dx


def _input_grad_col2im(grad, kernel, x_hw, strides, padding):
  kh, kw, in_channels, out_channels = kernel.shape
  (pt, pb), (pl, pr) = padding
  (sh, sw), (oh, ow) = strides, grad.shape[1:3]
  hp, wp = x_hw[0] + pt + pb, x_hw[1] + pl + pr
  acc = _accumulation_dtype(grad.dtype)
  matrix = kernel.reshape(kh * kw * in_channels, out_channels)

  def scatter(g_):
    products = lax.dot_general(g_, matrix, (((3,), (1,)), ((), ())), preferred_element_type=acc)
    products = products.reshape(*g_.shape[:3], kh, kw, in_channels)
    zero = jnp.zeros((), acc)
    # Block (i, j) lands on rows i, i + s_h, ..., columns j, j + s_w, ...: an interior padding of s - 1.
    placed = [lax.pad(products[:, :, :, i, j], zero, ((0, 0, 0), (i, hp - i - (oh - 1) * sh - 1, sh - 1),
                                                      (j, wp - j - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))
              for i in range(kh) for j in range(kw)]
    dx_pad = functools.reduce(jnp.add, placed)
    return dx_pad[:, pt:pt + x_hw[0], pl:pl + x_hw[1]].astype(grad.dtype)

  image_bytes = _copy_bytes((kh, kw), strides, oh * ow, in_channels, acc)
  return over_batch_chunks(scatter, (grad,), image_bytes, summed=False)


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
