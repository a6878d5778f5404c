"""The training loop: `train_and_evaluate(config, workdir)` runs one command end to end, as stages.

A supervised config is one stage. A distillation config whose teacher run has not finished (the mark of
a finished run is its `results.json` with `"finished": true`) is two: first the teacher's own run,
from `config.teacher.config` in `config.teacher.workdir` (trained there, or resumed where it stopped),
then the student's. Each stage is data -> models -> train state -> resume from `<workdir>/checkpoints`
-> steps, logging, evaluation every epoch, checkpoints -> results. A SIGTERM or Ctrl-C (SIGINT) in any
stage saves that stage's checkpoint and ends the whole command with `Preempted`; running the same
command again resumes the interrupted stage. The student never starts from a teacher whose run did not
finish.

Files in a stage's workdir (`trainer.rundir`): `config.json` (its config, paths made absolute),
`run.json` (code, packages, devices, timings), `checkpoints/` (Orbax), `results.json` (last and best
top-1 / top-5, the per-epoch history of evaluation and mean train metrics, the teacher's accuracy),
`log.txt` and, where TensorFlow is installed, TensorBoard event files. The data position is the step
(the in-memory pipeline is a pure function of seed and step), so a resumed run reproduces an
uninterrupted one bitwise on CPU. A workdir that this command created is removed again if the stage
fails before its first step.

Faults: one process per workdir (`rundir.lock`, taken before anything is written there; a second command
on it stops at once with one line naming the holder). A checkpoint that fails to read is moved aside and
the stage resumes from the newest one that reads (`checkpoints.Checkpointer.restore_newest_readable`).
A file-system failure (unwritable or impossible folder, full disk) ends the command with one
`rundir.RunDirError` line naming the path and its role. A command whose run already finished with the
same config says so and builds nothing.
"""

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from nst_jax import models, taps
from nst_jax import objective as objective_lib
from nst_jax.models import conv
from nst_jax.trainer import checkpoints, config_lib, parallel, rundir, train
from nst_jax.trainer import data as data_lib

logger = logging.getLogger("nst_jax")


class Preempted(Exception):
  """A stage saved its checkpoint on SIGTERM / SIGINT and stopped; run the same command to resume."""

  def __init__(self, signal_name: str, stage: str, workdir: str, step: int):
    super().__init__(f"{signal_name}: saved step {step} of the {stage} stage in {workdir} and stopped; "
                     "run the same command to resume.")
    self.signal_name, self.stage, self.workdir, self.step = signal_name, stage, workdir, step


@dataclasses.dataclass(frozen=True)
class Stage:
  """One run of a command: `name` is "teacher" or "student"; paths in `config` are absolute."""

  name: str
  config: ml_collections.ConfigDict
  workdir: str


def plan(config: ml_collections.ConfigDict, workdir: str,
         teacher_overrides: Mapping[str, Any] | None = None) -> list[Stage]:
  """The stages `train_and_evaluate` runs: the teacher's run first when it has not finished, then this
  run. `teacher_overrides` ({dotted key: value}, e.g. the command line's `data.*`, `dtype`, `parallel`)
  are applied to the teacher's config; its other keys are the teacher config file's own."""
  workdir = os.path.abspath(workdir)
  config = config_lib.resolve_paths(config, workdir)
  config_lib.check(config)
  _check_objective(config)  # Before any stage trains: a typo in a tap name must not cost a teacher run.
  stages = []
  if config.teacher.model and not rundir.is_finished(config.teacher.workdir):
    if not config.teacher.config:
      raise config_lib.ConfigError(
          f"The teacher run in {config.teacher.workdir} has not finished (no {rundir.RESULTS} marked "
          "finished) and config.teacher.config is empty: train the teacher first, or set "
          "config.teacher.config to its config file so that this command trains it.")
    teacher_config = config_lib.apply_overrides(config_lib.load_config_file(config.teacher.config),
                                                teacher_overrides or {})
    if teacher_config.student.model != config.teacher.model:
      raise config_lib.ConfigError(
          f"config.teacher.config {config.teacher.config!r} trains {teacher_config.student.model!r}, but "
          f"config.teacher.model is {config.teacher.model!r}.")
    stages += plan(teacher_config, config.teacher.workdir, teacher_overrides)
    stages[-1] = dataclasses.replace(stages[-1], name="teacher")
  return [*stages, Stage("student", config, workdir)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       teacher_overrides: Mapping[str, Any] | None = None) -> dict:
  """Runs every stage of the command (see `plan`); returns the last stage's results dict.

  Raises `Preempted` after a SIGTERM / SIGINT has been saved, `config_lib.ConfigError` for a config
  that cannot run (before any work), FloatingPointError on a non-finite loss.
  """
  finished = _already_finished(config, workdir)
  if finished is not None:
    return finished
  stages = plan(config, workdir, teacher_overrides)
  places = _places(stages)
  for stage in stages:  # Before anything is built: a folder that cannot be written is one line now.
    rundir.check_writable(stage.workdir, _role(stage))
  # One handler for the whole command, so a signal during the teacher stage also ends the student's.
  uninstall = (checkpoints.install_preemption_handler() if jax.process_count() == 1 else lambda: None)
  timings, stage = [], stages[0]
  try:
    for stage in stages:
      results = run_stage(stage, timings)
  except (Preempted, config_lib.ConfigError, rundir.RunDirError, checkpoints.CheckpointReadError):
    raise
  except Exception as error:
    os_error = rundir.find_os_error(error)  # Orbax re-raises a failed write as its own exception types.
    if os_error is None:
      raise
    raise rundir.RunDirError(rundir.os_error_line(os_error, places, fallback=stage.workdir)) from error
  finally:
    uninstall()
  return results


def _role(stage: Stage) -> str:
  if stage.name == "student":
    return "the workdir, --workdir"
  return "the teacher's workdir, config.teacher.workdir"


def _places(stages: list[Stage]) -> dict[str, str]:
  """What each folder a command touches is to the user, for one-line file-system errors."""
  places = {_role(stage): stage.workdir for stage in stages}
  data = stages[-1].config.data
  # The data cache's default is `sources`' own: $NST_JAX_CACHE_DIR, else ~/.cache/nst_jax.
  places["the data cache, config.data.cache_dir"] = data.cache_dir or os.environ.get(
      "NST_JAX_CACHE_DIR", os.path.expanduser(os.path.join("~", ".cache", "nst_jax")))
  for key in ("path", "data_dir", "manual_dir"):
    if data[key]:
      places[f"config.data.{key}"] = data[key]
  return places


def _already_finished(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The results of a finished run in `workdir` with this very config (its config.json), else None; a
  finished run with another config (more epochs, say) goes on as a resumed one."""
  workdir = os.path.abspath(workdir)
  results = rundir.read_results(workdir)
  if results is None:
    return None
  resolved = json.loads(config_lib.resolve_paths(config, workdir).to_json_best_effort())
  if resolved != rundir.read_config(workdir):
    return None
  _setup_logging(None)
  logger.info(f"already finished: last top-1 {results['last_top1']:.2f}%, best {results['best_top1']:.2f}% "
              f"(epoch {results['best_epoch']}); results in {os.path.join(workdir, rundir.RESULTS)}. "
              "Nothing to train (a new --workdir trains again).")
  return results


def _layer_pairs(objective: objective_lib.Objective) -> list[tuple[str, tuple[str, str]]]:
  """(term, (student tap, teacher tap)) of every layer pair the objective computes (weight > 0)."""
  return ([("nst", p) for p in objective.nst_layers] if objective.nst_weight > 0 else []) + (
      [("at", p) for p in objective.at_layers] if objective.at_weight > 0 else []) + (
      [("fitnet", objective.fitnet_layer)] if objective.uses_fitnet else [])


def build_model(config, role: str, num_classes: int, image_shape, axis_name: str | None = None) -> nn.Module:
  """`config.<role>.model` (role "student" or "teacher"). A zoo model as it is; a user's model (import
  path or registered name) wrapped in `taps.Tapped` with the taps the objective's layer pairs name on its
  side. The wrapper keeps the model's variable tree, so a teacher trained in a run without pairs loads
  into it; its logits must have `num_classes` entries."""
  name = config[role].model
  dtype = config_lib.DTYPES[config.dtype]
  if models.is_zoo(name):
    return models.get_model(name, num_classes, dtype=dtype, axis_name=axis_name)
  side = 0 if role == "student" else 1
  wanted = tuple(dict.fromkeys(pair[side] for _, pair in _layer_pairs(config_lib.objective(config))))
  model = models.get_model(name, num_classes, taps=wanted, dtype=dtype, axis_name=axis_name)
  sample = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  logits, _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], sample)
  if getattr(logits, "shape", None) != (1, num_classes):
    raise config_lib.ConfigError(
        f"config.{role}.model {name!r}: its output for one image of shape {tuple(image_shape)} is "
        f"{getattr(logits, 'shape', type(logits).__name__)}, not the logits (1, {num_classes}) of the data's "
        f"{num_classes} classes (does it take num_classes?).")
  return model


def _check_objective(config):
  """The objective's weights and layer names against the models' taps (from shapes only): a zoo model's
  tap names, a user's model's module paths and own features (`taps.list_taps`)."""
  size = config.data.image_size or 224
  shape = (size, size, 3)
  objective = config_lib.objective(config)

  def tap_names(role):
    name = config[role].model
    if models.is_zoo(name):
      return list(models.tap_shapes(models.get_model(name, 10), shape))
    available = list(taps.list_taps(models.get_model(name, 10), shape))
    for term, pair in _layer_pairs(objective):  # The nearest paths, among a model's many.
      tap = pair[0 if role == "student" else 1]
      if tap not in available:
        raise config_lib.ConfigError(f"config.distill.{term}: {role} layer " + taps.unknown_tap_message(
            tap, available, f"the {role} model {name!r}"))
    return available

  try:
    objective.check_taps(tap_names("student"), tap_names("teacher") if config.teacher.model else None)
  except config_lib.ConfigError:
    raise
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from None


def build_student(config, num_classes: int, image_shape, axis_name: str | None = None) -> nn.Module:
  """The module a run trains and its checkpoint holds: the student, or with FitNet the student with its
  regressor onto the teacher's map (`objective.student_module`), so the checkpoint fits it entry by entry."""
  student = build_model(config, "student", num_classes, image_shape, axis_name)
  objective = config_lib.objective(config)
  teacher_shapes = None
  if objective.uses_fitnet:
    teacher_shapes = models.tap_shapes(build_model(config, "teacher", num_classes, image_shape, axis_name),
                                       image_shape)
  return objective_lib.student_module(student, objective, teacher_shapes)


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


def _setup_logging(workdir: str | None):
  """Console (and `<workdir>/log.txt`) for the `nst_jax` logger, from process 0 only."""
  logger.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  logger.propagate = False  # absl's root handler would print every line twice.
  for handler in list(logger.handlers):
    if isinstance(handler, logging.FileHandler):
      logger.removeHandler(handler)
      handler.close()
  if not any(getattr(h, "_nst_console", False) for h in logger.handlers):
    console = logging.StreamHandler(sys.stdout)
    console._nst_console = True
    logger.addHandler(console)
  if workdir is not None and jax.process_index() == 0:
    logger.addHandler(logging.FileHandler(os.path.join(workdir, "log.txt")))


def _summary_writer(workdir, enabled: bool):
  """TensorBoard events where TensorFlow is installed and `logging.tensorboard` is on; else None.
  (Importing TensorFlow costs seconds per process: small runs and tests switch it off.)"""
  if not enabled or jax.process_index() != 0 or importlib.util.find_spec("tensorflow") is None:
    return None
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from flax.metrics import tensorboard  # Imports TensorFlow: only when TensorBoard files are wanted.

  return tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))


def _write_json(path, payload):
  """`rundir.write_json` from process 0 only (every process computes the same payload)."""
  if jax.process_index() == 0:
    rundir.write_json(path, payload)


class _Window:
  """Means of the train metrics over the logging window and over the epoch, exact on resume."""

  def __init__(self, epoch_sums=None, epoch_steps=0):
    self.pending, self.window_sums, self.window_steps = [], {}, 0
    self.epoch_sums, self.epoch_steps = dict(epoch_sums or {}), epoch_steps

  def add(self, metrics):
    self.pending.append(metrics)  # Device arrays: read only when the window is logged.

  def flush(self, runner) -> dict[str, float]:
    """The window's means (and adds them to the epoch's sums)."""
    for metrics in self.pending:
      for k, v in runner.metrics_to_host(metrics).items():
        self.window_sums[k] = self.window_sums.get(k, 0.0) + v
        self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
    self.window_steps += len(self.pending)
    self.epoch_steps += len(self.pending)
    self.pending = []
    means = {k: v / max(self.window_steps, 1) for k, v in self.window_sums.items()}
    self.window_sums, self.window_steps = {}, 0
    return means

  def end_epoch(self) -> dict[str, float]:
    means = {k: v / max(self.epoch_steps, 1) for k, v in self.epoch_sums.items()}
    self.epoch_sums, self.epoch_steps = {}, 0
    return means


@dataclasses.dataclass
class _Setup:
  """What a stage builds before it touches its workdir: data, models, objective, schedule, fresh state."""

  runner: parallel.Runner
  data: data_lib.Data
  objective: objective_lib.Objective
  student: nn.Module  # with FitNet's regressor, when used
  teacher: nn.Module | None
  teacher_variables: Any
  learning_rate_fn: optax.Schedule
  state: train.TrainState
  steps_per_epoch: int
  total_steps: int
  per_device_batch: int


def _build(config) -> _Setup:
  mesh = parallel.make_mesh()
  runner = parallel.Runner(config.parallel, mesh)
  per_device = parallel.check_global_batch(config.schedule.batch_size, mesh.devices.size)
  data = data_lib.build(config, mesh)
  axis = runner.axis_name
  objective = config_lib.objective(config)
  student = build_model(config, "student", data.num_classes, data.image_shape, axis)
  teacher = (build_model(config, "teacher", data.num_classes, data.image_shape, axis)
             if config.teacher.model else None)
  teacher_taps = models.tap_shapes(teacher, data.image_shape) if teacher else None
  objective.check_taps(list(models.tap_shapes(student, data.image_shape)),
                       teacher_taps and list(teacher_taps))
  student = objective_lib.student_module(student, objective, teacher_taps)
  teacher_variables = None
  if teacher is not None:
    teacher_variables = checkpoints.load_variables(
        config.teacher.workdir, models.variables_template(teacher, data.image_shape))

  steps_per_epoch = data.train.steps_per_epoch
  lr_fn = train.step_schedule(config.optim.learning_rate, steps_per_epoch, config.schedule.decay_epochs,
                              config.schedule.decay_factor)
  optimizer = train.make_optimizer(lr_fn, config.optim.momentum, config.optim.nesterov,
                                   config.optim.weight_decay)
  sample = jnp.zeros((1, *data.image_shape), jnp.float32)
  # Jitted: run op by op, the initialisation of a ResNet takes seconds of dispatch.
  state = jax.jit(lambda key: train.create_train_state(student, optimizer, sample, key))(
      jax.random.key(config.seed))
  return _Setup(runner, data, objective, student, teacher, teacher_variables, lr_fn, state, steps_per_epoch,
                config.schedule.epochs * steps_per_epoch, per_device)


def run_stage(stage: Stage, timings: list | None = None) -> dict:
  """Trains (or distils) one stage's student in its workdir (see the module docstring), its programs
  traced with the stage's `conv_impl`. Appends the stage's timing record to `timings`."""
  timings = [] if timings is None else timings
  with conv.use_impl(stage.config.conv_impl):
    started, wall_start = time.time(), time.perf_counter()
    created = not os.path.exists(stage.workdir)
    _setup_logging(None)
    lock = _lock(stage)  # Before anything is written: a second command on this workdir stops here.
    clock = None
    try:
      setup = _build(stage.config)
      clock = _Rate(setup.total_steps)
      results, start_step, step = _train(stage, setup, clock)
      wall, ended = time.perf_counter() - wall_start, time.time()
      timings.append({"name": stage.name, "workdir": stage.workdir, "start": started, "end": ended,
                      "wall_s": wall, "steps": step - start_step})
      return _finish(stage, results, step, timings)
    except BaseException:
      if created and (clock is None or clock.first is None) and jax.process_index() == 0:
        shutil.rmtree(stage.workdir, ignore_errors=True)  # Nothing was trained: leave no half-made workdir.
      raise
    finally:
      lock.release()


def _lock(stage: Stage) -> rundir.RunLock:
  """The stage's workdir lock, held by process 0 (every process learns whether it got it)."""
  if jax.process_count() == 1:
    return rundir.lock(stage.workdir)
  held, busy = rundir.RunLock(stage.workdir, None), None
  if jax.process_index() == 0:
    try:
      held = rundir.lock(stage.workdir)
    except rundir.WorkdirBusy as error:
      busy = error
  if not multihost_utils.broadcast_one_to_all(np.int32(busy is None)):
    raise busy or rundir.WorkdirBusy(f"{stage.workdir} is in use by another run (found by process 0).")
  return held


def _log_start(stage: Stage, setup: _Setup):
  config = stage.config
  logger.info(f"nst_jax {stage.name} stage: {jax.process_count()} process(es), {jax.device_count()} "
              f"device(s) ({jax.devices()[0].platform}), {jax.local_device_count()} local; global batch "
              f"{config.schedule.batch_size}, {setup.per_device_batch} per device; "
              f"parallel={config.parallel}, dtype={config.dtype}; workdir {stage.workdir}")
  logger.info(f"data: {config.data.name} ({setup.data.pipeline} pipeline), {setup.steps_per_epoch} steps per "
              f"epoch, {setup.data.num_classes} classes, images {setup.data.image_shape}")


def _restore(ckpt: checkpoints.Checkpointer, setup: _Setup):
  """(state, start step, results, window): from the newest checkpoint that reads, or a fresh start when
  there never was one. Damaged checkpoints are moved aside, each with a warning."""
  results = {"epochs": [], "best_top1": 0.0, "best_top5": 0.0, "best_epoch": 0, "finished": False}

  def damaged(step, moved_to, error):
    logger.warning(f"checkpoint {step} cannot be read ({error}); moved aside to {moved_to}, trying the "
                   "one before it")

  restored = ckpt.restore_newest_readable(setup.state, damaged)
  if restored is None:
    return setup.state, 0, results, _Window()
  state, metadata, _ = restored
  start_step = int(metadata["step"])
  logger.info(f"resumed from step {start_step} (epoch {start_step / setup.steps_per_epoch:.2f})")
  return state, start_step, metadata["results"], _Window(metadata.get("epoch_sums"),
                                                          metadata.get("epoch_steps", 0))


def _train(stage: Stage, setup: _Setup, clock: "_Rate") -> tuple[dict, int, int]:
  """The stage's steps from its latest checkpoint on; returns (results, start step, last step)."""
  config, workdir, runner, data = stage.config, stage.workdir, setup.runner, setup.data
  _setup_logging(workdir)
  _log_start(stage, setup)
  _write_json(os.path.join(workdir, rundir.CONFIG), rundir.config_record(config))
  ckpt = checkpoints.Checkpointer(workdir, save_every_steps=config.logging.checkpoint_every_steps,
                                  save_every_minutes=config.logging.checkpoint_every_minutes,
                                  keep=config.logging.keep_checkpoints)
  state, start_step, results, window = _restore(ckpt, setup)
  models_ = train.Models(setup.student, setup.teacher, config.teacher.batchnorm)
  train_fn = runner.compile_train(train.train_body(models_, setup.objective, setup.learning_rate_fn))
  eval_student = runner.compile_eval(train.eval_body(setup.student))
  state = runner.put_replicated(state)
  t_vars = runner.put_replicated(setup.teacher_variables) if setup.teacher is not None else None
  if setup.teacher is not None and "teacher" not in results:
    results["teacher"] = accuracy(runner, runner.compile_eval(train.eval_body(setup.teacher)), t_vars,
                                  data.eval)
    logger.info(f"teacher {config.teacher.model}: top-1 {results['teacher']['top1']:.2f}%, "
                f"top-5 {results['teacher']['top5']:.2f}% on {results['teacher']['count']} examples")
  writer = _summary_writer(workdir, config.logging.tensorboard)
  logger.info(f"training {config.student.model}{' from ' + config.teacher.model if setup.teacher else ''}: "
              f"{config.schedule.epochs} epochs x {setup.steps_per_epoch} steps, from step {start_step}")
  total_steps, steps_per_epoch = setup.total_steps, setup.steps_per_epoch
  step = start_step
  batches = data.train.iterate(start_step)  # The data position is the step.
  try:
    while step < total_steps:
      state, metrics = train_fn(state, t_vars, runner.put_batch(next(batches)))
      step += 1
      window.add(metrics)
      clock.stepped(step, metrics)
      epoch, epoch_end = divmod(step, steps_per_epoch)[0], step % steps_per_epoch == 0
      save_due = ckpt.should_save(step)  # Once per step: in multi-process runs the preemption sync point.
      preempted = ckpt.reached_preemption(step)
      save_due = save_due or step == total_steps or (
          epoch_end and config.logging.checkpoint_every_epochs and
          epoch % config.logging.checkpoint_every_epochs == 0)
      if step % config.logging.log_every_steps == 0 or epoch_end or save_due:
        _log_window(window.flush(runner), step, clock, writer)
      if epoch_end and (epoch % config.logging.eval_every_epochs == 0 or step == total_steps):
        acc = accuracy(runner, eval_student, train.student_variables(state), data.eval)
        _record_epoch(results, epoch, acc, window.end_epoch(), step, writer)
      elif epoch_end:
        window.end_epoch()
      if save_due or preempted:
        ckpt.save(step, runner.get_replicated(state),
                  {"step": step, "results": results, "epoch_sums": window.epoch_sums,
                   "epoch_steps": window.epoch_steps}, force=True)
      if preempted:
        break
    if step >= total_steps:
      last = results["epochs"][-1]
      results.update(last_top1=last["top1"], last_top5=last["top5"], finished=True)
  finally:
    ckpt.wait_until_finished()
    ckpt.close()
    if writer:
      writer.flush()
  return results, start_step, step


class _Rate:
  """Steps per second and the ETA, from steady-state steps only (the first step compiles); `first` is
  None until this process has run a step."""

  def __init__(self, total_steps: int):
    self.total_steps, self.since, self.first = total_steps, None, None

  def stepped(self, step: int, metrics):
    if self.since is None:
      jax.block_until_ready(metrics)
      self.since, self.first = time.perf_counter(), step

  def describe(self, step: int) -> str:
    steady = step - self.first if self.first is not None else 0
    rate = steady / max(time.perf_counter() - self.since, 1e-9) if steady else None
    if not rate:
      return "ETA after the first steps"
    return f"{rate:.2f} steps/s, ETA {(self.total_steps - step) / rate / 60:.1f} min"


def _log_window(means: dict[str, float], step: int, clock: _Rate, writer):
  _check_finite(means, step)
  terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(means.items()))
  logger.info(f"step {step}/{clock.total_steps} ({clock.describe(step)}): {terms} (means over the window)")
  if writer:
    for k, v in means.items():
      writer.scalar(k, v, step)


def _record_epoch(results: dict, epoch: int, acc: dict, train_means: dict, step: int, writer):
  results["epochs"].append({"epoch": epoch, "top1": acc["top1"], "top5": acc["top5"], "train": train_means})
  if acc["top1"] > results["best_top1"]:
    results["best_top1"], results["best_epoch"] = acc["top1"], epoch
  results["best_top5"] = max(results.get("best_top5", 0.0), acc["top5"])
  logger.info(f"epoch {epoch}: eval top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}% "
              f"(best {results['best_top1']:.2f}% at epoch {results['best_epoch']})")
  if writer:
    writer.scalar("eval_accuracy", acc["top1"], step)
    writer.scalar("eval_top5_accuracy", acc["top5"], step)


def _finish(stage: Stage, results: dict, step: int, timings: list) -> dict:
  """Writes run.json, and results.json when the stage finished; raises `Preempted` when it did not."""
  record = {**rundir.describe(stage.config), "stage": stage.name, "start": timings[-1]["start"],
            "end": timings[-1]["end"], "wall_s": timings[-1]["wall_s"], "stages": list(timings),
            "finished": results["finished"]}
  _write_json(os.path.join(stage.workdir, rundir.RUN), record)
  if not results["finished"]:
    # Multi-process runs stop at JAX's preemption sync point, which SIGTERM triggers.
    signal_name = checkpoints.preemption_signal() or "SIGTERM"
    logger.info(f"{signal_name}: saved step {step} of the {stage.name} stage ({stage.workdir}) and stopping; "
                f"run the same command to resume the {stage.name} stage")
    raise Preempted(signal_name, stage.name, stage.workdir, step)
  _write_json(os.path.join(stage.workdir, rundir.RESULTS), results)
  logger.info(f"done: last top-1 {results['last_top1']:.2f}%, best {results['best_top1']:.2f}% "
              f"(epoch {results['best_epoch']}); results in {os.path.join(stage.workdir, rundir.RESULTS)}")
  return results


def _check_finite(metrics, step):
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(f"Non-finite loss at step {step}: {bad} (window means of all terms: {metrics}). "
                             "The last finite checkpoint is kept; lower the learning rate or a loss weight.")
