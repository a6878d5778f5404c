"""Runs one nst_jax experiment:

    python launch.py --config configs/<name>.py --workdir <dir> [--config.a.b=value ...]

The config is locked: an unknown key or a value of the wrong type ends in a message naming the key and
the valid ones. Running the same command again resumes from the last checkpoint in <dir>. For a multi-host
run (TPU pods, GPU clusters) add --distributed on every host: it calls jax.distributed.initialize(),
which reads the cluster from the environment.
"""

import os
import sys

# TensorFlow (TFDS, TensorBoard) is only a data/logging helper here: keep its C++ banners quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")


def _valid_keys(config, prefix=""):
  keys = []
  for key, value in config.items():
    keys += _valid_keys(value, f"{prefix}{key}.") if hasattr(value, "items") else [f"{prefix}{key}"]
  return keys


def parse_flags(argv):
  """absl's flag parsing, with config errors turned into one clear message instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    # Unknown config keys surface as AttributeError/KeyError from ml_collections, bad values as
    # flags.Error: name the offending flag and list the keys the config does have.
    message = str(error).strip("'\"").replace("\\'", "'").replace("\\n", " ")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    hint = ""
    if bad:
      from configs import default

      hint = "\nValid config keys: " + ", ".join(_valid_keys(default.get_config()))
    sys.exit(f"launch.py: bad command-line flag ({message}) in: {' '.join(argv[1:])}{hint}")


def main(argv):
  del argv
  if _WORKDIR.value is None or _CONFIG.value is None:
    sys.exit("launch.py: --config and --workdir are required, e.g. "
             "python launch.py --config configs/digits_kd_nst.py --workdir workdirs/digits_kd_nst")
  import jax

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from nst_jax import train_loop

  logging.set_verbosity(logging.WARNING)
  try:
    train_loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as error:
    sys.exit(f"launch.py: {error}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
