"""Building blocks shared by every model family: PyTorch-equivalent Conv, BatchNorm and Dense.

The model zoo reproduces PyTorch networks (RepDistiller, torchvision, the official NST code) so that
parameter counts, FLOPs and converted weights carry over. These wrappers fix the conventions once:

* BatchNorm follows PyTorch: epsilon 1e-5, running-average momentum 0.1, and running variances that
  track the unbiased batch variance. It normalises with batch statistics when `train` and with the
  running statistics otherwise, and only updates them in training. With `axis_name` set (the pmap
  path), batch statistics are averaged over that device axis (synchronised BatchNorm).
* Convolutions use He (fan-out) normal initialisation, as torchvision and RepDistiller do.
* `dtype` is the compute dtype (e.g. bfloat16); parameters stay float32 (`param_dtype`).
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Dtype = Any

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
  """2-D convolution on NHWC inputs with PyTorch-style symmetric integer padding.

  The arithmetic is `nst_jax.models.conv.conv2d` (XLA's convolution on GPU/TPU, exact faster
  formulations on CPU; `conv.use_impl("xla")` selects plain XLA everywhere); the parameters are
  `flax.linen.Conv`'s, so checkpoints and converted weights do not depend on the implementation.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int | None = None  # None: kernel_size // 2 ("same" for odd kernels).
  groups: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = conv_init

  @nn.compact
  def __call__(self, x):
    from nst_jax.models import conv

    pad = self.kernel_size // 2 if self.padding is None else self.padding
    return nn.Conv(
        self.features,
        (self.kernel_size, self.kernel_size),
        strides=(self.strides, self.strides),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=self.groups,
        use_bias=self.use_bias,
        kernel_init=self.kernel_init,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=conv.conv_general_dilated,
    )(x)


MOMENTUM = 0.1  # PyTorch's: running = (1 - MOMENTUM) * running + MOMENTUM * batch statistic.


def batch_moments(x, axis_name: str | None = None):
  """Per-channel (mean, biased variance, n) over every axis of `x` but the last.

  n is the number of elements per channel, on all devices of `axis_name` together when it is set (the
  moments are then the global ones, assuming every device holds as many elements). The variance is the
  two-pass mean of squared deviations, not E[x^2] - E[x]^2, whose cancellation costs float32 digits on
  maps with a large mean; PyTorch's CPU and cuDNN kernels are two-pass-accurate too.
  """
  axes = tuple(range(x.ndim - 1))
  count = math.prod(x.shape[:-1])
  mean = jnp.mean(x, axes)
  if axis_name is not None:
    mean = lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(x - mean), axes)
  if axis_name is not None:
    var = lax.pmean(var, axis_name)
    count *= lax.axis_size(axis_name)
  return mean, var, count


class _BatchNormCore(nn.Module):
  """The normalisation and its variables (`scale`, `bias`; `mean`, `var` in `batch_stats`).

  `BatchNorm` calls it as `BatchNorm_0`, the child name and variable names of Flax's `nn.BatchNorm`,
  so every parameter tree of the zoo has the layout `nn.BatchNorm` gives.
  """

  dtype: Dtype
  axis_name: str | None
  scale_init: Any
  use_scale: bool
  epsilon: float

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    # Statistics in at least float32, also for bfloat16 activations.
    x_stats = x.astype(jnp.promote_types(x.dtype, jnp.float32))

    if train:
      initializing = self.is_initializing()
      # `init` may run outside the device map, so it must not touch the axis.
      mean, var, count = batch_moments(x_stats, None if initializing else self.axis_name)
      if not initializing:
        if count < 2:
          raise ValueError(f"BatchNorm in training needs more than one value per channel, got input shape "
                           f"{x.shape}{f' per device on axis {self.axis_name!r}' if self.axis_name else ''}.")
        # PyTorch's convention: normalise with the biased variance, but track the unbiased one.
        unbiased_var = var * (count / (count - 1))
        running_mean.value = (1 - MOMENTUM) * running_mean.value + MOMENTUM * mean
        running_var.value = (1 - MOMENTUM) * running_var.value + MOMENTUM * unbiased_var
    else:
      mean, var = running_mean.value, running_var.value

    multiplier = lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      multiplier = multiplier * self.param("scale", self.scale_init, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return ((x_stats - mean) * multiplier + bias).astype(self.dtype)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's defaults and running-statistics convention.

  Training normalises with the batch mean and biased variance and moves the running statistics by
  momentum 0.1 towards the batch mean and the *unbiased* variance (times n / (n - 1), n the elements per
  channel, over all devices of `axis_name`), as PyTorch does, so running variances agree with a PyTorch
  model trained on the same batches. Evaluation normalises with the running statistics and leaves them.
  `use_scale=False` is MXNet's `fix_gamma=True` (a scale pinned at 1 is no parameter at all);
  `epsilon` can be set to MXNet's 2e-5 where exact parity with converted MXNet weights matters.
  """

  dtype: Dtype = jnp.float32
  axis_name: str | None = None
  scale_init: Any = nn.initializers.ones
  use_scale: bool = True
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    return _BatchNormCore(self.dtype, self.axis_name, self.scale_init, self.use_scale, self.epsilon,
                          name="BatchNorm_0")(x, train)


# PyTorch's default `nn.Linear` weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1/(3 fan_in).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Dense(nn.Module):
  """Fully connected layer (PyTorch `nn.Linear`), float32 parameters.

  The default initialisers are PyTorch's (uniform weights with bound 1/sqrt(fan_in), zero bias here
  rather than PyTorch's uniform bias, a difference no result depends on); families that initialise
  their classifier differently (e.g. normal(0, 0.01) for VGG) pass their own.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = torch_linear_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=self.kernel_init, bias_init=self.bias_init)(x)


def max_pool(x, window: int, stride: int, padding: int = 0):
  """PyTorch `MaxPool2d(window, stride, padding)`: padded positions never win."""
  pad = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


def avg_pool(x, window: int, stride: int, padding: int = 0, count_include_pad: bool = True):
  """PyTorch `AvgPool2d(window, stride, padding)` (count_include_pad=True by default, as in PyTorch)."""
  pad = ((padding, padding), (padding, padding))
  return nn.avg_pool(x, (window, window), strides=(stride, stride), padding=pad,
                     count_include_pad=count_include_pad)


def global_avg_pool(x):
  """Mean over the spatial axes of an NHWC map, (B, H, W, C) -> (B, C)."""
  return jnp.mean(x, axis=(1, 2))
