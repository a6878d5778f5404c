"""Evaluation: a finished run's student on any split or image folder, and the exact accuracy loop.

    python -m nst_jax.tools.evaluate --workdir W [--image_folder DIR | --split NAME] \
      [--config.data.KEY=VALUE ...]

loads the latest checkpoint of the run in W (it must have finished: its `results.json` says
`"finished": true`) and `W/config.json`, evaluates the student with the run's own evaluation
preprocessing (`data.build_eval`: the same resize to `data.image_size` and the same normalisation, which
is the training split's statistics when the run had no `data.mean`), prints one JSON line
`{"top1": ..., "top5": ..., "count": ...}` (accuracies in %) and writes it to `W/eval_<name>.json`,
`<name>` being the split or the folder's base name. Default: the run's `data.eval_split`. An image folder
holds class sub-folders named like the run's classes (any subset, any number of images, any size);
labels are the run's indices of those names. `--config.data.KEY=VALUE` changes the data config (e.g. a
moved `data.path`); relative paths are resolved as a run's are (`config_lib.resolve_paths`).

Library functions: `evaluate_variables(config, variables, ...)` for any variables of a config's model and
`evaluate_run(workdir, ...)` (what the command does), both through the training loop's exact accuracy
loop (`train_loop.accuracy`: top-1 / top-5 from (sum, count) pairs, the padded last batch masked out).
"""

import argparse
import json
import math
import os
import re
import sys

import jax
import ml_collections

from nst_jax import models
from nst_jax.trainer import checkpoints, config_lib, parallel, rundir, train, train_loop
from nst_jax.trainer import data as data_lib


def _eval_batch(config, mesh) -> int:
  """The run's batch size, rounded up to a multiple of this machine's device count (which may differ
  from the run's): evaluation is exact whatever the batch."""
  n = mesh.devices.size
  return math.ceil(config.schedule.batch_size / n) * n


def _evaluate_model(runner, model, variables, evaluation) -> dict[str, float]:
  eval_fn = runner.compile_eval(train.eval_body(model))
  return train_loop.accuracy(runner, eval_fn, runner.put_replicated(variables), evaluation)


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
  model = models.get_model(name, evaluation.num_classes, dtype=config_lib.DTYPES[config.dtype],
                           axis_name=runner.axis_name)
  checkpoints.check_fits(models.variables_template(model, evaluation.image_shape), variables,
                         f"variables given for {name} ({evaluation.num_classes} classes)")
  return _evaluate_model(runner, model, variables, evaluation.eval)


def load_run(workdir: str, overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
  """The config of the finished run in `workdir` (its config.json), with `{"data.KEY": "VALUE"}`
  command-line overrides applied and relative data paths resolved."""
  config = config_lib.load_run(workdir)
  for key in overrides or {}:
    if not key.startswith("data."):
      raise config_lib.ConfigError(f"config.{key}: only config.data.* can be changed for an evaluation; "
                                   "the model and its training are the run's own.")
  return config_lib.resolve_paths(config_lib.apply_text_overrides(config, overrides or {}), workdir)


def eval_name(config, split: str | None, image_folder: str | None) -> str:
  """The `<name>` of `eval_<name>.json`: the folder's base name or the split, as a safe file name."""
  name = os.path.basename(os.path.normpath(image_folder)) if image_folder else split
  name = name or config.data.eval_split
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def evaluate_run(workdir: str, *, split: str | None = None, image_folder: str | None = None,
                 overrides: dict[str, str] | None = None, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Evaluates the finished run in `workdir` (see the module docstring); writes and returns the result."""
  workdir = os.path.abspath(workdir)
  config = load_run(workdir, overrides)
  mesh = parallel.make_mesh() if mesh is None else mesh
  runner = parallel.Runner(config.parallel, mesh)
  evaluation = data_lib.build_eval(config, mesh, split=split, image_folder=image_folder,
                                   global_batch=_eval_batch(config, mesh))
  model = train_loop.build_student(config, evaluation.num_classes, evaluation.image_shape, runner.axis_name)
  try:
    variables = checkpoints.load_variables(workdir, models.variables_template(model, evaluation.image_shape),
                                           role="run")
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
  if jax.process_index() == 0:
    rundir.write_json(os.path.join(workdir, f"eval_{eval_name(config, split, image_folder)}.json"), result)
  return result


def main(argv: list[str] | None = None) -> dict:
  """The command line (see the module docstring); a bad input ends in SystemExit with one message."""
  parser = argparse.ArgumentParser(prog="python -m nst_jax.tools.evaluate",
                                   description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the run's directory (a finished run)")
  where = parser.add_mutually_exclusive_group()
  where.add_argument("--image_folder", help="a class-folder tree <DIR>/<class name>/<image>")
  where.add_argument("--split", help="a split of the run's dataset (default: its data.eval_split)")
  args, rest = parser.parse_known_args(argv)
  try:
    overrides = config_lib.override_texts(rest)
  except config_lib.ConfigError as error:
    parser.error(str(error))
  image_folder = os.path.abspath(args.image_folder) if args.image_folder else None
  try:
    result = evaluate_run(args.workdir, split=args.split, image_folder=image_folder, overrides=overrides)
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"nst_jax.tools.evaluate: {error}")
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
