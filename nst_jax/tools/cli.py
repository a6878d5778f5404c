"""The command line of a run (`nst-jax-train`, `python launch.py`, `python -m nst_jax`): parses it, loads
and checks the config, and runs `train_loop.train_and_evaluate`.

    nst-jax-train --config configs/<name>.py[:METHOD] --workdir <dir> [--config.KEY=VALUE ...]

`--config` is taken from the current directory, else from the repository. Overrides go through
`config_lib.override_texts` and `config_lib.apply_text_overrides`, the project's one override parser: an
unknown key is one line naming it and the nearest valid keys, a value of the wrong type one line naming
the key, the expected type and the value. Every error a user can fix (config, workdir in use, a folder
that cannot be written, a damaged teacher checkpoint, ...) is one line and exit status 1; any other
exception keeps its traceback. Running the same command again resumes where it stopped, or says the run
has finished. SIGTERM and Ctrl-C save a checkpoint and exit with status 128 + the signal's number (143,
130), naming the stage and how to resume.

Multi-process runs (several hosts, or several processes on one machine): give every process
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or `--distributed` alone where JAX
detects the cluster itself (TPU pods, Slurm, ...). On CPU the processes talk through gloo collectives.
"""

import argparse
import os
import re
import signal
import sys

# TensorFlow (TFDS, TensorBoard) is only a data/logging helper here: keep its C++ banners quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import logging as absl_logging  # noqa: E402

from nst_jax.trainer import checkpoints, config_lib, rundir  # noqa: E402

if str(config_lib.REPO_ROOT) not in sys.path:  # Config files import `configs._common`.
  sys.path.insert(0, str(config_lib.REPO_ROOT))

PROG = "nst-jax-train"
# The command-line overrides that also reach a teacher stage trained by this command.
TEACHER_KEYS = re.compile(r"^(data\..*|dtype|parallel|conv_impl)$")

_EXAMPLES = f"""config overrides:
  --config.KEY=VALUE    set a key of the config, e.g. --config.schedule.epochs=30 or
                        --config.distill.nst.layers=stage2:stage2,stage3:stage3 (the value is read as the
                        key's type; data.*, dtype, parallel and conv_impl also reach a teacher stage)

examples:
  {PROG} --config configs/digits_kd_nst.py --workdir workdirs/digits_kd_nst
  {PROG} --config configs/cifar10_folder.py:ce --workdir workdirs/cifar10_ce \\
      --config.schedule.epochs=5 --config.schedule.batch_size=64

Running the same command again resumes the run from its last checkpoint (or says it has finished).
Ctrl-C or SIGTERM saves a checkpoint and exits with status 130 or 143."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line and status 1, like every other error of the command.
    sys.exit(f"nst_jax: bad command line: {message}. See {PROG} --help.")


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
              description="Trains (or distils, teacher first) one nst_jax run.", epilog=_EXAMPLES,
              usage=f"{PROG} --config PATH[:METHOD] --workdir DIR [--config.KEY=VALUE ...] [multi-process "
                    "flags]")
  p.add_argument("--config", metavar="PATH[:METHOD]", required=True,
                 help="config file (its get_config(), or get_config(METHOD)); a relative path is taken from "
                      "the current directory, else from the repository")
  p.add_argument("--workdir", metavar="DIR", required=True,
                 help="folder for checkpoints, logs and results (one run per folder)")
  multi = p.add_argument_group("multi-process runs")
  multi.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() with the cluster detected from the environment "
                          "(TPU pods, Slurm, ...)")
  multi.add_argument("--coordinator_address", metavar="HOST:PORT", help="address of process 0")
  multi.add_argument("--num_processes", metavar="N", type=int, help="how many processes")
  multi.add_argument("--process_id", metavar="I", type=int, help="this process's index, 0 .. N-1")
  return p


def _lowered(error: Exception) -> str:
  """The README's form of an override error: "bad command line: unknown config key ..."."""
  text = str(error).strip()
  return text[:1].lower() + text[1:] if text.startswith("Unknown") else text


def load_config(path: str, overrides: list[str]):
  """(config, teacher overrides {key: value}) from `--config` and the `--config.KEY=VALUE` arguments;
  exits with one line when either is wrong."""
  try:
    config = config_lib.load_config_file(path)
  except config_lib.ConfigError as error:
    sys.exit(f"nst_jax: {error}")
  try:
    texts = config_lib.override_texts(overrides, usage=f"See {PROG} --help.")
    config = config_lib.apply_text_overrides(config, texts)
  except config_lib.ConfigError as error:
    sys.exit(f"nst_jax: bad command line: {_lowered(error)}")
  return config, {k: config_lib.get(config, k) for k in texts if TEACHER_KEYS.match(k)}


def _initialize_distributed(args):
  import jax

  if args.coordinator_address or args.num_processes or args.process_id is not None:
    if not (args.coordinator_address and args.num_processes and args.process_id is not None):
      sys.exit("nst_jax: --coordinator_address, --num_processes and --process_id go together.")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk via gloo.
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
  """Runs the command; returns its exit status (`sys.exit` with a one-line message for user errors)."""
  args, extra = parser().parse_known_args(sys.argv[1:] if argv is None else argv)
  config, teacher_overrides = load_config(args.config, extra)
  # absl's log is Orbax's and JAX's, chatty at INFO; the loop's own lines go to the `nst_jax` logger.
  absl_logging.set_verbosity(absl_logging.WARNING)
  # jax.distributed.initialize() must run before anything uses a JAX backend, and importing the training
  # loop (models, data, the config's checks) would: so the loop is imported only after it.
  _initialize_distributed(args)
  from nst_jax.trainer import train_loop

  try:
    train_loop.train_and_evaluate(config, args.workdir, teacher_overrides=teacher_overrides)
  except (config_lib.ConfigError, rundir.RunDirError, checkpoints.CheckpointReadError,
          FileNotFoundError) as error:
    sys.exit(f"nst_jax: {error}")
  except train_loop.Preempted as preempted:  # The loop has logged what it saved and how to resume.
    return (128 + signal.Signals[preempted.signal_name].value
            if preempted.signal_name in signal.Signals.__members__ else 1)
  return 0


def run():
  """The console entry point."""
  sys.exit(main())


if __name__ == "__main__":
  run()
