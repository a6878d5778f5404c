"""Reading a sweep: which differences exceed the seed-to-seed spread, and what each loss term weighed.

* `welch(a, b)`: Welch's two-sided t-test of two sets of per-seed accuracies (unequal variances), and
  whether their mean +- 2 standard-error intervals overlap: with n = 3 seeds a test has little power,
  so the tables state both and n.
* `comparisons(found, methods)`: each method against `ce` and against every method of the sweep that is
  it less one part of its name (`kd_nst` against `kd` and `nst`; `nst_linear` against `nst`), on the
  last epoch's top-1.
* `claim_rows(found, claims, references)`: the claims a config states (its module-level `CLAIMS`: "method
  beats against", e.g. the paper's "NST with the polynomial kernel beats FitNet"), each with the paper's
  difference (from the config's `REFERENCE`), ours, Welch's p and a verdict (`verdict`): "holds" (our
  difference has the paper's sign and p < 0.05), "not shown" (the paper's sign, p >= 0.05), "reversed"
  (the other sign, p < 0.05) or "not shown, opposite sign"; where the paper's two numbers are equal,
  "differs here" or "no difference shown, as in the paper".
* `term_rows(found, configs)`: per method, every weighted loss term's unweighted value in the first and
  the last epoch (train means over the epoch, from `results.json`) and its weighted share of the total.
* `export(root, dest)`: a sweep's tables, curves and per-run summaries (no checkpoints) copied to a folder
  that can be committed, with the machine's absolute paths made relative to the repository.

`nst_jax/tools/sweep.py`'s report writes the comparison and term tables beside its results table.
"""

import dataclasses
import json
import math
import os
import shutil

import numpy as np
from scipy import stats

from nst_jax.trainer import config_lib

METRIC = "last_top1"
BASELINE = "ce"
# Loss terms and where their weights are in a run's config.json.
TERM_WEIGHTS = {"ce": ("ce_weight",), "kd": ("kd_weight",), "nst": ("nst", "weight"),
                "fitnet": ("fitnet", "weight"), "at": ("at", "weight")}
TABLES = ("results.csv", "results.md", "comparisons.csv", "comparisons.md", "claims.csv", "claims.md",
          "terms.csv", "terms.md",
          "curves.png", "sweep.json")
RUN_FILES = ("results.json", "run.json", "config.json")


@dataclasses.dataclass(frozen=True)
class Welch:
  difference: float  # mean(a) - mean(b)
  t: float
  dof: float
  p: float           # two-sided
  separated: bool    # the mean +- 2 SE intervals do not overlap


def welch(a, b) -> Welch | None:
  """Welch's t-test of mean(a) - mean(b); None when a side has fewer than 2 values or both have no spread."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 2 or len(b) < 2:
    return None
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)  # squared standard errors
  if va + vb == 0:
    return None
  difference = float(a.mean() - b.mean())
  t = difference / math.sqrt(va + vb)
  dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  p = float(2 * stats.t.sf(abs(t), dof))
  separated = abs(difference) > 2 * (math.sqrt(va) + math.sqrt(vb))
  return Welch(difference, float(t), float(dof), p, bool(separated))


def _parts(method: str) -> frozenset[str]:
  return frozenset() if method == BASELINE else frozenset(method.split("_"))


def references_of(method: str, methods: list[str]) -> list[str]:
  """The methods `method` is compared with: `ce`, and those of `methods` that are it less one name part."""
  parts = _parts(method)
  found = [m for m in methods if m != method and _parts(m) < parts and len(parts - _parts(m)) == 1]
  return ([BASELINE] if method != BASELINE and BASELINE in methods and BASELINE not in found else []) + found


def _values(runs: dict[int, dict], metric: str = METRIC) -> list[float]:
  return [float(r[metric]) for _, r in sorted(runs.items()) if metric in r]


def compare(found: dict[str, dict[int, dict]], method: str, against: str) -> dict:
  """`method` against `against` on the last epoch's top-1 over seeds: n per side, the difference of the
  means and Welch's test (None where a side has too few runs)."""
  a, b = _values(found.get(method, {})), _values(found.get(against, {}))
  test = welch(a, b)
  return {"method": method, "against": against, "n": len(a), "n_against": len(b),
          "difference": float(np.mean(a) - np.mean(b)) if a and b else None,
          "t": test.t if test else None, "dof": test.dof if test else None,
          "p": test.p if test else None, "separated": test.separated if test else None}


def comparisons(found: dict[str, dict[int, dict]], methods: list[str]) -> list[dict]:
  """One row per (method, reference method) pair (`compare`)."""
  return [compare(found, method, other) for method in methods for other in references_of(method, methods)]


def verdict(paper_difference: float | None, difference: float | None, p: float | None) -> str:
  """Whether a claimed difference (the paper's sign; positive when it has none) shows in ours."""
  if difference is None or p is None:
    return "no test (fewer than 2 runs a side)"
  if paper_difference == 0:  # The paper's two numbers are equal.
    return "differs here" if p < 0.05 else "no difference shown, as in the paper"
  same = (difference > 0) == ((1.0 if paper_difference is None else paper_difference) > 0)
  if p < 0.05:
    return "holds" if same else "reversed"
  return "not shown" if same else "not shown, opposite sign"


def claim_rows(found: dict[str, dict[int, dict]], claims, references: dict) -> list[dict]:
  """One row per claim `(method, against, claim)`: the paper's difference in top-1 points (None where
  `references` lacks a side), ours over seeds with Welch's test, and `verdict`."""
  rows = []
  for method, against, claim in claims:
    pair = compare(found, method, against)
    paper = (references[method][0] - references[against][0]
             if method in references and against in references else None)
    rows.append({"claim": claim, "method": method, "against": against, "n": pair["n"],
                 "n_against": pair["n_against"], "paper_difference": paper,
                 "difference": pair["difference"], "p": pair["p"],
                 "verdict": verdict(paper, pair["difference"], pair["p"])})
  return rows


def claims_markdown(rows: list[dict], title: str) -> str:
  lines = [f"# {title}: the paper's claims", "",
           "Each claim as a difference in last top-1 (percentage points): the paper's (from its table, "
           "100 - error) and ours (mean over seeds), with Welch's two-sided p. holds: our difference has "
           "the paper's sign and p < 0.05; not shown: the paper's sign, p >= 0.05 (three seeds show only "
           "large differences); reversed: the other sign, p < 0.05.", "",
           "| claim | method | against | n | paper | ours | p | verdict |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    p = "" if r["p"] is None else ("< 0.001" if r["p"] < 0.001 else f"{r['p']:.3f}")
    paper = "" if r["paper_difference"] is None else f"{r['paper_difference']:+.2f}"
    ours = "" if r["difference"] is None else f"{r['difference']:+.2f}"
    lines.append(f"| {r['claim']} | {r['method']} | {r['against']} | {r['n']} vs {r['n_against']} | "
                 f"{paper} | {ours} | {p} | {r['verdict']} |")
  return "\n".join(lines) + "\n"


def _weight(config: dict, term: str) -> float:
  value = config.get("distill", {})
  for key in TERM_WEIGHTS[term]:
    value = value.get(key, 0.0) if isinstance(value, dict) else 0.0
  return float(value)


def term_values(results: dict, config: dict) -> dict[str, dict[str, float]]:
  """term -> {weight, start, end, start_share, end_share} for every term with weight > 0 in one run.

  start / end: the term's unweighted train mean over the first / last epoch; shares: weight x value
  over the total loss of the same epoch.
  """
  epochs = [e for e in results.get("epochs") or [] if e.get("train")]  # older runs kept no train means
  if not epochs:
    return {}
  first, last = epochs[0]["train"], epochs[-1]["train"]
  out = {}
  for term in TERM_WEIGHTS:
    weight, key = _weight(config, term), f"train_{term}_loss"
    if weight > 0 and key in first and key in last:
      out[term] = {"weight": weight, "start": float(first[key]), "end": float(last[key]),
                   "start_share": weight * float(first[key]) / float(first["train_loss"]),
                   "end_share": weight * float(last[key]) / float(last["train_loss"])}
  return out


def term_rows(found: dict[str, dict[int, dict]], configs: dict[str, dict[int, dict]]) -> list[dict]:
  """Per (method, term): the means over seeds of `term_values`."""
  rows = []
  for method, runs in found.items():
    per_seed = [term_values(results, configs[method][seed]) for seed, results in sorted(runs.items())]
    for term in TERM_WEIGHTS:
      seen = [v[term] for v in per_seed if term in v]
      if seen:
        rows.append({"method": method, "term": term, "n": len(seen), "weight": seen[0]["weight"],
                     **{k: float(np.mean([s[k] for s in seen]))
                        for k in ("start", "end", "start_share", "end_share")}})
  return rows


def _fmt(value, digits: int = 2) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def comparisons_markdown(rows: list[dict], title: str) -> str:
  lines = [f"# {title}: differences in last top-1", "",
           "Difference = mean(method) - mean(against) in percentage points over seeds; Welch's t-test "
           "(two-sided, unequal variances); separated = the mean ± 2 standard-error intervals do not "
           "overlap, a looser criterion than p < 0.05 at n = 3 (t's 5 % point is 4.3 at 2 degrees of "
           "freedom). With n = 3 per side only large differences show: a p above 0.05 means not shown, "
           "not equal.", "",
           "| method | against | n | difference | t | dof | p | separated |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    separated = "" if r["separated"] is None else ("yes" if r["separated"] else "no")
    p = "" if r["p"] is None else ("< 0.001" if r["p"] < 0.001 else f"{r['p']:.3f}")
    lines.append(f"| {r['method']} | {r['against']} | {r['n']} vs {r['n_against']} | "
                 f"{_fmt(r['difference'])} | {_fmt(r['t'])} | {_fmt(r['dof'], 1)} | {p} | {separated} |")
  return "\n".join(lines) + "\n"


def terms_markdown(rows: list[dict], title: str) -> str:
  lines = [f"# {title}: loss terms, first and last epoch", "",
           "Unweighted value of each term (train mean over the epoch) and its weighted share of the total "
           "loss; means over seeds.", "",
           "| method | term | weight | first epoch | last epoch | share, first | share, last |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['term']} | {r['weight']:g} | {r['start']:.4g} | {r['end']:.4g} | "
                 f"{100 * r['start_share']:.1f} % | {100 * r['end_share']:.1f} % |")
  return "\n".join(lines) + "\n"


def relative_paths(value, repo_root: str = str(config_lib.REPO_ROOT)):
  """`value` (JSON data) with every absolute path string made relative to the repository."""
  if isinstance(value, dict):
    return {k: relative_paths(v, repo_root) for k, v in value.items()}
  if isinstance(value, list):
    return [relative_paths(v, repo_root) for v in value]
  if isinstance(value, str):
    key, sep, path = value.rpartition("=")  # command-line flags: --config.teacher.workdir=/abs/path
    if os.path.isabs(path):
      return f"{key}{sep}{os.path.relpath(path, repo_root)}"
  return value


def export(root: str, dest: str, run_dirs: list[str]) -> list[str]:
  """Copies the sweep's tables and the runs' summaries (`run_dirs`, relative to `root`) to `dest`.

  JSON files (sweep.json too) are rewritten through `relative_paths`; returns the files written, relative
  to `dest`.
  """
  files = list(TABLES) + [os.path.join(run, name) for run in run_dirs for name in RUN_FILES]
  written = []
  for name in files:
    source, target = os.path.join(root, name), os.path.join(dest, name)
    if not os.path.exists(source):
      continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if name.endswith(".json"):
      with open(source) as f:
        data = relative_paths(json.load(f))
      with open(target, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    else:
      shutil.copyfile(source, target)
    written.append(name)
  return written
