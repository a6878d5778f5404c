"""Reading and checking run configs: the one place that knows what a valid `ConfigDict` is.

* `load_config_file(path)`: a config file's `get_config()` (with an optional `:argument`, as `--config`);
  `load_config_module(path)` the file as a module (for its `METHODS` and `REFERENCE` too). A relative
  path is taken from the current directory, else from the repository.
* `override_texts(args)` and `apply_text_overrides(config, texts)`: the one parser of the command
  line's `--config.KEY=VALUE` (the value read as the type of the key's current value).
* `load_run(workdir)`: the config of a finished run, read back from its config.json.
* `check(config)`: every key with a fixed set of choices or a valid range, checked before any work is
  done, so a bad value is one `ConfigError` naming the key and the valid choices (unknown kernel, model,
  dtype, ...; learning rate > 0, weights >= 0, epochs >= 1, temperature > 0, batch >= 1 and a multiple of
  the device count, ...).
* `resolve_paths(config, workdir)`: relative paths made absolute by the documented rules, so a run works
  from any directory.
* `suggest(key, valid)`: the nearest valid keys for a misspelt one.

Path rules (relative paths only; absolute ones are kept):
* `teacher.config`: against the repository root (the folder holding `configs/` and `nst_jax/`), else the
  current directory.
* `teacher.workdir`: against the folder that holds the student's workdir, so `workdirs/digits_kd_nst`
  finds its teacher `digits` in `workdirs/digits`.
* `data.path`, `data.data_dir`, `data.manual_dir`, `data.cache_dir`: against the current directory when
  the path exists there, else against the repository root (configs name `../shared/data/...` from it).
"""

import ast
import difflib
import importlib.util
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from nst_jax import kernels, models
from nst_jax import objective as objective_lib
from nst_jax.models import conv
from nst_jax.trainer import data, parallel, rundir, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.dtype -> the models' compute dtype
_DATA_PATH_KEYS = ("path", "data_dir", "manual_dir", "cache_dir")


class ConfigError(ValueError):
  """A config value that cannot run: the message names the key and what would be valid."""


def find_config_file(path: str) -> str:
  """`path` if absolute or found from the current directory, else from the repository root."""
  path = os.path.expanduser(path)
  if os.path.isabs(path) or os.path.isfile(path):
    return os.path.abspath(path)
  in_repo = REPO_ROOT / path
  if in_repo.is_file():
    return str(in_repo)
  raise ConfigError(f"Config file {path!r} does not exist (looked in {os.getcwd()} and in {REPO_ROOT}).")


def load_config_module(path: str):
  """The config file at `path` (see `find_config_file`) as a module: `get_config`, and for experiment
  configs `METHODS` and `REFERENCE`."""
  path = find_config_file(path)
  if str(REPO_ROOT) not in sys.path:  # Config files import `configs._common`.
    sys.path.insert(0, str(REPO_ROOT))
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as error:  # noqa: BLE001 -- a config that does not load is the error to report.
    raise ConfigError(f"Config file {path!r} does not load: {type(error).__name__}: {error}") from error
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{path!r} is not a config file: it has no get_config().")
  return module


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, or `get_config(arg)` for `path:arg` (as `--config` accepts)."""
  path, _, arg = str(path).partition(":")
  module = load_config_module(path)
  try:
    return module.get_config(arg) if arg else module.get_config()
  except (ValueError, TypeError, KeyError) as error:  # e.g. an unknown method after the colon
    raise ConfigError(f"Config file {path!r}{':' + arg if arg else ''}: {error}") from error


def override_texts(args: Sequence[str], usage: str = "") -> dict[str, str]:
  """`["--config.a.b=1", ...]` -> `{"a.b": "1"}`; anything else is a ConfigError (`usage` appended)."""
  texts = {}
  for arg in args:
    match = re.fullmatch(r"--config\.([\w.]+)=(.*)", arg, re.S)
    if not match:
      raise ConfigError(f"Unexpected argument {arg!r}; config overrides are written --config.KEY=VALUE."
                        + (f" {usage}" if usage else ""))
    texts[match.group(1)] = match.group(2)
  return texts


def parse_value(key: str, text: str, current):
  """A command-line string as the type of the key's current value (bool, int, float, str, tuple)."""
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    if isinstance(current, int | float | str):
      return type(current)(text)
    if isinstance(current, list | tuple):
      value = ast.literal_eval(text) if text.strip() else ()
      return tuple(value) if isinstance(value, list | tuple) else (value,)
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"config.{key}: expected a value of type {type(current).__name__}, got "
                      f"{text!r}.") from None


def apply_text_overrides(config: ml_collections.ConfigDict,
                         texts: dict[str, str]) -> ml_collections.ConfigDict:
  """A copy of `config` with command-line `{dotted key: text}` overrides parsed and set."""
  valid = flat_keys(config)
  values = {}
  for key, text in texts.items():
    if key not in valid:
      raise ConfigError(f"Unknown config key {key!r}.{suggest(key, valid)}")
    values[key] = parse_value(key, text, get(config, key))
  return apply_overrides(config, values)


def load_run(workdir: str) -> ml_collections.ConfigDict:
  """The config of the finished run in `workdir` (its config.json)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"Workdir {workdir!r} does not exist or is not a directory.")
  path = os.path.join(workdir, rundir.CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir!r} has no {rundir.CONFIG}, so it is not the workdir of an nst_jax "
                            "run; give the --workdir of a finished run.")
  if not rundir.is_finished(workdir):
    raise ValueError(f"The run in {workdir!r} has not finished: its {rundir.RESULTS} is missing or not "
                     "marked \"finished\": true, which training writes at its end. Rerun its command to "
                     "finish it, then evaluate.")
  return ml_collections.ConfigDict(rundir.read_config(workdir))


def suggest(key: str, valid: Iterable[str], n: int = 3) -> str:
  """' Did you mean: a, b?' for the nearest valid names, or '' when none is close."""
  close = difflib.get_close_matches(key, list(valid), n=n, cutoff=0.6)
  if not close:  # A misspelt leaf under the right group: compare the last component too.
    leaf = key.rsplit(".", 1)[-1]
    close = [v for v in valid if difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1]], cutoff=0.75)][:n]
  return f" Did you mean: {', '.join(close)}?" if close else ""


def flat_keys(config) -> list[str]:
  """Every leaf key of a ConfigDict, dotted."""
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += [f"{key}.{k}" for k in flat_keys(value)]
    else:
      keys.append(key)
  return keys


def _choice(value, valid: Sequence, key: str):
  if value not in valid:
    raise ConfigError(f"config.{key}: unknown value {value!r}. Valid values: {', '.join(map(str, valid))}."
                      + suggest(str(value), map(str, valid)))


def _at_least(value, low, key: str, *, strict: bool = False, integer: bool = False):
  bad = (value <= low) if strict else (value < low)
  if integer and int(value) != value:
    bad = True
  if bad:
    kind = "an integer " if integer else ""
    raise ConfigError(f"config.{key} must be {kind}{'>' if strict else '>='} {low}, got {value!r}.")


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first value that cannot run (see the module docstring)."""
  try:
    data.check_config(config.data)
  except ValueError as error:
    raise ConfigError(str(error)) from None

  _choice(config.dtype, list(DTYPES), "dtype")
  _choice(config.parallel, parallel.MODES, "parallel")
  _choice(config.conv_impl, conv.IMPLS, "conv_impl")
  _choice(config.teacher.batchnorm, train.TEACHER_BATCHNORM_MODES, "teacher.batchnorm")
  valid_models = models.list_models()
  for key in ("student.model", "teacher.model"):
    name = get(config, key)
    if key == "teacher.model" and not name:
      continue
    if not models.is_import_path(name):
      _choice(name, valid_models, key)
      continue
    try:  # An import path `package.module:attr`: imported now, so a bad one fails before any work.
      models.resolve(name)
    except ValueError as error:
      raise ConfigError(f"config.{key}: {error}") from None
  _choice(config.distill.nst.kernel, list(kernels.KERNELS), "distill.nst.kernel")
  for key in ("distill.ce_weight", "distill.kd_weight", "distill.nst.weight", "distill.fitnet.weight",
              "distill.at.weight", "optim.weight_decay", "optim.momentum"):
    _at_least(get(config, key), 0, key)
  _at_least(config.distill.temperature, 0, "distill.temperature", strict=True)
  _at_least(config.optim.learning_rate, 0, "optim.learning_rate", strict=True)
  _at_least(config.schedule.epochs, 1, "schedule.epochs", integer=True)
  _at_least(config.schedule.batch_size, 1, "schedule.batch_size", integer=True)
  try:  # Against the devices of this run, before any data is read or model built.
    parallel.check_global_batch(config.schedule.batch_size, jax.device_count())
  except ValueError as error:
    raise ConfigError(str(error)) from None
  _at_least(config.schedule.decay_factor, 0, "schedule.decay_factor", strict=True)
  for epoch in config.schedule.decay_epochs:
    _at_least(epoch, 0, "schedule.decay_epochs", integer=True)
  for key in ("logging.log_every_steps", "logging.eval_every_epochs", "logging.checkpoint_every_steps",
              "logging.keep_checkpoints"):
    _at_least(get(config, key), 1, key, integer=True)
  for key in ("logging.checkpoint_every_epochs", "logging.checkpoint_every_minutes"):
    _at_least(get(config, key), 0, key)
  objective(config)  # Kernel settings, layer-pair syntax, weights.
  if config.teacher.model and not config.teacher.workdir:
    raise ConfigError("config.teacher.workdir must name the teacher's run directory (its checkpoint is "
                      "loaded from there; with config.teacher.config it is trained there first).")


def objective(config: ml_collections.ConfigDict) -> objective_lib.Objective:
  """The run's objective (`objective.Objective.from_config`), its errors as ConfigError."""
  try:
    return objective_lib.Objective.from_config(config.distill)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def get(config, dotted: str):
  """`config` at a dotted key, e.g. get(config, "optim.learning_rate")."""
  for part in dotted.split("."):
    config = config[part]
  return config


def _set(config, dotted: str, value):
  *groups, leaf = dotted.split(".")
  for part in groups:
    config = config[part]
  config[leaf] = value


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """A copy of `config` with `{dotted key: value}` set (unknown keys are a ConfigError)."""
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy of values and structure.
  valid = flat_keys(config)
  for key, value in dict(overrides).items():
    if key not in valid:
      raise ConfigError(f"Unknown config key {key!r}.{suggest(key, valid)}")
    _set(config, key, value)
  return config


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` with its relative paths made absolute (rules in the module docstring)."""
  updates = {}
  if config.teacher.config:
    name, colon, arg = config.teacher.config.partition(":")
    updates["teacher.config"] = _against(name, [REPO_ROOT, pathlib.Path.cwd()], REPO_ROOT) + colon + arg
  if config.teacher.workdir:
    parent = pathlib.Path(os.path.abspath(workdir)).parent
    updates["teacher.workdir"] = _against(config.teacher.workdir, [], parent)
  for key in _DATA_PATH_KEYS:
    value = config.data[key]
    if value and "://" not in value:
      updates[f"data.{key}"] = _against(value, [pathlib.Path.cwd(), REPO_ROOT], REPO_ROOT)
  return apply_overrides(config, updates) if updates else config


def _against(path: str, bases: Sequence[pathlib.Path], default: pathlib.Path) -> str:
  """`path` if absolute; else joined to the first of `bases` where it exists, or to `default`."""
  path = os.path.expanduser(path)
  if os.path.isabs(path):
    return path
  base = next((b for b in bases if (b / path).exists()), default)
  return os.path.normpath(base / path)
