r"""The experiment runner: every (method, seed) of a config as its own run, then the tables and curves.

    python -m nst_jax.tools.sweep --config configs/X.py --methods m1,m2 --seeds 0,1,2 --root workdirs/X \
      [--jobs N] [--teacher_workdir DIR] [--config.KEY=VALUE ...]
    python -m nst_jax.tools.sweep --report --root workdirs/X [--export results/X]

Runs. Method m with seed k runs in `<root>/<m>/seed<k>` as the command
`python -m nst_jax --config configs/X.py:m --workdir <root>/<m>/seed<k> --config.seed=k [overrides]`
(a config without `METHODS` takes no `:m`; its one method is named after the file). Runs go seed by
seed (every method with seed 0, then seed 1, ...), so a sweep stopped early still compares every method.
All runs that distil share one teacher run, `<root>/teacher` (`--config.teacher.workdir`): the first of
them trains it as its own stage, and while it does no other distillation run starts, so the teacher is
trained once even with `--jobs N`. `--teacher_workdir DIR` uses a finished teacher run that exists
elsewhere instead (it must have finished and train the configs' teacher model; it is only read). A
finished run (its `results.json` says `"finished": true`) is skipped; any other is started with the same
command, which resumes it from its last checkpoint. So after a crash, a preemption or Ctrl-C, the same
sweep command carries on where it stopped. A run that fails stops the sweep (the runs already going
finish first) with the run's log named. One mechanism keeps two processes out of one folder: the run
lock of `trainer.rundir` (`<workdir>/.lock`), which every run takes itself and the sweep takes on its
root, so a second sweep of the root, or a run still going from a killed sweep, makes a new sweep refuse
to start (one line naming the holder's pid and host). With `--jobs N > 1` each run's console goes to
`<workdir>/console.txt` and XLA_PYTHON_CLIENT_PREALLOCATE=false lets the runs share a device.

ETA: the mean wall time of the finished runs' own stages times the runs left, plus the teacher stage
while the shared teacher has not finished: its steps left over its measured step rate (from its
log.txt once it trains), or before that the teacher config's epochs times the steps per epoch at the
step rate measured by a finished run (a different model: an estimate, said so).

Protocol of the tables (`<root>/results.csv` and `<root>/results.md`, one row per method, and one for
the teacher's own run): top-1 / top-5 accuracy (%) on the config's evaluation split; "last" is the
final epoch's evaluation, "best" the best epoch's (chosen on that same split, so it is optimistic:
RepDistiller reports last, mdistiller best). Each is the mean over the finished runs and the sample
standard deviation (n - 1 in the denominator; empty for n = 1) over their seeds. `n` counts finished
runs; the Markdown says "n of N" when fewer than the N seeds swept have finished. `teacher_top1` is the
teacher's accuracy on the same split, measured by the distillation runs; `reference` and `source` are
the published top-1 accuracy the config quotes for that method (its module-level `REFERENCE`), if any.

Reading (`nst_jax/tools/analysis.py`): `<root>/comparisons.{csv,md}`, each method against `ce` and against the
methods it extends by one term (`kd_nst` vs `kd` and `nst`), with Welch's t-test on the last top-1 over
seeds; `<root>/claims.{csv,md}`, when the config states `CLAIMS` ((method, against, claim) triples, e.g.
the paper's "KD + NST beats KD + FitNet"), each claim's difference in the paper and here, with a verdict;
`<root>/terms.{csv,md}`, each weighted loss term's value in the first and last epoch and its share
of the total loss. `--report --export DIR` copies tables, curves and the runs' results.json / run.json /
config.json (absolute paths made relative to the repository; no checkpoints) to a folder to commit.

Curves: `<root>/curves.png` (evaluation top-1 against epoch, mean over seeds with the min-max band, the
teacher as a horizontal line) and `<root>/<m>/seed<k>/curves.png` per run (train loss terms and
accuracies). `--report` rebuilds tables and curves from what exists, reading the config path and the
methods from `<root>/sweep.json`, which every sweep command writes.
"""

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from nst_jax.tools import analysis, curves
from nst_jax.trainer import config_lib, rundir

RUN_COMMAND = (sys.executable, "-m", "nst_jax")
SWEEP_FILE, CURVES_FILE = "sweep.json", "curves.png"
TEACHER = "teacher"
COLUMNS = ("method", "n", "last_top1_mean", "last_top1_std", "best_top1_mean", "best_top1_std",
           "last_top5_mean", "last_top5_std", "best_top5_mean", "best_top5_std", "teacher_top1", "reference",
           "source", "n_planned", "seeds")
METRICS = ("last_top1", "best_top1", "last_top5", "best_top5")


class SweepError(ValueError):
  """Bad input or a state the sweep cannot go on from: one line that names the problem and the choices."""


@dataclasses.dataclass(frozen=True)
class Run:
  method: str
  seed: int
  workdir: str
  distils: bool  # Whether the run reads the shared teacher.


# Config modules: methods and published references.


def load_config_module(path: str):
  """The config file `path` as a module (for its METHODS and REFERENCE, beside `get_config`)."""
  if ":" in path:
    raise SweepError(f"--config {path!r}: give the config file alone and the methods with --methods.")
  try:
    return config_lib.load_config_module(path)
  except config_lib.ConfigError as error:
    raise SweepError(str(error)) from None


def config_methods(module) -> tuple[str, ...]:
  """The config's `METHODS`; a config without them has one method, named after its file."""
  return tuple(getattr(module, "METHODS", ())) or (pathlib.Path(module.__file__).stem,)


def references(module) -> dict[str, tuple[float, str]]:
  """method (or "teacher") -> (published top-1 accuracy in %, its source), from the config's REFERENCE.

  REFERENCE is a dict keyed by method in configs with METHODS, a single (value, source) pair otherwise.
  """
  reference = getattr(module, "REFERENCE", None)
  if reference is None:
    return {}
  if isinstance(reference, tuple):
    return {config_methods(module)[0]: reference}
  return dict(reference)


def method_config(module, method: str):
  """The config of one method (a config without METHODS has only its own)."""
  return module.get_config(method) if hasattr(module, "METHODS") else module.get_config()


# Command-line input.


def parse_methods(text: str | None, valid: tuple[str, ...]) -> list[str]:
  if text is None:
    if len(valid) == 1:
      return list(valid)
    raise SweepError(f"--methods is required for this config. Valid methods: {', '.join(valid)}.")
  methods = [m.strip() for m in text.split(",") if m.strip()]
  unknown = [m for m in methods if m not in valid]
  if unknown or not methods:
    raise SweepError(f"Unknown method(s) {', '.join(unknown) or repr(text)}. "
                     f"Valid methods: {', '.join(valid)}.")
  if len(set(methods)) != len(methods):
    raise SweepError(f"--methods lists a method twice: {text!r}.")
  return methods


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise SweepError(f"--seeds must be comma-separated integers >= 0, e.g. 0,1,2; got {text!r}.") from None
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise SweepError(f"--seeds must be distinct integers >= 0, e.g. 0,1,2; got {text!r}.")
  return seeds


def check_overrides(overrides: list[str], config) -> None:
  """`--config.KEY=VALUE` with KEY in the config and VALUE of its type (`config_lib`'s parser)."""
  try:
    texts = config_lib.override_texts(overrides, usage="The sweep takes --config, --methods, --seeds, "
                                      "--root, --jobs, --report and config overrides.")
  except config_lib.ConfigError as error:
    raise SweepError(str(error)) from None
  if "seed" in texts:
    raise SweepError("--config.seed is what --seeds sets for each run; give the seeds with --seeds.")
  if "teacher.workdir" in texts:
    raise SweepError("--config.teacher.workdir is set by the sweep: its runs share <root>/teacher. To "
                     "use a finished teacher run from elsewhere, give --teacher_workdir DIR.")
  try:
    config_lib.apply_text_overrides(config, texts)
  except config_lib.ConfigError as error:
    raise SweepError(str(error)) from None


# The plan and its runs.


def run_dir(root: str, method: str, seed: int) -> str:
  return os.path.join(root, method, f"seed{seed}")


def teacher_dir(spec: dict) -> str:
  """The shared teacher run: `--teacher_workdir` where given, else `<root>/teacher`."""
  return spec.get("teacher_workdir") or os.path.join(spec["root"], TEACHER)


def check_teacher_workdir(path: str, module, methods: list[str]) -> str:
  """`--teacher_workdir` made absolute, after checking that it is a finished run of the configs' teacher."""
  path = os.path.abspath(path)
  if read_results(path) is None:
    raise SweepError(f"--teacher_workdir {path} is not a finished run (no {rundir.RESULTS} marked finished); "
                     "give the workdir of a teacher run that finished, or leave the flag out to train one.")
  trained = ((rundir.read_config(path).get("student") or {}).get("model"))
  wanted = {method_config(module, m).teacher.model for m in methods} - {""}
  if trained is not None and wanted and trained not in wanted:
    raise SweepError(f"--teacher_workdir {path} trained {trained!r}, but the config's teacher model is "
                     f"{', '.join(sorted(wanted))}.")
  return path


def plan(spec: dict, module) -> list[Run]:
  """The runs of the sweep, seed by seed, with whether each one distils from the shared teacher."""
  distils = {m: bool(method_config(module, m).teacher.model) for m in spec["methods"]}
  return [Run(m, k, run_dir(spec["root"], m, k), distils[m]) for k in spec["seeds"] for m in spec["methods"]]


def run_command(spec: dict, run: Run, module) -> list[str]:
  config = spec["config"] + (f":{run.method}" if hasattr(module, "METHODS") else "")
  command = [*RUN_COMMAND, "--config", config, "--workdir", run.workdir, f"--config.seed={run.seed}"]
  if run.distils:
    # Absolute: a relative teacher.workdir would be read against the student's workdir's folder.
    command.append(f"--config.teacher.workdir={os.path.abspath(teacher_dir(spec))}")
  return command + list(spec["overrides"])


read_results = rundir.read_results


def _student_seconds(workdir: str) -> float | None:
  """Wall time of a run's own (student) stage from its run.json: the ETA's unit, teacher stage excluded."""
  try:
    stages = (rundir.read_json(os.path.join(workdir, rundir.RUN)) or {}).get("stages", [])
    return next(float(s["wall_s"]) for s in stages if s.get("name") == "student")
  except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
    return None


def _log_figures(workdir: str) -> dict:
  """From a run's log.txt: its steps per epoch, and the last logged step, total and steps/s ({} if none)."""
  try:
    text = pathlib.Path(workdir, "log.txt").read_text()
  except OSError:
    return {}
  found = {}
  if per_epoch := re.findall(r"^data: .*?, (\d+) steps per epoch", text, re.M):
    found["steps_per_epoch"] = int(per_epoch[-1])
  if steps := re.findall(r"^step (\d+)/(\d+) \(([\d.]+) steps/s", text, re.M):
    step, total, rate = steps[-1]
    found.update(step=int(step), total=int(total), rate=float(rate))
  return found


def _busy(workdir: str) -> None:
  """SweepError when a process (a run from an earlier sweep, say) holds `workdir`'s run lock."""
  holder = rundir.is_locked(workdir)
  if holder is not None:
    raise SweepError(f"The run in {workdir} is still running ({holder}), started by an earlier sweep or by "
                     "hand; wait for it to end or stop it, then rerun.")


class _Runner:
  """Starts the planned runs, up to `jobs` at once, and reports progress."""

  def __init__(self, spec: dict, module, runs: list[Run], jobs: int):
    self.spec, self.module, self.jobs = spec, module, jobs
    self.runs = runs
    self.todo = [r for r in runs if read_results(r.workdir) is None]
    for run in self.todo:  # Before anything starts: a run left going by a killed sweep blocks the sweep.
      _busy(run.workdir)
    done = [r for r in runs if r not in self.todo]
    self.seconds = [s for s in map(_student_seconds, (r.workdir for r in done)) if s is not None]
    self.rates = [f for f in map(_log_figures, (r.workdir for r in done)) if "rate" in f]
    self.running: dict = {}  # Popen -> (run, start time)
    self.stop_signal = None
    self.failed = None
    for r in done:
      self._say(r, "finished before: skipped")

  def _say(self, run: Run, what: str):
    print(f"sweep: run {self.runs.index(run) + 1} of {len(self.runs)}, {run.method} seed {run.seed} "
          f"({run.workdir}): {what}", flush=True)

  def _teacher_left(self) -> tuple[float | None, str]:
    """Seconds the shared teacher stage still needs (0 when none is to train, None when not yet known)
    and how they were found."""
    waiting = [r for r in self.todo + [r for r, _ in self.running.values()] if r.distils]
    if not waiting or read_results(teacher_dir(self.spec)) is not None:
      return 0.0, ""
    own = _log_figures(teacher_dir(self.spec))
    if own.get("rate"):  # The teacher trains (or trained and stopped): its own measured rate.
      return (own["total"] - own["step"]) / own["rate"], "its own step rate"
    config = method_config(self.module, waiting[0].method)
    measured = next((f for f in self.rates if "steps_per_epoch" in f), None)
    if not config.teacher.config or measured is None:
      return None, ""
    try:
      teacher = config_lib.load_config_file(config.teacher.config)
    except config_lib.ConfigError:
      return None, ""
    steps = (teacher.schedule.epochs * measured["steps_per_epoch"] * config.schedule.batch_size
             / teacher.schedule.batch_size)
    return steps / measured["rate"], f"{teacher.schedule.epochs} epochs at a student's step rate"

  def _eta(self) -> str:
    teacher, how = self._teacher_left()
    if not self.seconds or teacher is None:
      return "ETA after the first finished run" + (" and the teacher's first steps" * (teacher is None))
    left = len(self.todo) + len(self.running)
    mean = float(np.mean(self.seconds))
    total = math.ceil(left / self.jobs) * mean + teacher
    with_teacher = f", the teacher stage {teacher / 60:.1f} min more ({how})" if teacher else ""
    return f"ETA {total / 60:.1f} min (runs take {mean / 60:.1f} min{with_teacher})"

  def _startable(self, run: Run) -> bool:
    if not run.distils or read_results(teacher_dir(self.spec)) is not None:
      return True
    return not any(r.distils for r, _ in self.running.values())  # Only one run trains the teacher.

  def _start(self, run: Run):
    _busy(run.workdir)  # The run takes the lock itself; a process that got there first makes it stop.
    os.makedirs(run.workdir, exist_ok=True)
    env = dict(os.environ)
    out = None
    if self.jobs > 1:
      # Several runs on one accelerator: let each take memory as it needs it rather than 75% up front.
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
      out = open(os.path.join(run.workdir, "console.txt"), "a")  # noqa: SIM115 -- closed with the run.
    proc = subprocess.Popen(run_command(self.spec, run, self.module), env=env, stdout=out,
                            stderr=subprocess.STDOUT if out else None)
    if out:
      out.close()
    self.running[proc] = (run, time.monotonic())
    self._say(run, f"started; {self._eta()}")

  def _reap(self) -> None:
    for proc in [p for p in self.running if p.poll() is not None]:
      run, started = self.running.pop(proc)
      if proc.returncode == 0 and read_results(run.workdir) is not None:
        self.seconds.append(_student_seconds(run.workdir) or time.monotonic() - started)
        if "rate" in (figures := _log_figures(run.workdir)):
          self.rates.append(figures)
        self._say(run, f"finished; {len(self.todo) + len(self.running)} left, {self._eta()}")
      elif self.stop_signal is None and self.failed is None:
        self.failed = (run, proc.returncode)

  def _on_signal(self, signum, _frame):
    self.stop_signal = signum
    for proc in self.running:
      with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)  # The runs save a checkpoint and exit.

  def execute(self) -> None:
    previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      while self.todo or self.running:
        while (len(self.running) < self.jobs and self.stop_signal is None and self.failed is None):
          run = next((r for r in self.todo if self._startable(r)), None)
          if run is None:
            break
          self.todo.remove(run)
          self._start(run)
        if not self.running:
          break
        time.sleep(0.5)
        self._reap()
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


# Tables and curves.


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (n - 1); (None, None) for no values, std None for one."""
  if not values:
    return None, None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None  # sample std: undefined for one run
  return float(np.mean(values)), std


def method_row(method: str, finished: dict[int, dict], planned: int, reference) -> dict:
  """One table row from the finished runs' results (seed -> results.json) of `method`."""
  row = {"method": method, "n": len(finished), "n_planned": planned,
         "seeds": " ".join(str(k) for k in sorted(finished) if k is not None)}
  for metric in METRICS:
    values = [_metric(r, metric) for r in finished.values()]
    row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([v for v in values if v is not None])
  teachers = [r["teacher"]["top1"] for r in finished.values() if isinstance(r.get("teacher"), dict)]
  row["teacher_top1"] = float(np.mean(teachers)) if teachers else None
  row["reference"], row["source"] = reference if reference else (None, "")
  return row


def _metric(results: dict, metric: str) -> float | None:
  if metric in results:
    return float(results[metric])
  # Older results.json had no best_top5: it is the best top-5 over the evaluated epochs.
  epochs = results.get("epochs") or []
  return max(float(e["top5"]) for e in epochs) if metric == "best_top5" and epochs else None


def collect(spec: dict) -> dict[str, dict[int, dict]]:
  """method -> {seed: results} of every finished run under the root (seed<k> folders that exist)."""
  found = {}
  for method in spec["methods"]:
    folders = pathlib.Path(spec["root"], method).glob("seed*")
    seeds = sorted(int(p.name[4:]) for p in folders if p.name[4:].isdigit())
    found[method] = {k: r for k in seeds if (r := read_results(run_dir(spec["root"], method, k)))}
  return found


def _seed_of(workdir: str) -> int | None:
  """The seed a run was trained with, from its config.json (the teacher's is its own config's)."""
  try:
    return int(rundir.read_config(workdir)["seed"])
  except (KeyError, ValueError, TypeError):
    return None


def _fmt(value, digits=2) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def _csv_cell(value) -> str:
  if value is None:
    return ""
  return f"{value:.6f}" if isinstance(value, float) else str(value)


def write_tables(root: str, rows: list[dict], title: str) -> None:
  """`<root>/results.csv` (every column) and `<root>/results.md` (mean ± std cells, for reading)."""
  _write_csv(os.path.join(root, "results.csv"), [{k: row[k] for k in COLUMNS} for row in rows], COLUMNS)
  lines = [f"# {title}", "",
           "Top-1 / top-5 accuracy (%) on the evaluation split: mean ± sample std (n - 1) over seeds; last = "
           "final epoch, best = best epoch on the same split; n = finished runs.", "",
           "| method | n | last top-1 | best top-1 | last top-5 | best top-5 | teacher top-1 | reference "
           "| source |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for row in rows:
    n = str(row["n"]) if row["n"] >= row["n_planned"] else f"{row['n']} of {row['n_planned']}"
    cells = [_pm(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
    lines.append(f"| {row['method']} | {n} | {' | '.join(cells)} | {_fmt(row['teacher_top1'])} | "
                 f"{_fmt(row['reference'])} | {row['source']} |")
  rundir.write_text(os.path.join(root, "results.md"), "\n".join(lines) + "\n")


def _pm(mean, std) -> str:
  if mean is None:
    return ""
  return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def report(root: str) -> list[dict]:
  """Writes results.csv, results.md, curves.png and each finished run's curves.png; returns the rows."""
  spec = read_spec(root)
  refs, claims = {}, ()
  try:
    module = load_config_module(spec["config"])
    refs, claims = references(module), tuple(getattr(module, "CLAIMS", ()))
  except Exception as error:  # noqa: BLE001 -- the tables do not need the references to be useful.
    print(f"sweep: no references ({spec['config']} does not load here: {error})", file=sys.stderr)
  found = collect(spec)
  rows = [method_row(m, found[m], len(spec["seeds"]), refs.get(m)) for m in spec["methods"]]
  teacher = read_results(teacher_dir(spec))
  if teacher is not None:
    rows.append(method_row(TEACHER, {_seed_of(teacher_dir(spec)): teacher}, 1, refs.get(TEACHER)))
  name = pathlib.Path(spec["config"]).stem
  write_tables(root, rows, f"{name}: {len(spec['methods'])} method(s) x {len(spec['seeds'])} seed(s)")
  write_analysis(root, spec, found, name, claims, refs)
  teacher_top1 = next((r["teacher_top1"] for r in rows if r["teacher_top1"] is not None), None)
  histories = {m: [r["epochs"] for r in found[m].values() if r.get("epochs")] for m in spec["methods"]}
  curves.save(curves.sweep_figure(histories, teacher_top1, f"{name}: evaluation top-1 by epoch"),
              os.path.join(root, CURVES_FILE))
  for method, runs in found.items():
    for seed, results in runs.items():
      _run_curves(run_dir(root, method, seed), results, f"{name}:{method}, seed {seed}")
  if teacher is not None:
    _run_curves(teacher_dir(spec), teacher, f"{name}: teacher")
  return rows


def _write_csv(path: str, rows: list[dict], columns: Sequence[str] | None = None) -> None:
  """A CSV of `rows` (columns: `columns`, else the first row's keys; no rows and no columns: empty)."""
  text = io.StringIO()
  columns = list(columns or (rows[0] if rows else ()))
  if columns:
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
  rundir.write_text(path, text.getvalue())


def write_analysis(root: str, spec: dict, found: dict[str, dict[int, dict]], name: str, claims=(),
                   refs: dict | None = None) -> None:
  """`comparisons.{csv,md}` (Welch tests between methods), `claims.{csv,md}` (the config's `CLAIMS`, when
  it states any, against the paper's differences) and `terms.{csv,md}` (loss-term shares)."""
  pairs = analysis.comparisons(found, spec["methods"])
  _write_csv(os.path.join(root, "comparisons.csv"), pairs)
  rundir.write_text(os.path.join(root, "comparisons.md"), analysis.comparisons_markdown(pairs, name))
  swept = [c for c in claims if c[0] in spec["methods"] and c[1] in spec["methods"]]
  if swept:
    rows = analysis.claim_rows(found, swept, refs or {})
    _write_csv(os.path.join(root, "claims.csv"), rows)
    rundir.write_text(os.path.join(root, "claims.md"), analysis.claims_markdown(rows, name))
  configs = {m: {k: rundir.read_config(run_dir(root, m, k)) for k in runs} for m, runs in found.items()}
  terms = analysis.term_rows(found, configs)
  _write_csv(os.path.join(root, "terms.csv"), terms)
  rundir.write_text(os.path.join(root, "terms.md"), analysis.terms_markdown(terms, name))


def export(root: str, dest: str) -> list[str]:
  """The report's files and every finished run's summaries, copied to `dest` (see `analysis.export`)."""
  spec = read_spec(root)
  runs = [os.path.relpath(run_dir(root, m, k), root) for m, found in collect(spec).items() for k in found]
  if not spec.get("teacher_workdir") and read_results(teacher_dir(spec)) is not None:
    runs.append(TEACHER)  # A teacher run from elsewhere (--teacher_workdir) is not the root's to export.
  return analysis.export(root, dest, runs)


def _run_curves(workdir: str, results: dict, title: str):
  png, source = os.path.join(workdir, CURVES_FILE), os.path.join(workdir, rundir.RESULTS)
  if not os.path.exists(png) or os.path.getmtime(png) < os.path.getmtime(source):
    curves.save(curves.run_figure(results, title), png)


# sweep.json: what was swept, so that --report and a rerun know.


def read_spec(root: str) -> dict:
  path = os.path.join(root, SWEEP_FILE)
  if not os.path.exists(path):
    raise SweepError(f"{path} does not exist: {root!r} is not a sweep root (run the sweep there first).")
  with open(path) as f:
    return {**json.load(f), "root": root}


def update_spec(root: str, config: str, methods: list[str], seeds: list[int], overrides: list[str],
                teacher_workdir: str | None = None) -> dict:
  """sweep.json with this command's methods and seeds added (a later command may add more). The config,
  overrides and teacher run must not change: the runs already there would mean something else than the
  new ones."""
  spec = {"config": config, "methods": [], "seeds": [], "overrides": overrides}
  if teacher_workdir:
    spec["teacher_workdir"] = teacher_workdir
  if os.path.exists(os.path.join(root, SWEEP_FILE)):
    spec = read_spec(root)
    if spec["config"] != config or spec["overrides"] != overrides:
      raise SweepError(f"{root} holds a sweep of {spec['config']} with overrides {spec['overrides']}; this "
                       f"command gives {config} with {overrides}. Use another --root, or the same config and "
                       "overrides.")
    if spec.get("teacher_workdir") != teacher_workdir:
      raise SweepError(f"{root} holds a sweep whose teacher is {teacher_dir(spec)}; this command gives "
                       f"{teacher_workdir or os.path.join(root, TEACHER)}. Use another --root, or the same "
                       "--teacher_workdir.")
  spec["methods"] += [m for m in methods if m not in spec["methods"]]
  spec["seeds"] += [k for k in seeds if k not in spec["seeds"]]
  os.makedirs(root, exist_ok=True)
  rundir.write_json(os.path.join(root, SWEEP_FILE), {k: v for k, v in spec.items() if k != "root"})
  return {**spec, "root": root}


# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m nst_jax.tools.sweep", description=__doc__.split("\n\n")[0],
      epilog="Config overrides written --config.KEY=VALUE go to every run (the seed comes from --seeds).",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help="the config file, without :METHOD (e.g. configs/digits_kd_nst.py)")
  parser.add_argument("--methods", help="comma-separated methods of the config, e.g. kd_nst,ce")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds (default 0,1,2)")
  parser.add_argument("--root", required=True, help="the sweep's folder, e.g. workdirs/digits_sweep")
  parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
  parser.add_argument("--teacher_workdir", metavar="DIR",
                      help="a finished teacher run to distil from, instead of training <root>/teacher")
  parser.add_argument("--report", action="store_true", help="only rebuild tables and curves from the root")
  parser.add_argument("--export", metavar="DIR",
                      help="with --report: copy tables, curves and runs' summaries (no checkpoints) to DIR")
  return parser


def sweep(config: str, methods: str | None, seeds: str, root: str, jobs: int, overrides: list[str],
          teacher_workdir: str | None = None) -> int:
  """Runs the sweep and writes its report; returns the exit status (0 when every run finished)."""
  if jobs < 1:
    raise SweepError(f"--jobs must be an integer >= 1, got {jobs}.")
  module = load_config_module(config)
  chosen, chosen_seeds = parse_methods(methods, config_methods(module)), parse_seeds(seeds)
  check_overrides(overrides, method_config(module, chosen[0]))
  if teacher_workdir:
    teacher_workdir = check_teacher_workdir(teacher_workdir, module, chosen)
  try:
    lock = rundir.lock(root, what="sweep")
  except rundir.WorkdirBusy as error:
    raise SweepError(str(error)) from None
  except OSError as error:
    raise SweepError(rundir.os_error_line(error, {"the sweep's root, --root": root})) from None
  try:
    spec = update_spec(root, config, chosen, chosen_seeds, overrides, teacher_workdir)
    runs = plan({**spec, "methods": chosen, "seeds": chosen_seeds}, module)
    runner = _Runner(spec, module, runs, jobs)
    started = time.monotonic()
    runner.execute()
    report(root)
  finally:
    lock.release()
  print(f"sweep: {len(runs)} runs in {(time.monotonic() - started) / 60:.1f} min; wrote results.csv, "
        f"results.md and curves.png in {root}", flush=True)
  print(pathlib.Path(root, "results.md").read_text(), flush=True)
  if runner.stop_signal is not None:
    name = signal.Signals(runner.stop_signal).name
    print(f"sweep: stopped by {name}; run the same command to resume.", file=sys.stderr, flush=True)
    return 128 + runner.stop_signal
  if runner.failed is not None:
    run, code = runner.failed
    print(f"sweep: {run.method} seed {run.seed} failed (exit status {code}); see "
          f"{os.path.join(run.workdir, 'log.txt')}. Fix it and run the same command to resume.",
          file=sys.stderr, flush=True)
    return 1
  return 0


def main(argv: list[str] | None = None) -> int:
  args, extra = _parser().parse_known_args(argv)
  try:
    if args.report:
      if extra or args.config or args.methods or args.teacher_workdir:
        raise SweepError("--report takes only --root: the config and methods are read from its sweep.json.")
      report(args.root)
      if args.export:
        written = export(args.root, args.export)
        print(f"sweep: wrote {len(written)} files in {args.export}", flush=True)
      print(pathlib.Path(args.root, "results.md").read_text(), flush=True)
      return 0
    if args.export:
      raise SweepError("--export goes with --report (it copies a finished report).")
    if args.config is None:
      raise SweepError("--config is required (or --report to rebuild the tables of a root).")
    return sweep(args.config, args.methods, args.seeds, args.root, args.jobs, extra, args.teacher_workdir)
  except SweepError as error:
    print(f"sweep: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
