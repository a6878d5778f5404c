"""A NumPy reference of bilinear image resizing with half-pixel centres, antialiased when shrinking.

Output pixel i of an axis scaled by s = out / in sits at source coordinate c = (i + 0.5) / s - 0.5 and
takes the weights max(0, 1 - |j - c| * min(s, 1)) of source pixels j, normalised over the pixels inside
the image (when shrinking, the triangle is widened by 1 / s: that is the antialiasing). Written from
that definition, separably (rows, then columns), in float64.
"""

import numpy as np


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
  """The (out_size, in_size) interpolation matrix of one axis."""
  scale = out_size / in_size
  centres = (np.arange(out_size) + 0.5) / scale - 0.5
  weights = np.maximum(0.0, 1.0 - np.abs(np.arange(in_size)[None, :] - centres[:, None]) * min(scale, 1.0))
  return weights / weights.sum(1, keepdims=True)


def bilinear_resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 (N, H, W, C) -> uint8 (N, size[0], size[1], C), rounded to the nearest pixel value."""
  rows = resize_weights(images.shape[1], size[0])
  cols = resize_weights(images.shape[2], size[1])
  out = np.einsum("ih,nhwc,jw->nijc", rows, images.astype(np.float64), cols)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)
