"""NumPy references shared by the data tests: undoing normalisation, and recovering random crops.

A CIFAR-style augmented image is a window of the zero-padded source, possibly mirrored. Instead of
re-running the pipeline's random draws, the tests search every (source, offset, flip) for the window
equal to the output, which checks the augmentation without trusting its own arithmetic.
"""

import numpy as np


def denormalize(x, mean, std) -> np.ndarray:
  """(x * std + mean) * 255 back to uint8 pixels; raises if any value is not (nearly) a whole pixel."""
  pixels = (np.asarray(x, np.float64) * np.asarray(std) + np.asarray(mean)) * 255.0
  rounded = np.round(pixels)
  assert np.max(np.abs(pixels - rounded)) < 1e-3, "output is not an affine image of whole pixel values"
  return rounded.astype(np.uint8)


def normalize(images, mean, std) -> np.ndarray:
  """(images / 255 - mean) / std in float64."""
  return (np.asarray(images, np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)


def recover_crops(outputs: np.ndarray, sources: np.ndarray, pad: int) -> list[tuple[int, int, int, bool]]:
  """For each output (H, W, C), the unique (source index, dy, dx, flipped) whose padded window it is.

  dy, dx are the window's offsets in the padded image (0 .. 2 * pad). Asserts that exactly one candidate
  matches, so a wrong window, a wrong flip or a non-zero padding fails.
  """
  n, h, w, c = sources.shape
  padded = np.pad(sources, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  # (N, 2p+1, 2p+1, C, H, W) -> (N, 2p+1, 2p+1, H, W, C)
  windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
  found = []
  for out in outputs:
    hits = []
    for flipped, target in ((False, out), (True, out[:, ::-1])):
      match = np.all(windows == target, axis=(3, 4, 5))
      hits += [(int(i), int(dy), int(dx), flipped) for i, dy, dx in zip(*np.nonzero(match), strict=True)]
    assert len(hits) == 1, f"expected one matching window, found {hits}"
    found.append(hits[0])
  return found
