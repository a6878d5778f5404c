"""Evaluation: a finished run's student on any split or image folder, and the exact accuracy loop.

    python -m nst_jax.evaluate --workdir W [--image_folder DIR | --split NAME] [--config.data.KEY=VALUE ...]

loads the latest checkpoint of the run in W (it must have finished: its `results.json` says
`"finished": true`) and `W/config.json`, evaluates the student with the run's own evaluation
preprocessing (`data.build_eval`: the same resize to `data.image_size` and the same normalisation, which
is the training split's statistics when the run had no `data.mean`), prints one JSON line
`{"top1": ..., "top5": ..., "count": ...}` (accuracies in %) and writes it to `W/eval_<name>.json`,
`<name>` being the split or the folder's base name. Default: the run's `data.eval_split`. An image folder
holds class sub-folders named like the run's classes (any subset, any number of images, any size);
labels are the run's indices of those names. `--config.data.KEY=VALUE` changes the data config (e.g. a
moved `data.path`); relative paths are resolved as a run's are (`config_lib.resolve_paths`).

Library functions: `evaluate_variables(config, variables, ...)` for any variables of a config's model,
`evaluate_run(workdir, ...)` (what the command does), and `accuracy(runner, eval_fn, variables,
pipeline)`, the training loop's evaluation: top-1 / top-5 from exact (sum, count) pairs, the padded
last batch masked out.
"""

import argparse
import ast
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections

from nst_jax import checkpoints, config_lib, models, parallel, train
from nst_jax import data as data_lib
from nst_jax import objective as objective_lib


def accuracy(runner: parallel.Runner, eval_fn, variables, pipeline) -> dict[str, float]:
  """Top-1 / top-5 accuracy (%) and the example count, from exact sums over `pipeline.eval_batches()`.

  `eval_fn` is `runner.compile_eval(train.eval_body(model))`, `variables` in `runner.put_replicated`
  layout. Padded examples carry mask 0 and count for nothing.
  """
  totals = {"top1_correct": 0.0, "top5_correct": 0.0, "count": 0.0}
  for batch in pipeline.eval_batches():
    sums = runner.metrics_to_host(eval_fn(variables, runner.put_batch(batch)))
    totals = {k: totals[k] + sums[k] for k in totals}
  count = max(totals["count"], 1.0)
  return {"top1": 100.0 * totals["top1_correct"] / count, "top5": 100.0 * totals["top5_correct"] / count,
          "count": int(totals["count"])}


def _eval_batch(config, mesh) -> int:
  """The run's batch size, rounded up to a multiple of this machine's device count (which may differ
  from the run's): evaluation is exact whatever the batch."""
  n = mesh.devices.size
  return math.ceil(config.schedule.batch_size / n) * n


def variables_template(model, image_shape):
  """The shapes and dtypes of `model`'s variables for images of `image_shape` (H, W, C); nothing computed."""
  sample = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)


def _evaluate_model(runner, model, variables, evaluation) -> dict[str, float]:
  eval_fn = runner.compile_eval(train.eval_body(model))
  return accuracy(runner, eval_fn, runner.put_replicated(variables), evaluation)


def evaluate_variables(config: ml_collections.ConfigDict, variables, *, model_name: str | None = None,
                       split: str | None = None, image_folder: str | None = None,
                       mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """{"top1", "top5", "count"} of `variables` ({"params", "batch_stats"}) of the zoo model `model_name`
  (default `config.student.model`) on `split` or `image_folder` (default `config.data.eval_split`),
  preprocessed as `config`'s run evaluates (see `data.build_eval`). Raises ValueError when the variables
  do not fit the model, naming the mismatching entries."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  runner = parallel.Runner(config.parallel, mesh)
  evaluation = data_lib.build_eval(config, mesh, split=split, image_folder=image_folder,
                                   global_batch=_eval_batch(config, mesh))
  name = model_name or config.student.model
  model = models.get_model(name, evaluation.num_classes, dtype=jnp.dtype(config.dtype),
                           axis_name=runner.axis_name)
  checkpoints.check_fits(variables_template(model, evaluation.image_shape), variables,
                         f"variables given for {name} ({evaluation.num_classes} classes)")
  return _evaluate_model(runner, model, variables, evaluation.eval)


def run_module(config, num_classes: int, image_shape, axis_name):
  """The module whose variables the run's checkpoint holds: the student, or with FitNet the student with
  its regressor (`objective.student_module`), so the checkpoint fits it entry by entry."""
  dtype = jnp.dtype(config.dtype)
  student = models.get_model(config.student.model, num_classes, dtype=dtype, axis_name=axis_name)
  objective = objective_lib.Objective.from_config(config.distill)
  teacher_shapes = None
  if objective.uses_fitnet:
    from nst_jax import train_loop  # Not at the top: train_loop imports this module.

    teacher = models.get_model(config.teacher.model, num_classes, dtype=dtype, axis_name=axis_name)
    teacher_shapes = train_loop.tap_shapes(teacher, image_shape)
  return objective_lib.student_module(student, objective, teacher_shapes)


def _parse_value(key: str, text: str, current):
  """A command-line string as the type of the key's current value (as ml_collections overrides are)."""
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
    return text
  except (ValueError, SyntaxError):
    raise config_lib.ConfigError(f"config.{key}: expected a value of type {type(current).__name__}, got "
                                 f"{text!r}.") from None


def load_run(workdir: str, overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
  """The config of the finished run in `workdir` (its config.json), with `{"data.KEY": "VALUE"}`
  command-line overrides applied and relative data paths resolved."""
  from nst_jax import train_loop  # Here, not at the top: the training loop imports this module.

  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"Workdir {workdir!r} does not exist or is not a directory.")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir!r} has no config.json, so it is not the workdir of an nst_jax run; "
                            "give the --workdir of a finished run.")
  if not train_loop.is_finished(workdir):
    raise ValueError(f"The run in {workdir!r} has not finished: its {train_loop.RESULTS} is missing or not "
                     "marked \"finished\": true, which training writes at its end. Rerun its command to "
                     "finish it, then evaluate.")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  values = {}
  for key, text in (overrides or {}).items():
    if not key.startswith("data."):
      raise config_lib.ConfigError(f"config.{key}: only config.data.* can be changed for an evaluation; "
                                   "the model and its training are the run's own.")
    if key not in config_lib.flat_keys(config):
      raise config_lib.ConfigError(f"Unknown config key {key!r}."
                                   + config_lib.suggest(key, config_lib.flat_keys(config)))
    values[key] = _parse_value(key, text, config_lib.get(config, key))
  return config_lib.resolve_paths(config_lib.apply_overrides(config, values), workdir)


def eval_name(config, split: str | None, image_folder: str | None) -> str:
  """The `<name>` of `eval_<name>.json`: the folder's base name or the split, as a safe file name."""
  name = os.path.basename(os.path.normpath(image_folder)) if image_folder else split
  name = name or config.data.eval_split
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def evaluate_run(workdir: str, *, split: str | None = None, image_folder: str | None = None,
                 overrides: dict[str, str] | None = None, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Evaluates the finished run in `workdir` (see the module docstring); writes and returns the result."""
  from nst_jax import train_loop

  workdir = os.path.abspath(workdir)
  config = load_run(workdir, overrides)
  mesh = parallel.make_mesh() if mesh is None else mesh
  runner = parallel.Runner(config.parallel, mesh)
  evaluation = data_lib.build_eval(config, mesh, split=split, image_folder=image_folder,
                                   global_batch=_eval_batch(config, mesh))
  model = run_module(config, evaluation.num_classes, evaluation.image_shape, runner.axis_name)
  try:
    variables = checkpoints.load_teacher_variables(workdir, variables_template(model, evaluation.image_shape))
  except FileNotFoundError:
    raise FileNotFoundError(f"The run in {workdir!r} is marked finished but has no checkpoint in "
                            f"{checkpoints.checkpoint_dir(workdir)}.") from None
  except ValueError as error:
    entries = "; ".join(line.strip() for line in str(error).splitlines()[1:])
    raise ValueError(f"The checkpoint in {workdir!r} does not fit {config.student.model} with "
                     f"{evaluation.num_classes} classes and images {evaluation.image_shape}, as its "
                     f"config.json and the data describe it (was config.json or the checkpoint replaced?). "
                     f"Mismatching entries: {entries}") from None
  result = _evaluate_model(runner, model, variables, evaluation.eval)
  train_loop.write_json(os.path.join(workdir, f"eval_{eval_name(config, split, image_folder)}.json"), result)
  return result


def main(argv: list[str] | None = None) -> dict:
  """The command line (see the module docstring); a bad input ends in SystemExit with one message."""
  parser = argparse.ArgumentParser(prog="python -m nst_jax.evaluate", description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the run's directory (a finished run)")
  where = parser.add_mutually_exclusive_group()
  where.add_argument("--image_folder", help="a class-folder tree <DIR>/<class name>/<image>")
  where.add_argument("--split", help="a split of the run's dataset (default: its data.eval_split)")
  args, rest = parser.parse_known_args(argv)
  overrides = {}
  for arg in rest:
    match = re.fullmatch(r"--config\.([\w.]+)=(.*)", arg, re.S)
    if not match:
      parser.error(f"unexpected argument {arg!r}; data overrides are written --config.data.KEY=VALUE")
    overrides[match.group(1)] = match.group(2)
  image_folder = os.path.abspath(args.image_folder) if args.image_folder else None
  try:
    result = evaluate_run(args.workdir, split=args.split, image_folder=image_folder, overrides=overrides)
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"nst_jax.evaluate: {error}")
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
