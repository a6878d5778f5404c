"""Figures of training runs, from their `results.json` alone (no TensorBoard), ready for a paper draft.

* `sweep_figure(histories, teacher_top1, title)`: evaluation top-1 against epoch, one line per method:
  the mean over its seeds with a shaded band from the lowest to the highest seed, and the teacher's
  accuracy as a dashed horizontal line.
* `run_figure(results, title)`: one run: its mean train loss terms per epoch (left) and its accuracies
  per epoch (right).
* `band(runs, key)`: the numbers behind one line of `sweep_figure` (epochs, mean, min, max).
* `save(figure, path)`: writes the PNG atomically.

A history is a results.json's "epochs" list: `[{"epoch": 1, "top1": ..., "top5": ..., "train": {...}}]`
with accuracies in %. The figures use matplotlib's object API (no pyplot), so importing this module
neither picks nor changes a backend for the rest of the process.
"""

import io

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from nst_jax.trainer import rundir

_MARKERS_UP_TO = 20  # Epochs; with more, markers would hide the line.


def band(runs: list[list[dict]], key: str = "top1") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(epochs, mean, min, max) of `key` over the runs, at the epochs that every run has evaluated."""
  per_run = [{int(e["epoch"]): float(e[key]) for e in history} for history in runs]
  epochs = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
  if not epochs:
    empty = np.zeros(0)
    return empty, empty, empty, empty
  values = np.array([[r[e] for e in epochs] for r in per_run])
  return np.array(epochs), values.mean(0), values.min(0), values.max(0)


def _style(ax, xlabel: str, ylabel: str):
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # Epochs are whole numbers.
  ax.grid(True, alpha=0.3, linewidth=0.6)
  ax.spines[["top", "right"]].set_visible(False)


def sweep_figure(histories: dict[str, list[list[dict]]], teacher_top1: float | None, title: str) -> Figure:
  """Evaluation top-1 by epoch: per method (key) the mean over its runs (histories) and the min-max band."""
  figure = Figure(figsize=(6.4, 4.2), layout="constrained")
  ax = figure.add_subplot()
  n_max = 0
  for method, runs in histories.items():
    epochs, mean, low, high = band(runs)
    if not len(epochs):
      continue
    n_max = max(n_max, len(runs))
    marker = "o" if len(epochs) <= _MARKERS_UP_TO else None
    (line,) = ax.plot(epochs, mean, marker=marker, markersize=3.5, linewidth=1.6,
                      label=f"{method} (n = {len(runs)})")
    if len(runs) > 1:
      ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
  if teacher_top1 is not None:
    ax.axhline(teacher_top1, color="black", linestyle="--", linewidth=1.1,
               label=f"teacher ({teacher_top1:.2f} %)")
  _style(ax, "epoch", "evaluation top-1 accuracy (%)")
  ax.set_title(title, fontsize=11)
  if n_max > 1:
    ax.text(0.01, 0.01, "lines: mean over seeds; bands: min to max", transform=ax.transAxes, fontsize=8,
            color="0.35", va="bottom")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="lower right", fontsize=9, frameon=False)
  else:
    ax.text(0.5, 0.5, "no finished runs yet", transform=ax.transAxes, ha="center", color="0.4")
  return figure


def _loss_name(key: str) -> str:
  """`train_loss` -> "total", `train_nst_loss` -> "nst"."""
  return "total" if key == "train_loss" else key.removeprefix("train_").removesuffix("_loss")


def run_figure(results: dict, title: str) -> Figure:
  """One run's mean train loss terms (left; "train" missing in older results.json) and accuracies (right)."""
  history = results.get("epochs") or []
  figure = Figure(figsize=(10.0, 4.0), layout="constrained")
  losses, accuracy = figure.subplots(1, 2)
  epochs = np.array([int(e["epoch"]) for e in history])
  marker = "o" if len(epochs) <= _MARKERS_UP_TO else None
  trained = [e for e in history if isinstance(e.get("train"), dict)]
  keys = sorted({k for e in trained for k in e["train"] if k.endswith("_loss")},
                key=lambda k: (k != "train_loss", k))  # The total first.
  for key in keys:
    points = [(int(e["epoch"]), float(e["train"][key])) for e in trained if key in e["train"]]
    x, y = np.array(points).T
    losses.plot(x, y, marker=marker, markersize=3.5, linewidth=2.0 if key == "train_loss" else 1.3,
                label=_loss_name(key))
  values = [float(e["train"][k]) for e in trained for k in keys if k in e["train"]]
  if values and min(values) > 0:
    losses.set_yscale("log")  # The terms differ by orders of magnitude (NST vs CE).
    # Plain numbers (0.01, 2) rather than 1e-02, 2x10^0; minor ticks labelled only within a decade or so.
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    losses.yaxis.set_major_formatter(plain)
    few_decades = np.log10(max(values) / min(values)) < 1.2
    losses.yaxis.set_minor_formatter(plain if few_decades else ticker.NullFormatter())
  _style(losses, "epoch", "mean train loss over the epoch")
  if keys:
    losses.legend(loc="best", fontsize=9, frameon=False)
  else:
    losses.text(0.5, 0.5, "no train history in results.json", transform=losses.transAxes, ha="center",
                color="0.4")
  for key in ("top1", "top5") if len(epochs) else ():
    accuracy.plot(epochs, [float(e[key]) for e in history], marker=marker, markersize=3.5,
                  label=f"eval top-{key[-1]}")
  train_acc = [(int(e["epoch"]), float(e["train"]["train_accuracy"])) for e in trained
               if "train_accuracy" in e["train"]]
  if train_acc:
    x, y = np.array(train_acc).T
    # The train step reports a fraction, the evaluation a percentage.
    accuracy.plot(x, 100.0 * y if y.max() <= 1.0 else y, marker=marker, markersize=3.5, linestyle=":",
                  label="train top-1 (batches)")
  teacher = results.get("teacher")
  if isinstance(teacher, dict) and "top1" in teacher:
    accuracy.axhline(float(teacher["top1"]), color="black", linestyle="--", linewidth=1.1,
                     label=f"teacher top-1 ({float(teacher['top1']):.2f} %)")
  _style(accuracy, "epoch", "accuracy (%)")
  if accuracy.get_legend_handles_labels()[0]:
    accuracy.legend(loc="best", fontsize=9, frameon=False)
  figure.suptitle(title, fontsize=11)
  return figure


def save(figure: Figure, path: str, dpi: int = 200) -> None:
  """`figure` as a PNG at `path`, written to a temporary file and renamed (never half a picture)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi)
  rundir.write_bytes(path, buffer.getvalue())
