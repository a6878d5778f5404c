"""A user's own Flax models, outside the nst_jax package: a teacher and a student CNN with BatchNorm.

Nothing here knows about nst_jax. The models return plain logits; nst_jax taps their intermediates by
module path (`block2`, `block3/conv`, ...). List them with

    PYTHONPATH=examples/own_models python -m nst_jax.tools.taps my_models:Teacher --image_shape 16,16,1
"""

import flax.linen as nn
import jax.numpy as jnp


class ConvBlock(nn.Module):
  """3x3 convolution, BatchNorm, ReLU."""

  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return nn.relu(x)


class Teacher(nn.Module):
  """Three conv blocks (widths w, 2w, 4w), 2x2 max pooling between them, global mean, a linear head."""

  num_classes: int = 10
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = ConvBlock(self.width, name="block1")(x, train)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = ConvBlock(2 * self.width, name="block2")(x, train)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = ConvBlock(4 * self.width, name="block3")(x, train)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class Student(nn.Module):
  """Two conv blocks (widths w, 2w), each followed by 2x2 max pooling, global mean, a linear head. Its
  submodules are unnamed, so Flax names them by class and order: `ConvBlock_0`, `ConvBlock_1`, `Dense_0`."""

  num_classes: int = 10
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = ConvBlock(self.width)(x, train)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = ConvBlock(2 * self.width)(x, train)
    x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
