"""The tap listing on the command line: every feature tap of a model, with its output shape.

    python -m nst_jax.tools.taps MODEL [--image_shape 32,32,3] [--num_classes 10] [--train]

MODEL is a zoo name (`resnet8`), or an import path `package.module:attr` (the package on PYTHONPATH;
see `nst_jax.models`). The names printed are what `distill.nst.layers`, `distill.at.layers` and
`distill.fitnet.layer` accept for that model: a zoo model's own tap names first, then every submodule's
module path in call order (`nst_jax.taps`), each with the shape of its output for one image of
`--image_shape` (the batch axis included, as 1). Only shapes are traced; nothing is computed.
"""

import argparse
import sys
from collections.abc import Sequence

from nst_jax import models, taps


def _shape(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
  except ValueError:
    shape = ()
  if not shape or min(shape) < 1:
    raise argparse.ArgumentTypeError(f"expected positive sizes like 32,32,3 (H,W,C), got {text!r}")
  return shape


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (see the module docstring); prints the listing, returns 0."""
  parser = argparse.ArgumentParser(
      prog="python -m nst_jax.tools.taps",
      description="List the feature taps of a model (its own tap names and its submodules' module paths) "
                  "with their output shapes: the names distill.nst.layers, distill.at.layers and "
                  "distill.fitnet.layer accept.")
  parser.add_argument("model", help="a zoo name (resnet8) or an import path package.module:attr (the package "
                                    "on PYTHONPATH)")
  parser.add_argument("--image_shape", type=_shape, default=(32, 32, 3),
                      help="one input's shape H,W,C (default 32,32,3)")
  parser.add_argument("--num_classes", type=int, default=10, help="the number of classes (default 10)")
  parser.add_argument("--train", action="store_true", help="list the taps of the training-mode pass")
  args = parser.parse_args(argv)
  try:
    model = models.get_model(args.model, args.num_classes)
    listing = taps.list_taps(model, args.image_shape, train=args.train)
  except (ValueError, TypeError) as error:
    parser.exit(2, f"{parser.prog}: error: {error}\n")
  print(taps.format_taps(listing))
  return 0


if __name__ == "__main__":
  sys.exit(main())
