"""Benchmark of the full training step: compile time, step time, images/s and memory, per objective.

    python bench/step.py [--teacher resnet32x4] [--student resnet8x4] [--batch 64] [--steps 10]
                         [--method ce,kd,nst,kd+nst] [--devices 1] [--parallel jit]

The step is `train.train_step` compiled by `parallel.Runner` (default: "jit" over a 1-D mesh of the first
`--devices` devices), on random CIFAR-sized data (32x32x3 images, 100 classes, float32), with the
RepDistiller protocol's optimizer (SGD, momentum 0.9, weight decay 5e-4, step schedule from lr 0.05).
The teacher's variables come from `jax.jit(teacher.init)` (random weights: timing only). Methods
(several may be given, comma-separated, and are compared by ratio to `kd`):

* ce:     the student alone (1.0 CE); no teacher in the program.
* kd:     0.9 KD (T = 4) + 0.1 CE, the teacher traced in the same step.
* nst:    1.0 CE + 50 NST (polynomial, degree 2, c = 0) over stage1, stage2 and stage3 of both models
          (RepDistiller's NST row).
* kd+nst: 0.1 CE + 0.9 KD + 50 NST.

Columns: "compile s" is tracing, lowering and XLA compilation of the step (`.lower(...).compile()` of
the program `Runner.compile_train` returns, which the training loop runs; its first call then loads it
from a persistent compilation cache in a temporary directory, "1st call s"); "median ms" / "min ms" are
over `--steps` calls after `--warmup` calls, each timed to `jax.block_until_ready` of the new state and
the metrics, with the batch already on the devices in the mode's layout; "img/s" is the global batch
over the median. Memory is XLA's
`memory_analysis()` of the compiled step, per device: "temp MiB" the temporaries, "XLA MiB" arguments +
outputs - aliased (donated state) + temporaries, i.e. every buffer the program's allocation plan holds
at once, an upper bound on its live memory (XLA:CPU has no allocator statistics). On a GPU, "dev peak
MiB" is `memory_stats()["peak_bytes_in_use"]` of the first device: the process's peak so far, so
monotone down the table. Figures from a shared 2-core machine are noisy: compare rows of one run.
"""

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nst_jax import models, objective  # noqa: E402
from nst_jax.trainer import parallel, train

NUM_CLASSES = 100
NST_LAYERS = (("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3"))
NST = dict(nst_weight=50.0, nst_layers=NST_LAYERS, nst_kernel="polynomial",
           nst_params={"degree": 2, "c": 0.0})
OBJECTIVES = {
    "ce": objective.Objective(ce_weight=1.0),
    "kd": objective.Objective(ce_weight=0.1, kd_weight=0.9, temperature=4.0),
    "nst": objective.Objective(ce_weight=1.0, **NST),
    "kd+nst": objective.Objective(ce_weight=0.1, kd_weight=0.9, temperature=4.0, **NST),
}
MIB = 2.0**20


def build(method, args, runner, sample):
  """(the step program the training loop uses, state, teacher variables) for one method."""
  obj = OBJECTIVES[method]
  axis = runner.axis_name
  student = models.get_model(args.student, num_classes=NUM_CLASSES, axis_name=axis)
  teacher = None
  if obj.needs_teacher:
    teacher = models.get_model(args.teacher, num_classes=NUM_CLASSES, axis_name=axis)
  mdl = train.Models(student=student, teacher=teacher)
  if teacher is not None:
    _, t_feats = jax.eval_shape(functools.partial(teacher.init_with_output, train=False), jax.random.key(1),
                                sample)[0]
    _, s_feats = jax.eval_shape(functools.partial(student.init_with_output, train=False), jax.random.key(0),
                                sample)[0]
    obj.check_taps(list(s_feats), list(t_feats))
    t_vars = jax.jit(functools.partial(teacher.init, train=False))(jax.random.key(1), sample)
  else:
    obj.check_taps([], None)
    t_vars = {}
  lr = train.step_schedule(0.05, steps_per_epoch=50_000 // args.batch, decay_epochs=(150, 180, 210),
                           decay_factor=0.1)
  tx = train.make_optimizer(lr, momentum=0.9, nesterov=False, weight_decay=5e-4)
  state = jax.jit(lambda key: train.create_train_state(student, tx, sample, key))(jax.random.key(0))
  return runner.compile_train(train.train_body(mdl, obj, lr)), runner.put_replicated(state), \
      runner.put_replicated(t_vars)


def prepare(method, args, runner, batch, sample):
  """Builds and compiles one method's step, runs its first call and warm-up; returns its row."""
  step, state, t_vars = build(method, args, runner, sample)
  start = time.perf_counter()
  compiled = step.lower(state, t_vars, batch).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  del compiled
  start = time.perf_counter()
  state, metrics = jax.block_until_ready(step(state, t_vars, batch))
  first_s = time.perf_counter() - start
  for _ in range(args.warmup):
    state, metrics = jax.block_until_ready(step(state, t_vars, batch))
  row = {"method": method, "compile_s": compile_s, "first_s": first_s, "times": [],
         "run": (step, t_vars), "state": state, "metrics": metrics}
  if mem is not None:
    row["temp"] = mem.temp_size_in_bytes
    row["xla"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.temp_size_in_bytes)
  stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    row["dev_peak"] = stats["peak_bytes_in_use"]
  return row


def time_step(row, batch):
  """One timed step of a prepared method (state donated and replaced)."""
  step, t_vars = row["run"]
  start = time.perf_counter()
  row["state"], row["metrics"] = jax.block_until_ready(step(row["state"], t_vars, batch))
  row["times"].append(time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teacher", default="resnet32x4")
  parser.add_argument("--student", default="resnet8x4")
  parser.add_argument("--batch", type=int, default=64, help="global batch")
  parser.add_argument("--method", default="ce,kd,nst,kd+nst",
                      help=f"comma-separated, of: {', '.join(OBJECTIVES)}")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call")
  parser.add_argument("--devices", type=int, default=1,
                      help="devices of the data mesh (fake CPU devices: XLA_FLAGS="
                           "--xla_force_host_platform_device_count=N)")
  parser.add_argument("--parallel", default="jit", choices=parallel.MODES)
  args = parser.parse_args()
  methods = args.method.split(",")
  unknown = [m for m in methods if m not in OBJECTIVES]
  if unknown:
    parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(OBJECTIVES)}")
  if args.devices > len(jax.devices()):
    parser.error(f"--devices {args.devices}, but only {len(jax.devices())} {jax.default_backend()} devices "
                 f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={args.devices})")
  parallel.check_global_batch(args.batch, args.devices)

  # The Runner's own first call loads the program `.lower().compile()` just built from this cache.
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="bench_step_cache_"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

  runner = parallel.Runner(args.parallel, parallel.make_mesh(jax.devices()[:args.devices]))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, NUM_CLASSES, size=args.batch).astype(np.int32)}
  batch = runner.put_batch(batch)  # On the devices in the mode's layout, as the loop's batches are.
  sample = jnp.zeros((2, 32, 32, 3), jnp.float32)
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.platform} ({getattr(device, 'device_kind', '')}, {os.cpu_count()} "
        f"CPUs); {args.teacher} -> {args.student}, batch {args.batch} (32x32x3, {NUM_CLASSES} classes), "
        f"float32; parallel={args.parallel} over {args.devices} device(s); median of {args.steps} steps "
        f"after {args.warmup} + 1 warm-up, in interleaved rounds\n", flush=True)
  rows = []
  for method in methods:
    rows.append(prepare(method, args, runner, batch, sample))
    print(f"  {method}: compiled in {rows[-1]['compile_s']:.1f} s", file=sys.stderr, flush=True)
  for i in range(args.steps):  # Interleaved rounds, each starting at the next method.
    for j in range(len(rows)):
      time_step(rows[(i + j) % len(rows)], batch)
  for row in rows:
    row["median_s"], row["min_s"] = statistics.median(row["times"]), min(row["times"])
    row["loss"] = runner.metrics_to_host(row["metrics"])["train_loss"]
  print_table(rows, args.batch, gpu=device.platform != "cpu")


def print_table(rows, batch, gpu):
  header = (f"{'method':<8}{'compile s':>10}{'1st call s':>11}{'median ms':>10}{'min ms':>9}{'img/s':>8}"
            f"{'vs kd':>7}{'temp MiB':>10}{'XLA MiB':>9}" + (f"{'dev peak MiB':>14}" if gpu else "")
            + f"{'loss':>9}")
  print(header)
  print("-" * len(header))
  kd_row = next((r for r in rows if r["method"] == "kd"), None)
  kd, kd_times = (kd_row["median_s"], kd_row["times"]) if kd_row else (None, None)
  for row in rows:
    ratio = f"{row['median_s'] / kd:>7.3f}" if kd else f"{'':>7}"
    mem = f"{row['temp'] / MIB:>10.1f}{row['xla'] / MIB:>9.1f}" if "temp" in row else f"{'n/a':>10}{'n/a':>9}"
    peak = (f"{row['dev_peak'] / MIB:>14.1f}" if "dev_peak" in row else f"{'n/a':>14}") if gpu else ""
    print(f"{row['method']:<8}{row['compile_s']:>10.1f}{row['first_s']:>11.2f}{row['median_s'] * 1e3:>10.1f}"
          f"{row['min_s'] * 1e3:>9.1f}{batch / row['median_s']:>8.1f}{ratio}{mem}{peak}{row['loss']:>9.3f}")
  if kd is None:
    return
  print()
  for row in rows:
    if row["method"] in ("nst", "kd+nst"):
      ratio = row["median_s"] / kd
      paired = statistics.median(t / k for t, k in zip(row["times"], kd_times, strict=True))
      print(f"{row['method']} / kd = {ratio:.3f} ({(row['median_s'] - kd) * 1e3:+.1f} ms per step; median "
            f"of the per-round ratios {paired:.3f}); target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'}")


if __name__ == "__main__":
  main()
