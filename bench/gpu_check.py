"""GPU check kit: one command that, on a machine with one NVIDIA GPU, checks and measures nst_jax there.

    python bench/gpu_check.py --prepare      # once, where pip can download: wheels and data into .gpu_kit/
    python3 bench/gpu_check.py               # on the GPU machine, from the repository root: ~8 minutes
    python bench/gpu_check.py --dry-run --out DIR --data DIR   # CPU, tiny sizes (tests/gpu_check_test.py)

The GPU machine is assumed to have JAX (0.11, CUDA), Flax, Optax, Orbax, absl, PyYAML, Pillow and pytest,
but no TensorFlow, TFDS or ml_collections and no network. `--prepare` therefore puts in `.gpu_kit/`
(ignored by git; name it in the device call's `carry`): `wheels/`, the pure-Python ml_collections wheel
(`pip download`), and `cifar10/train/<class>/`, the first `--per-class` JPEGs of every class of
`../shared/data/cifar10/train` (1,000 by default, ~40 MB: the whole folder, 197 MB, is over what travels).
On the GPU machine the kit installs those wheels into a temporary folder when ml_collections is missing.

Stages, each in its own process with a time limit, all output under one folder (`--out`, default `$OUT`):

* `env.txt`: versions, devices, `nvidia-smi`.
* `tests.txt`: the tests whose numbers depend on the hardware: tests/kernels_test.py and
  tests/losses_test.py (precision of the MMD fast forms where float32 products may run as TF32 / bf16
  passes), tests/train_test.py (the train step) and tests/models/conv_test.py (the convolution's GPU
  branch), without those that need 8 devices.
* `losses.txt`: bench/losses.py (the NST loss: fast forms against the definition and the broadcast form).
* `step.txt`: the train step of resnet32x4 -> resnet8x4 (KD, and KD + NST on three stages), float32 and
  bfloat16, batch 64 and 256: compile time, median step time, images/s, XLA's memory plan and the
  device's peak memory.
* `train.txt`, `results.json`: a short real training run (resnet20 on the CIFAR-10 subset, 10 epochs,
  `configs/cifar10_folder_teacher.py` with a smaller split), its images/s and top-1 accuracy.
* `summary.txt`: each stage's status and time, and the headline numbers.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu_kit"
SHARED_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train"
WHEELS = ("ml_collections==1.1.0",)
GPU_TESTS = ("tests/kernels_test.py", "tests/losses_test.py", "tests/trainer/train_test.py",
             "tests/models/conv_test.py")
# Tests that need 8 devices (or pmap over several): there is one GPU.
MULTI_DEVICE = "not eight_devices and not pmap and not divide_by_devices"


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes and time limits (seconds) of one kind of run."""

  tests: tuple[str, ...]
  test_filter: str
  losses_args: tuple[str, ...]
  teacher: str
  student: str
  step_configs: tuple[tuple[str, int, str], ...]  # (dtype, batch, comma-separated methods)
  step_steps: int
  train_model: str
  train_overrides: tuple[str, ...]
  limits: dict


GPU = Plan(
    tests=GPU_TESTS, test_filter=MULTI_DEVICE,
    losses_args=("--repeats", "20", "--broadcast-repeats", "3"),
    teacher="resnet32x4", student="resnet8x4",
    step_configs=tuple((d, b, "kd,kd+nst") for b in (64, 256) for d in ("float32", "bfloat16")),
    step_steps=20,
    train_model="resnet20",
    train_overrides=("--config.data.limit_per_class=900", "--config.data.validation_per_class=100",
                     "--config.schedule.batch_size=128", "--config.schedule.epochs=10",
                     "--config.logging.log_every_steps=35"),
    limits={"tests": 100, "losses": 45, "step": 50, "train": 110},  # step: per (dtype, batch)
)
DRY_RUN = Plan(
    tests=("tests/kernels_test.py",), test_filter="hand_computed",
    losses_args=("--batch", "2", "--repeats", "1", "--kernels", "linear", "--rows", "auto"),
    teacher="resnet8", student="resnet8",
    step_configs=(("float32", 4, "kd+nst"), ("bfloat16", 4, "ce")), step_steps=1,
    train_model="resnet8",
    train_overrides=("--config.data.limit_per_class=6", "--config.data.validation_per_class=2",
                     "--config.schedule.batch_size=8", "--config.schedule.epochs=1",
                     "--config.logging.log_every_steps=2"),
    limits={"tests": 120, "losses": 120, "step": 240, "train": 240},
)


# ---------------------------------------------------------------------------------------------------------
# Preparation (here) and the stages (there).


def prepare(per_class: int):
  """Wheels and a data subset into .gpu_kit/, for a machine without network."""
  wheels = KIT / "wheels"
  wheels.mkdir(parents=True, exist_ok=True)
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
                  str(wheels), *WHEELS], check=True)
  data = KIT / "cifar10" / "train"
  for class_dir in sorted(p for p in SHARED_DATA.iterdir() if p.is_dir()):
    target = data / class_dir.name
    target.mkdir(parents=True, exist_ok=True)
    for image in sorted(class_dir.iterdir())[:per_class]:
      shutil.copy2(image, target / image.name)
  exclude = ROOT / ".git" / "info" / "exclude"
  if exclude.parent.is_dir() and "/.gpu_kit/" not in (exclude.read_text() if exclude.exists() else ""):
    with exclude.open("a") as f:  # Local to this clone: keeps the kit out of `git status`.
      f.write("/.gpu_kit/\n")
  size = sum(f.stat().st_size for f in KIT.rglob("*") if f.is_file())
  print(f"{KIT}: {size / 2**20:.1f} MiB ({per_class} images per class, wheels: {', '.join(WHEELS)})")


def python_env(gpu: bool) -> dict:
  """Environment for the stage processes: the repository importable, the kit's wheels where needed."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  paths = [str(ROOT)]
  try:
    import ml_collections  # noqa: F401, PLC0415
  except ImportError:
    site = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    wheels = sorted(str(w) for w in (KIT / "wheels").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), *wheels], check=True)
    paths.append(str(site))
  env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  if gpu:
    env["JAX_PLATFORMS"] = "cuda"  # tests/conftest.py would otherwise pick the CPU.
  else:
    env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def run_stage(name, cmd, log: pathlib.Path, env, limit, summary, append=False):
  """Runs `cmd` with its output into `log`; records status and seconds in `summary`."""
  start = time.perf_counter()
  with log.open("a" if append else "w") as f:
    f.write(f"$ {' '.join(cmd)}\n")
    f.flush()
    try:
      proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
      status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
      status = f"stopped at its {limit} s limit"
    f.write(f"\n[{name}: {status}]\n")
  seconds = time.perf_counter() - start
  summary.append((name, status, seconds))
  print(f"{name}: {status} in {seconds:.0f} s", flush=True)
  return status == "ok"


def env_report(out: pathlib.Path, env):
  code = ("import jax, flax, optax, sys; print('python', sys.version.split()[0]); "
          "print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); "
          "print('devices', jax.devices()); d = jax.devices()[0]; "
          "print('device kind', getattr(d, 'device_kind', '?'))")
  with (out / "env.txt").open("w") as f:
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                   timeout=120)
    if shutil.which("nvidia-smi"):
      subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT, timeout=30)


def train_stage(plan, data, out, env, summary):
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
  cmd = [sys.executable, "launch.py", "--config", "configs/cifar10_folder_teacher.py", "--workdir",
         str(workdir / "run"), f"--config.data.path={data}", f"--config.data.cache_dir={workdir / 'cache'}",
         f"--config.student.model={plan.train_model}", *plan.train_overrides]
  run_stage("train", cmd, out / "train.txt", env, plan.limits["train"], summary)
  results = workdir / "run" / "results.json"
  if results.exists():
    shutil.copy2(results, out / "results.json")
  return train_numbers(out / "train.txt", results, plan)


def train_numbers(log: pathlib.Path, results: pathlib.Path, plan) -> str:
  """'images/s and top-1' from the run's log and results.json, for the summary."""
  batch = int(next(o.split("=")[1] for o in plan.train_overrides if "batch_size" in o))
  rates = [float(r) for r in re.findall(r"\(([\d.]+) steps/s", log.read_text())]
  parts = [f"{rates[-1] * batch:.0f} images/s (last logged steps/s x batch {batch})" if rates
           else "no steps/s logged"]
  if results.exists():
    res = json.loads(results.read_text())
    epochs = res.get("epochs", [])
    last = epochs[-1]["top1"] if epochs else float("nan")
    parts.append(f"top-1 last {last:.2f}% / best {res.get('best_top1', float('nan')):.2f}% "
                 f"after {len(epochs)} epochs")
  return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# The step benchmark's worker: one process per (dtype, batch), so the device's peak memory is its own.


def step_worker(args):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  sys.path.insert(0, str(ROOT / "bench"))
  import step_torch  # noqa: PLC0415 (its nst_jax half needs no PyTorch)

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  rng = np.random.default_rng(0)
  batch = jax.device_put({"image": rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32),
                          "label": rng.integers(0, step_torch.NUM_CLASSES, args.batch).astype(np.int32)})
  device = jax.devices()[0]
  for method in args.methods.split(","):
    start = time.perf_counter()
    call, compiled = step_torch.jax_step(method, args.student, args.teacher, batch, dtype=dtype)
    compile_s = time.perf_counter() - start
    for _ in range(3):
      loss = call()
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      loss = call()
      times.append(time.perf_counter() - start)
    median = statistics.median(times)
    mem = compiled.memory_analysis()
    plan_mib = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes) / 2**20 if mem is not None else float("nan")
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", float("nan")) / 2**20
    print(f"{args.dtype:<9}{args.batch:>6} {method:<8}{compile_s:>10.1f}{median * 1e3:>11.2f}"
          f"{args.batch / median:>10.0f}{plan_mib:>10.1f}{peak:>11.1f}{loss:>9.3f}", flush=True)


STEP_HEADER = (f"{'dtype':<9}{'batch':>6} {'method':<8}{'compile s':>10}{'median ms':>11}{'img/s':>10}"
               f"{'plan MiB':>10}{'peak MiB':>11}{'loss':>9}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prepare", action="store_true", help="download wheels, copy the data subset")
  parser.add_argument("--per-class", type=int, default=1000, help="--prepare: images per class")
  parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (the test suite's check)")
  parser.add_argument("--out", default=os.environ.get("OUT", ""), help="output folder (default: $OUT)")
  parser.add_argument("--data", default="", help="CIFAR-10 class folders (default: .gpu_kit's, else "
                                                 "../shared's)")
  parser.add_argument("--stages", default="env,tests,losses,step,train")
  parser.add_argument("--step-worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
  parser.add_argument("--methods", default="ce", help=argparse.SUPPRESS)
  parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
  parser.add_argument("--teacher", default="resnet32x4", help=argparse.SUPPRESS)
  parser.add_argument("--student", default="resnet8x4", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.step_worker:
    return step_worker(args)
  if args.prepare:
    return prepare(args.per_class)
  if not args.out:
    parser.error("no output folder: give --out or set $OUT")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  plan = DRY_RUN if args.dry_run else GPU
  data = args.data or next((str(p) for p in (KIT / "cifar10" / "train", SHARED_DATA) if p.is_dir()), "")
  env = python_env(gpu=not args.dry_run)
  stages, summary, headlines = args.stages.split(","), [], []
  start = time.perf_counter()
  if "env" in stages:
    env_report(out, env)
  if "tests" in stages:
    # On the GPU machine (16 cores) four pytest workers compile in parallel, sharing the GPU's memory.
    workers = [] if args.dry_run or not importlib.util.find_spec("xdist") else ["-n", "4"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *plan.tests, "-k",
           plan.test_filter]
    run_stage("tests", cmd, out / "tests.txt", dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false"),
              plan.limits["tests"], summary)
    tail = (out / "tests.txt").read_text().strip().splitlines()
    headlines.append(f"tests: {next((t for t in reversed(tail) if ' in ' in t), '?')}")
  if "losses" in stages:
    run_stage("losses", [sys.executable, "bench/losses.py", *plan.losses_args], out / "losses.txt", env,
              plan.limits["losses"], summary)
  if "step" in stages:
    (out / "step.txt").write_text(
        f"{plan.teacher} -> {plan.student}; median of {plan.step_steps} steps after 3 warm-up; plan MiB: "
        f"XLA's buffers; peak MiB: device peak so far in this (dtype, batch) process\n{STEP_HEADER}\n")
    for dtype, batch, methods in plan.step_configs:
      run_stage(f"step {dtype} {batch}", [sys.executable, "bench/gpu_check.py", "--step-worker", "--dtype",
                                          dtype, "--batch", str(batch), "--methods", methods,
                                          "--steps", str(plan.step_steps), "--teacher", plan.teacher,
                                          "--student", plan.student],
                out / "step.txt", env, plan.limits["step"], summary, append=True)
  if "train" in stages:
    if data:
      headlines.append("train: " + train_stage(plan, data, out, env, summary))
    else:
      summary.append(("train", "skipped: no CIFAR-10 folder (run --prepare, or give --data)", 0.0))
  with (out / "summary.txt").open("w") as f:
    f.write(f"gpu_check {'dry run' if args.dry_run else 'GPU run'}: {time.perf_counter() - start:.0f} s\n")
    for name, status, seconds in summary:
      f.write(f"{name:<22}{status:<40}{seconds:>7.0f} s\n")
    f.write("\n".join(headlines) + "\n")
  print((out / "summary.txt").read_text())
  return 0 if all(status == "ok" for _, status, _ in summary) else 1


if __name__ == "__main__":
  sys.exit(main())
