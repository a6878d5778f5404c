"""Reading and checking run configs: the one place that knows what a valid `ConfigDict` is.

* `load_config_file(path)`: a config file's `get_config()` (with an optional `:argument`, as `--config`).
* `check(config)`: every key with a fixed set of choices or a valid range, checked before any work is
  done, so a bad value is one `ConfigError` naming the key and the valid choices (unknown kernel, model,
  dtype, ...; learning rate > 0, weights >= 0, epochs >= 1, temperature > 0, batch >= 1, ...).
* `parse_pairs`: layer pairs as the command line writes them, `"stage1:stage1,stage3:stage3"`.
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

import difflib
import importlib.util
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence

import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
PARALLEL_MODES = ("jit", "pmap")
TEACHER_BATCHNORM_MODES = ("running", "batch")
_DATA_PATH_KEYS = ("path", "data_dir", "manual_dir", "cache_dir")


class ConfigError(ValueError):
  """A config value that cannot run: the message names the key and what would be valid."""


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, or `get_config(arg)` for `path:arg` (as `--config` accepts)."""
  path, _, arg = str(path).partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path!r} does not exist.")
  if str(REPO_ROOT) not in sys.path:  # Config files import `configs._common`.
    sys.path.insert(0, str(REPO_ROOT))
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def parse_pairs(value, key: str) -> tuple[tuple[str, str], ...]:
  """`"s1:t1,s2:t2"` (or a sequence of 2-sequences) -> ((s1, t1), (s2, t2)); `""` -> ()."""
  if isinstance(value, str):
    items = [item.strip() for item in value.split(",") if item.strip()]
    pairs = tuple(tuple(part.strip() for part in item.split(":")) for item in items)
  else:
    pairs = tuple(tuple(p) for p in value)
  if not all(len(p) == 2 and all(isinstance(n, str) and n for n in p) for p in pairs):
    raise ConfigError(f"{key} must be student_tap:teacher_tap pairs separated by commas, e.g. "
                      f"'stage1:stage1,stage3:stage3'; got {value!r}.")
  return pairs


def format_pairs(pairs: Iterable[Sequence[str]]) -> str:
  """The inverse of `parse_pairs`, for configs."""
  return ",".join(f"{s}:{t}" for s, t in pairs)


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
  from nst_jax import data, kernels, models  # Deferred: importing them pulls in JAX.
  from nst_jax.models import conv

  try:
    data.check_config(config.data)
  except ValueError as error:
    raise ConfigError(str(error)) from None

  _choice(config.dtype, DTYPES, "dtype")
  _choice(config.parallel, PARALLEL_MODES, "parallel")
  _choice(config.conv_impl, conv.IMPLS, "conv_impl")
  _choice(config.teacher.batchnorm, TEACHER_BATCHNORM_MODES, "teacher.batchnorm")
  valid_models = models.list_models()
  _choice(config.student.model, valid_models, "student.model")
  if config.teacher.model:
    _choice(config.teacher.model, valid_models, "teacher.model")
  _choice(config.distill.nst.kernel, list(kernels.KERNELS), "distill.nst.kernel")
  for key in ("distill.ce_weight", "distill.kd_weight", "distill.nst.weight", "distill.fitnet.weight",
              "distill.at.weight", "optim.weight_decay", "optim.momentum"):
    _at_least(get(config, key), 0, key)
  _at_least(config.distill.temperature, 0, "distill.temperature", strict=True)
  _at_least(config.optim.learning_rate, 0, "optim.learning_rate", strict=True)
  _at_least(config.schedule.epochs, 1, "schedule.epochs", integer=True)
  _at_least(config.schedule.batch_size, 1, "schedule.batch_size", integer=True)
  _at_least(config.schedule.decay_factor, 0, "schedule.decay_factor", strict=True)
  for epoch in config.schedule.decay_epochs:
    _at_least(epoch, 0, "schedule.decay_epochs", integer=True)
  for key in ("logging.log_every_steps", "logging.eval_every_epochs", "logging.checkpoint_every_steps",
              "logging.keep_checkpoints"):
    _at_least(get(config, key), 1, key, integer=True)
  for key in ("logging.checkpoint_every_epochs", "logging.checkpoint_every_minutes"):
    _at_least(get(config, key), 0, key)
  for key in ("distill.nst.layers", "distill.fitnet.layer", "distill.at.layers"):
    pairs = parse_pairs(get(config, key), f"config.{key}")
    if key == "distill.fitnet.layer" and len(pairs) != 1:
      raise ConfigError(f"config.{key} must be exactly one student_tap:teacher_tap pair, got {pairs!r}.")
  if config.teacher.model and not config.teacher.workdir:
    raise ConfigError("config.teacher.workdir must name the teacher's run directory (its checkpoint is "
                      "loaded from there; with config.teacher.config it is trained there first).")


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
