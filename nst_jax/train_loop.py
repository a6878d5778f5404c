"""The training loop: `train_and_evaluate(config, workdir)` runs one command end to end, as stages.

A supervised config is one stage. A distillation config whose teacher run has not finished (the mark of
a finished run is its `results.json` with `"finished": true`) is two: first the teacher's own run,
from `config.teacher.config` in `config.teacher.workdir` (trained there, or resumed where it stopped),
then the student's. Each stage is data -> models -> train state -> resume from `<workdir>/checkpoints`
-> steps, logging, evaluation every epoch, checkpoints -> results. A SIGTERM or Ctrl-C (SIGINT) in any
stage saves that stage's checkpoint and ends the whole command with `Preempted`; running the same
command again resumes the interrupted stage. The student never starts from a teacher whose run did not
finish.

Files in a stage's workdir: `config.json` (its config, paths made absolute), `run.json` (code, packages,
devices, timings), `checkpoints/` (Orbax), `results.json` (last and best top-1 / top-5, the per-epoch
history of evaluation and mean train metrics, the teacher's accuracy), `log.txt` and, where TensorFlow
is installed, TensorBoard event files. The data position is the step (the in-memory pipeline is a pure
function of seed and step), so a resumed run reproduces an uninterrupted one bitwise on CPU. A workdir
that this command created is removed again if the stage fails before its first step.
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

import jax
import jax.numpy as jnp
import ml_collections

from nst_jax import checkpoints, config_lib, models, parallel, run_record, train
from nst_jax import data as data_lib
from nst_jax import objective as objective_lib
from nst_jax.evaluate import accuracy
from nst_jax.models import conv

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RESULTS = "results.json"
load_config_file = config_lib.load_config_file  # Kept here too: the name the README used to give.

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


def is_finished(workdir: str) -> bool:
  """Whether the run in `workdir` finished: its results.json says so (the mark every stage checks)."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return bool(json.load(f).get("finished"))


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
  if config.teacher.model and not is_finished(config.teacher.workdir):
    if not config.teacher.config:
      raise config_lib.ConfigError(
          f"The teacher run in {config.teacher.workdir} has not finished (no {RESULTS} marked finished) and "
          "config.teacher.config is empty: train the teacher first, or set config.teacher.config to its "
          "config file so that this command trains it.")
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
  stages = plan(config, workdir, teacher_overrides)
  # One handler for the whole command, so a signal during the teacher stage also ends the student's.
  uninstall = (checkpoints.install_preemption_handler() if jax.process_count() == 1 else lambda: None)
  timings = []
  try:
    for stage in stages:
      results = run_stage(stage, timings)
  finally:
    uninstall()
  return results


def _check_objective(config):
  """The objective's weights and layer names against the models' taps (from shapes only)."""
  size = config.data.image_size or 224
  tap_names = lambda name: list(tap_shapes(models.get_model(name, 10), (size, size, 3)))  # noqa: E731
  objective_lib.Objective.from_config(config.distill).check_taps(
      tap_names(config.student.model), tap_names(config.teacher.model) if config.teacher.model else None)


def tap_shapes(model, image_shape) -> dict[str, tuple[int, ...]]:
  """Each tap of `model` -> its per-example shape (from shapes only; nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  _, features = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  return {name: f.shape[1:] for name, f in features.items()}


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
  from flax.metrics import tensorboard

  return tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))


def write_json(path, payload):
  """Atomic JSON write from process 0: a reader never sees half a file."""
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


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


def run_stage(stage: Stage, timings: list | None = None) -> dict:
  """Trains (or distils) one stage's student in its workdir (see the module docstring), its programs
  traced with the stage's `conv_impl`."""
  with conv.use_impl(stage.config.conv_impl):
    return _run_stage(stage, [] if timings is None else timings)


def _run_stage(stage: Stage, timings: list) -> dict:
  config, workdir = stage.config, stage.workdir
  started, wall_start = time.time(), time.perf_counter()
  created = not os.path.exists(workdir)
  _setup_logging(None)
  mesh = parallel.make_mesh()
  runner = parallel.Runner(config.parallel, mesh)
  global_batch = config.schedule.batch_size
  per_device = parallel.check_global_batch(global_batch, mesh.devices.size)
  data = data_lib.build(config, mesh)
  dtype, axis = DTYPES[config.dtype], runner.axis_name
  objective = objective_lib.Objective.from_config(config.distill)
  student = models.get_model(config.student.model, data.num_classes, dtype=dtype, axis_name=axis)
  teacher = (models.get_model(config.teacher.model, data.num_classes, dtype=dtype, axis_name=axis)
             if config.teacher.model else None)
  teacher_taps = tap_shapes(teacher, data.image_shape) if teacher else None
  objective.check_taps(list(tap_shapes(student, data.image_shape)), teacher_taps and list(teacher_taps))
  student = objective_lib.student_module(student, objective, teacher_taps)
  sample = jnp.zeros((1, *data.image_shape), jnp.float32)
  teacher_variables = None
  if teacher is not None:
    template = jax.eval_shape(lambda: teacher.init(jax.random.key(0), sample, train=False))
    teacher_variables = checkpoints.load_teacher_variables(config.teacher.workdir, template)

  steps_per_epoch = data.train.steps_per_epoch
  total_steps = config.schedule.epochs * steps_per_epoch
  lr_fn = train.step_schedule(config.optim.learning_rate, steps_per_epoch, config.schedule.decay_epochs,
                              config.schedule.decay_factor)
  optimizer = train.make_optimizer(lr_fn, config.optim.momentum, config.optim.nesterov,
                                   config.optim.weight_decay)
  # Jitted: run op by op, the initialisation of a ResNet takes seconds of dispatch.
  state = jax.jit(lambda key: train.create_train_state(student, optimizer, sample, key))(
      jax.random.key(config.seed))

  os.makedirs(workdir, exist_ok=True)
  first_step_done = False
  try:
    _setup_logging(workdir)
    logger.info(f"nst_jax {stage.name} stage: {jax.process_count()} process(es), {jax.device_count()} "
                f"device(s) ({jax.devices()[0].platform}), {jax.local_device_count()} local; global batch "
                f"{global_batch}, {per_device} per device; parallel={config.parallel}, dtype={config.dtype}; "
                f"workdir {workdir}")
    logger.info(f"data: {config.data.name} ({data.pipeline} pipeline), {steps_per_epoch} steps per epoch, "
                f"{data.num_classes} classes, images {data.image_shape}")
    write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    ckpt = checkpoints.Checkpointer(workdir, save_every_steps=config.logging.checkpoint_every_steps,
                                    save_every_minutes=config.logging.checkpoint_every_minutes,
                                    keep=config.logging.keep_checkpoints)
    results = {"epochs": [], "best_top1": 0.0, "best_top5": 0.0, "best_epoch": 0, "finished": False}
    start_step, window = 0, _Window()
    if ckpt.latest_step() is not None:
      state, metadata = ckpt.restore(state)
      start_step, results = int(metadata["step"]), metadata["results"]
      window = _Window(metadata.get("epoch_sums"), metadata.get("epoch_steps", 0))
      logger.info(f"resumed from step {start_step} (epoch {start_step / steps_per_epoch:.2f})")

    train_fn = runner.compile_train(train.train_body(train.Models(student, teacher,
                                                                  config.teacher.batchnorm),
                                                     objective, lr_fn))
    eval_student = runner.compile_eval(train.eval_body(student))
    state = runner.put_replicated(state)
    t_vars = runner.put_replicated(teacher_variables) if teacher is not None else None
    if teacher is not None and "teacher" not in results:
      results["teacher"] = accuracy(runner, runner.compile_eval(train.eval_body(teacher)), t_vars,
                                             data.eval)
      logger.info(f"teacher {config.teacher.model}: top-1 {results['teacher']['top1']:.2f}%, "
                  f"top-5 {results['teacher']['top5']:.2f}% on {results['teacher']['count']} examples")
    writer = _summary_writer(workdir, config.logging.tensorboard)
    logger.info(f"training {config.student.model}{' from ' + config.teacher.model if teacher else ''}: "
                f"{config.schedule.epochs} epochs x {steps_per_epoch} steps, from step {start_step}")
    step, steady_since, steady_step = start_step, None, start_step
    batches = data.train.iterate(start_step)  # The data position is the step.
    try:
      while step < total_steps:
        state, metrics = train_fn(state, t_vars, runner.put_batch(next(batches)))
        step += 1
        window.add(metrics)
        if not first_step_done:  # The ETA counts steady-state steps only, not the compilation.
          jax.block_until_ready(metrics)
          first_step_done, steady_since, steady_step = True, time.perf_counter(), step
        epoch, epoch_end = divmod(step, steps_per_epoch)[0], step % steps_per_epoch == 0
        save_due = ckpt.should_save(step)  # Once per step: in multi-process runs the preemption sync point.
        preempted = ckpt.reached_preemption(step)
        save_due = save_due or step == total_steps or (
            epoch_end and config.logging.checkpoint_every_epochs and
            epoch % config.logging.checkpoint_every_epochs == 0)
        if step % config.logging.log_every_steps == 0 or epoch_end or save_due:
          means = window.flush(runner)
          _check_finite(means, step)
          steady = step - steady_step
          rate = steady / max(time.perf_counter() - steady_since, 1e-9) if steady else None
          eta = f"ETA {(total_steps - step) / rate / 60:.1f} min" if rate else "ETA after the first steps"
          terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(means.items()))
          speed = f"{rate:.2f} steps/s, " if rate else ""
          logger.info(f"step {step}/{total_steps} ({speed}{eta}): {terms} (means over the window)")
          if writer:
            for k, v in means.items():
              writer.scalar(k, v, step)
        if epoch_end and (epoch % config.logging.eval_every_epochs == 0 or step == total_steps):
          acc = accuracy(runner, eval_student, train.student_variables(state), data.eval)
          results["epochs"].append({"epoch": epoch, "top1": acc["top1"], "top5": acc["top5"],
                                    "train": window.end_epoch()})
          if acc["top1"] > results["best_top1"]:
            results["best_top1"], results["best_epoch"] = acc["top1"], epoch
          results["best_top5"] = max(results.get("best_top5", 0.0), acc["top5"])
          logger.info(f"epoch {epoch}: eval top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}% "
                      f"(best {results['best_top1']:.2f}% at epoch {results['best_epoch']})")
          if writer:
            writer.scalar("eval_accuracy", acc["top1"], step)
            writer.scalar("eval_top5_accuracy", acc["top5"], step)
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
  except BaseException:
    if created and not first_step_done and jax.process_index() == 0:
      shutil.rmtree(workdir, ignore_errors=True)  # Nothing was trained: leave no half-made workdir.
    raise
  wall, ended = time.perf_counter() - wall_start, time.time()
  timings.append({"name": stage.name, "workdir": workdir, "start": started, "end": ended, "wall_s": wall,
                  "steps": step - start_step})
  record = {**run_record.describe(config), "stage": stage.name, "start": started, "end": ended,
            "wall_s": wall, "stages": list(timings), "finished": results["finished"]}
  write_json(os.path.join(workdir, "run.json"), record)
  if not results["finished"]:
    # Multi-process runs stop at JAX's preemption sync point, which SIGTERM triggers.
    signal_name = checkpoints.preemption_signal() or "SIGTERM"
    logger.info(f"{signal_name}: saved step {step} and stopping; run the same command to resume")
    raise Preempted(signal_name, stage.name, workdir, step)
  write_json(os.path.join(workdir, RESULTS), results)
  logger.info(f"done: last top-1 {results['last_top1']:.2f}%, best {results['best_top1']:.2f}% "
              f"(epoch {results['best_epoch']}); results in {os.path.join(workdir, RESULTS)}")
  return results


def _check_finite(metrics, step):
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(f"Non-finite loss at step {step}: {bad} (window means of all terms: {metrics}). "
                             "The last finite checkpoint is kept; lower the learning rate or a loss weight.")
