"""Building blocks shared by every model family: PyTorch-equivalent Conv, BatchNorm and Dense.

The model zoo reproduces PyTorch networks (RepDistiller, torchvision, the official NST code) so that
parameter counts, FLOPs and converted weights carry over. These wrappers fix the conventions once:

* BatchNorm uses PyTorch's defaults: epsilon 1e-5 and running-average momentum 0.1 (Flax counts the
  momentum the other way round, so 0.9 here). It normalises with batch statistics when `train` and with
  the running statistics otherwise, and only updates them in training. With `axis_name` set (the pmap
  path), batch statistics are averaged over that device axis (synchronised BatchNorm).
* Convolutions use He (fan-out) normal initialisation, as torchvision and RepDistiller do.
* `dtype` is the compute dtype (e.g. bfloat16); parameters stay float32 (`param_dtype`).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
  """2-D convolution on NHWC inputs with PyTorch-style symmetric integer padding."""

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
    )(x)


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's defaults; batch statistics in training, running ones in evaluation.

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
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=self.epsilon,
        use_scale=self.use_scale,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        axis_name=self.axis_name,
        scale_init=self.scale_init,
    )(x)


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
