"""The training loop: `train_and_evaluate(config, workdir)` runs one experiment end to end.

Data -> models -> (teacher from its own run, trained first when it is missing) -> train state ->
resume from `<workdir>/checkpoints` -> steps, logging, evaluation every epoch, checkpoints -> results.

Files in the workdir: `config.json` (the run's config), `checkpoints/` (Orbax), `results.json` (last and
best top-1 / top-5 and the teacher's accuracy), `log.txt` (the console log) and, where TensorFlow is
installed, TensorBoard event files. Running the same command again resumes where the run stopped: the
data position is the step (the in-memory pipeline is a pure function of seed and step), so a resumed run
reproduces an uninterrupted one bitwise on CPU. SIGTERM saves a checkpoint and returns cleanly.
"""

import importlib.util
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nst_jax import checkpoints, models, parallel, train
from nst_jax import objective as objective_lib
from nst_jax.data import device_pipeline, sources, tfds_pipeline

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """A config file's `get_config()` (used to train a missing teacher first)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _check_choice(value, valid, key):
  if value not in valid:
    raise ValueError(f"{key}: unknown value {value!r}. Valid values: {', '.join(map(str, valid))}.")


def _load_arrays(config, split: str) -> sources.ArrayDataset:
  d = config.data
  options = {}
  if d.name == "image_folder":
    if not d.path:
      raise ValueError("config.data.path must name the class-folder tree for data.name='image_folder'.")
    options = {"path": d.path, "validation_per_class": d.validation_per_class,
               "limit_per_class": d.limit_per_class or None}
  elif d.name in ("cifar10", "cifar100"):
    options = {"data_dir": d.data_dir or None}
  if d.cache_dir and d.name != "digits":
    options["cache_dir"] = d.cache_dir
  dataset = sources.load(d.name, split, **options)
  size = d.image_size
  if size and dataset.images.shape[1:3] != (size, size):
    # Resized once on the host (bilinear), so the zoo's 32x32 models can run small images.
    images = jax.image.resize(jnp.asarray(dataset.images, jnp.float32),
                              (len(dataset), size, size, dataset.images.shape[-1]), "bilinear")
    dataset = sources.ArrayDataset(np.asarray(jnp.clip(jnp.round(images), 0, 255), np.uint8),
                                   dataset.labels, dataset.num_classes, dataset.class_names)
  return dataset


def _normalisation(config, dataset: sources.ArrayDataset):
  if config.data.mean:
    return tuple(config.data.mean), tuple(config.data.std)
  if config.data.name in sources.MEAN_STD:
    return sources.MEAN_STD[config.data.name]
  return sources.channel_stats(dataset.images)


def _in_memory_pipelines(config, mesh):
  """Arrays decoded once, on the devices, batched and augmented by jitted JAX code (no TensorFlow)."""
  train_data = _load_arrays(config, config.data.train_split)
  eval_data = _load_arrays(config, config.data.eval_split)
  mean, std = _normalisation(config, train_data)
  kwargs = {"mean": mean, "std": std, "mesh": mesh, "seed": config.seed,
            "global_batch": config.schedule.batch_size}
  return (device_pipeline.DevicePipeline(train_data, augment=config.data.augment, **kwargs),
          device_pipeline.DevicePipeline(eval_data, augment="none", **kwargs),
          train_data.num_classes, train_data.image_shape)


def _streaming_pipelines(config, mesh):
  """tf.data from TFDS, each host reading its own part (ImageNet-sized data)."""
  d = config.data
  size = d.image_size or 224
  mean, std = (tuple(d.mean), tuple(d.std)) if d.mean else sources.MEAN_STD.get(d.name, (None, None))
  kwargs = {"global_batch": config.schedule.batch_size, "seed": config.seed, "image_size": size,
            "resize_size": round(size * 256 / 224), "mean": mean, "std": std, "mesh": mesh,
            "data_dir": d.data_dir or None, "manual_dir": d.manual_dir or None}
  train_pipe = tfds_pipeline.TfdsPipeline(d.name, split=d.train_split, preprocess=d.augment, **kwargs)
  eval_pipe = tfds_pipeline.TfdsPipeline(d.name, split=d.eval_split, preprocess=d.augment, **kwargs)
  return train_pipe, eval_pipe, train_pipe.num_classes, (size, size, 3)


def _taps(model, image_shape, dtype=jnp.float32) -> list[str]:
  x = jnp.zeros((1, *image_shape), dtype)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  _, features = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  return list(features)


class _Log:
  """Console and `log.txt`, from process 0 only."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, "log.txt")
    self.enabled = jax.process_index() == 0

  def __call__(self, message: str):
    if self.enabled:
      logging.info(message)
      print(message, flush=True)
      with open(self.path, "a") as f:
        f.write(message + "\n")


def _summary_writer(workdir):
  """TensorBoard events where TensorFlow is installed; None (and no events) where it is not."""
  if jax.process_index() != 0 or importlib.util.find_spec("tensorflow") is None:
    return None
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from flax.metrics import tensorboard

  return tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))


def _write_json(path, payload):
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def evaluate(evaluate_fn, variables, pipeline) -> dict[str, float]:
  """Top-1 / top-5 accuracy (%) from exact sums over the whole eval split, padded batch included."""
  totals = {"top1_correct": 0.0, "top5_correct": 0.0, "count": 0.0}
  for batch in pipeline.eval_batches():
    sums = jax.device_get(evaluate_fn(variables, batch))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  count = max(totals["count"], 1.0)
  return {"top1": 100.0 * totals["top1_correct"] / count, "top5": 100.0 * totals["top5_correct"] / count,
          "count": int(totals["count"])}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or distils) the configured student in `workdir`; returns the results dict."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  log = _Log(workdir)
  _check_choice(config.dtype, DTYPES, "config.dtype")
  _check_choice(config.parallel, parallel.MODES, "config.parallel")
  _check_choice(config.teacher.batchnorm, train.TEACHER_BATCHNORM_MODES, "config.teacher.batchnorm")
  _check_choice(config.data.pipeline, ("auto", "device", "tfds"), "config.data.pipeline")
  streaming = config.data.pipeline == "tfds" or (config.data.pipeline == "auto" and
                                                 config.data.name not in sources.list_sources())
  if not streaming:
    _check_choice(config.data.name, sources.list_sources(), "config.data.name")
  _check_choice(config.data.augment, tfds_pipeline.PREPROCESSING if streaming else
                device_pipeline.AUGMENTATIONS, "config.data.augment")
  objective = objective_lib.Objective.from_config(config.distill)

  mesh = parallel.make_mesh()
  runner = parallel.Runner(config.parallel, mesh)
  global_batch = config.schedule.batch_size
  per_device = parallel.check_global_batch(global_batch, mesh.devices.size)
  log(f"nst_jax: {jax.process_count()} host(s), {jax.device_count()} device(s) "
      f"({jax.devices()[0].platform}), {jax.local_device_count()} local; global batch {global_batch}, "
      f"{per_device} per device; parallel={config.parallel}, dtype={config.dtype}; workdir {workdir}")
  _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))

  if streaming:
    train_pipe, eval_pipe, num_classes, image_shape = _streaming_pipelines(config, mesh)
  else:
    train_pipe, eval_pipe, num_classes, image_shape = _in_memory_pipelines(config, mesh)
  log(f"data: {config.data.name} ({'tf.data' if streaming else 'in memory'}), "
      f"{train_pipe.steps_per_epoch} steps per epoch, {num_classes} classes, images {image_shape}")

  dtype, axis = DTYPES[config.dtype], runner.axis_name
  student = models.get_model(config.student.model, num_classes, dtype=dtype, axis_name=axis)
  teacher = (models.get_model(config.teacher.model, num_classes, dtype=dtype, axis_name=axis)
             if config.teacher.model else None)
  teacher_taps = _taps(teacher, image_shape) if teacher else None
  objective.check_taps(_taps(student, image_shape), teacher_taps)
  sample = jnp.zeros((1, *image_shape), jnp.float32)

  teacher_variables = None
  if teacher is not None:
    teacher_variables = _load_or_train_teacher(config, teacher, sample, log)
  regressor = None
  if objective.uses_fitnet:
    s_tap, t_tap = objective.fitnet_layer
    _, t_feats = jax.eval_shape(lambda: teacher.apply(teacher_variables, sample, train=False))
    regressor = objective_lib.HintRegressor(teacher_shape=t_feats[t_tap].shape[1:], student_tap=s_tap,
                                            dtype=dtype, axis_name=axis)
  run_models = train.Models(student, teacher, regressor, config.teacher.batchnorm)

  steps_per_epoch = train_pipe.steps_per_epoch
  total_steps = config.schedule.epochs * steps_per_epoch
  lr_fn = train.step_schedule(config.optim.learning_rate, steps_per_epoch, config.schedule.decay_epochs,
                              config.schedule.decay_factor)
  optimizer = train.make_optimizer(lr_fn, config.optim.momentum, config.optim.nesterov,
                                   config.optim.weight_decay)
  rng = jax.random.key(config.seed)
  state = train.create_train_state(run_models, optimizer, sample, jax.random.fold_in(rng, 1))

  ckpt = checkpoints.Checkpointer(workdir, save_every_steps=config.logging.checkpoint_every_steps,
                                  keep=config.logging.keep_checkpoints)
  results = {"epochs": [], "best_top1": 0.0, "best_epoch": 0}
  start_step = 0
  if ckpt.latest_step() is not None:
    restored, metadata = ckpt.restore(_checkpoint_tree(state, rng))
    state, rng = _from_checkpoint_tree(state, restored)
    start_step, results = int(metadata["step"]), metadata["results"]
    log(f"resumed from step {start_step} (epoch {start_step / steps_per_epoch:.2f})")

  train_fn = runner.compile_train(train.train_body(run_models, objective, lr_fn))
  eval_student = runner.compile_eval(train.eval_body(student))
  state = runner.put_replicated(state)
  t_vars = runner.put_replicated(teacher_variables) if teacher is not None else None
  if teacher is not None and "teacher" not in results:
    results["teacher"] = evaluate(runner.compile_eval(train.eval_body(teacher)), t_vars, eval_pipe)
    log(f"teacher {config.teacher.model}: top-1 {results['teacher']['top1']:.2f}%, "
        f"top-5 {results['teacher']['top5']:.2f}% on {results['teacher']['count']} examples")

  writer = _summary_writer(workdir)
  uninstall_sigterm = checkpoints.install_preemption_handler()
  log(f"training {config.student.model}{' from ' + config.teacher.model if teacher else ''}: "
      f"{config.schedule.epochs} epochs x {steps_per_epoch} steps, from step {start_step}")
  try:
    step, timer, timed_steps = start_step, time.perf_counter(), 0
    batches = train_pipe.iterate(start_step)  # the data position is the step
    while step < total_steps:
      state, metrics = train_fn(state, t_vars, next(batches), rng)
      step += 1
      timed_steps += 1
      epoch_end = step % steps_per_epoch == 0
      # Asked once per step: in multi-host runs this is also the preemption sync point.
      save_step = ckpt.should_save(step)
      if step % config.logging.log_every_steps == 0 or epoch_end or save_step:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(metrics, step)
        elapsed = time.perf_counter() - timer
        rate = timed_steps / max(elapsed, 1e-9)
        eta = (total_steps - step) / rate
        terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        log(f"step {step}/{total_steps} ({rate:.2f} steps/s, ETA {eta / 60:.1f} min): {terms}")
        if writer:
          for k, v in metrics.items():
            writer.scalar(k, v, step)
        timer, timed_steps = time.perf_counter(), 0
      if epoch_end and (step // steps_per_epoch) % config.logging.eval_every_epochs == 0:
        epoch = step // steps_per_epoch
        accuracy = evaluate(eval_student, train.student_variables(state), eval_pipe)
        results["epochs"].append({"epoch": epoch, "top1": accuracy["top1"], "top5": accuracy["top5"]})
        if accuracy["top1"] > results["best_top1"]:
          results["best_top1"], results["best_epoch"] = accuracy["top1"], epoch
        log(f"epoch {epoch}: eval top-1 {accuracy['top1']:.2f}%, top-5 {accuracy['top5']:.2f}% "
            f"(best {results['best_top1']:.2f}% at epoch {results['best_epoch']})")
        if writer:
          writer.scalar("eval_accuracy", accuracy["top1"], step)
          writer.scalar("eval_top5_accuracy", accuracy["top5"], step)
      preempted = checkpoints.preemption_requested()
      if save_step or preempted or step == total_steps:
        # Only on save steps: under pmap, taking one replica of the state is a device op per leaf.
        ckpt.save(step, _checkpoint_tree(runner.get_replicated(state), rng),
                  {"step": step, "results": results}, force=preempted or step == total_steps)
      if preempted:
        log(f"SIGTERM: saved step {step} and stopping; run the same command to resume")
        break
    if step >= total_steps and results["epochs"]:
      last = results["epochs"][-1]
      results.update(last_top1=last["top1"], last_top5=last["top5"], finished=True)
      _write_json(os.path.join(workdir, "results.json"), results)
      log(f"done: last top-1 {last['top1']:.2f}%, best {results['best_top1']:.2f}% "
          f"(epoch {results['best_epoch']})")
  finally:
    uninstall_sigterm()
    ckpt.wait_until_finished()
    ckpt.close()
    if writer:
      writer.flush()
  return results


def _check_finite(metrics, step):
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(f"Non-finite loss at step {step}: {bad} (all terms: {metrics}). The last "
                             "finite checkpoint is kept; lower the learning rate or a loss weight.")


def _checkpoint_tree(state: train.TrainState, rng) -> dict:
  """What a checkpoint holds: the student's variables at the top (so it can serve as a teacher), the
  regressor's, the optimizer state, the step and the rng as raw key data."""
  tree = {"params": state.params["student"], "batch_stats": state.batch_stats["student"],
          "opt_state": state.opt_state, "step": state.step, "rng": jax.random.key_data(rng)}
  if "regressor" in state.params:
    tree["regressor"] = {"params": state.params["regressor"],
                         "batch_stats": state.batch_stats["regressor"]}
  return tree


def _from_checkpoint_tree(state: train.TrainState, tree: dict):
  params, batch_stats = {"student": tree["params"]}, {"student": tree["batch_stats"]}
  if "regressor" in tree:
    params["regressor"], batch_stats["regressor"] = tree["regressor"]["params"], tree["regressor"][
        "batch_stats"]
  state = state.replace(params=params, batch_stats=batch_stats, opt_state=tree["opt_state"],
                        step=tree["step"])
  return state, jax.random.wrap_key_data(tree["rng"])


def _load_or_train_teacher(config, teacher, sample, log):
  """The teacher's variables from its own run; trains it there first when it has no checkpoint."""
  if not config.teacher.workdir:
    raise ValueError("config.teacher.workdir must name the teacher's run directory (its checkpoints are "
                     "loaded from there).")
  template = jax.eval_shape(lambda: teacher.init(jax.random.key(0), sample, train=False))
  has_checkpoint = os.path.isdir(checkpoints.checkpoint_dir(config.teacher.workdir)) and any(
      p.name.isdigit() for p in checkpoints.checkpoint_dir(config.teacher.workdir).iterdir())
  teacher_results = os.path.join(config.teacher.workdir, "results.json")
  if not os.path.exists(teacher_results) and config.teacher.config:
    log(f"teacher {config.teacher.model} is not trained yet{' (resuming it)' if has_checkpoint else ''}: "
        f"training it first with {config.teacher.config} in {config.teacher.workdir}")
    teacher_config = load_config_file(config.teacher.config)
    if teacher_config.student.model != config.teacher.model:
      raise ValueError(f"config.teacher.config {config.teacher.config!r} trains "
                       f"{teacher_config.student.model!r}, but config.teacher.model is "
                       f"{config.teacher.model!r}.")
    train_and_evaluate(teacher_config, config.teacher.workdir)
  return checkpoints.load_teacher_variables(config.teacher.workdir, template)
