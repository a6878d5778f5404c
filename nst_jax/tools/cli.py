"""The command line of a run (`python launch.py`, `python -m nst_jax`, `nst-jax-train`):

    python launch.py --config configs/<name>.py[:METHOD] --workdir <dir> [--config.a.b=value ...]

The config is locked: an unknown key is one line naming it and the nearest valid keys, a value of the
wrong type one line naming the key, the expected type and the value. Other config errors (unknown model,
a learning rate <= 0, ...) are one line too; any other exception keeps its traceback. Running the same
command again resumes where it stopped. SIGTERM and Ctrl-C save a checkpoint and exit with status
128 + the signal's number (143, 130), naming the stage and how to resume.

Multi-process runs (several hosts, or several processes on one machine): give every process
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or `--distributed` alone where JAX
detects the cluster itself (TPU pods, Slurm, ...). On CPU the processes talk through gloo collectives.
"""

import os
import re
import signal
import sys

# TensorFlow (TFDS, TensorBoard) is only a data/logging helper here: keep its C++ banners quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nst_jax.trainer import config_lib  # noqa: E402

if str(config_lib.REPO_ROOT) not in sys.path:  # Config files import `configs._common`.
  sys.path.insert(0, str(config_lib.REPO_ROOT))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with the cluster detected from the "
                                 "environment (TPU pods, Slurm, ...).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")

# The command-line overrides that also reach a teacher stage trained by this command.
TEACHER_KEYS = re.compile(r"^(data\..*|dtype|parallel|conv_impl)$")


def _config_path(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _explain(error: Exception, argv) -> str:
  """One line for a flag-parsing error of a config override."""
  path = _config_path(argv)
  try:
    config = config_lib.load_config_file(path) if path else None
  except Exception as e:  # noqa: BLE001 -- a config file that does not load is the error to report.
    return f"config file {path!r} does not load: {e}"
  if config is not None:
    valid = config_lib.flat_keys(config)
    for arg in argv[1:]:
      if arg.startswith("--config."):
        key = arg[len("--config."):].split("=", 1)[0]
        if key not in valid:
          return f"unknown config key {key!r}.{config_lib.suggest(key, valid)}"
    match = re.search(r"flag --config\.([\w.]+)=(.*?): (.*)$", str(error), re.S)
    if match:
      key, value, _ = match.groups()
      expected = type(config_lib.get(config, key)).__name__ if key in valid else "?"
      return f"config.{key}: expected a value of type {expected}, got {value!r}."
  return str(error).strip()


def parse_flags(argv):
  """absl's flag parsing, with config errors turned into one line instead of a traceback."""
  path = _config_path(argv)
  if path and not os.path.isfile(path.partition(":")[0]):
    sys.exit(f"nst_jax: config file {path.partition(':')[0]!r} does not exist.")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
    sys.exit(f"nst_jax: bad command line: {_explain(error, argv)}")


def _initialize_distributed():
  import jax

  if _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
    if not (_COORDINATOR.value and _NUM_PROCESSES.value and _PROCESS_ID.value is not None):
      sys.exit("nst_jax: --coordinator_address, --num_processes and --process_id go together.")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk via gloo.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    sys.exit(f"nst_jax: unexpected arguments {' '.join(argv[1:])!r}; give flags as --name=value.")
  if _WORKDIR.value is None or _CONFIG.value is None:
    sys.exit("nst_jax: --config and --workdir are required, e.g. "
             "python launch.py --config configs/digits_kd_nst.py --workdir workdirs/digits_kd_nst")
  # absl's log is Orbax's and JAX's, chatty at INFO; the loop's own lines go to the `nst_jax` logger.
  logging.set_verbosity(logging.WARNING)
  _initialize_distributed()
  from nst_jax.trainer import train_loop

  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  teacher_overrides = {k: v for k, v in overrides.items() if TEACHER_KEYS.match(k)}
  try:
    train_loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, teacher_overrides=teacher_overrides)
  except (config_lib.ConfigError, FileNotFoundError) as error:
    sys.exit(f"nst_jax: {error}")
  except train_loop.Preempted as preempted:  # The loop has logged what it saved and how to resume.
    sys.exit(128 + signal.Signals[preempted.signal_name].value
             if preempted.signal_name in signal.Signals.__members__ else 1)


def run():
  """The console entry point."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
