"""Figures from results.json histories: the plotted numbers against NumPy, and the PNGs are real pictures
(their size, and pixel variance far from a blank canvas)."""

import numpy as np
import pytest
from PIL import Image

from nst_jax.tools import curves


def _history(top1, top5=None, train=None):
  epochs = []
  for i, value in enumerate(top1):
    entry = {"epoch": i + 1, "top1": value, "top5": (top5 or top1)[i]}
    if train:
      entry["train"] = {k: v[i] for k, v in train.items()}
    epochs.append(entry)
  return epochs


def _pixels(path):
  return np.asarray(Image.open(path).convert("L"), np.float32)


def test_band_is_mean_min_max_over_runs_at_common_epochs():
  runs = [_history([10.0, 20.0, 30.0]), _history([14.0, 26.0, 33.0]), _history([12.0, 23.0])]
  epochs, mean, low, high = curves.band(runs)
  np.testing.assert_array_equal(epochs, [1, 2])  # the third run has no epoch 3
  values = np.array([[10.0, 20.0], [14.0, 26.0], [12.0, 23.0]])
  np.testing.assert_allclose(mean, [12.0, 23.0])
  np.testing.assert_allclose(mean, values.mean(0))
  np.testing.assert_allclose(low, [10.0, 20.0])
  np.testing.assert_allclose(high, [14.0, 26.0])
  assert all(len(a) == 0 for a in curves.band([]))


def test_sweep_figure_lines_legend_and_picture(tmp_path):
  histories = {"ce": [_history([50.0, 60.0]), _history([54.0, 62.0])], "kd_nst": [_history([58.0, 66.0])],
               "nst": []}
  figure = curves.sweep_figure(histories, teacher_top1=70.25, title="digits: evaluation top-1 by epoch")
  ax = figure.axes[0]
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels == ["ce (n = 2)", "kd_nst (n = 1)", "teacher (70.25 %)"]  # no line for a method without runs
  ce, kd_nst, teacher = ax.get_lines()
  np.testing.assert_allclose(ce.get_ydata(), [52.0, 61.0])
  np.testing.assert_allclose(kd_nst.get_ydata(), [58.0, 66.0])
  np.testing.assert_allclose(teacher.get_ydata(), [70.25, 70.25])
  assert len(ax.collections) == 1  # one min-max band: only ce has more than one run
  assert ax.get_xlabel() == "epoch" and "top-1" in ax.get_ylabel() and ax.get_title()
  path = tmp_path / "curves.png"
  curves.save(figure, str(path))
  image = _pixels(path)
  assert image.shape == (840, 1280) and image.std() > 10.0
  assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_run_figure_plots_every_loss_term_and_accuracy(tmp_path):
  train = {"train_loss": [3.0, 2.0, 1.5], "train_ce_loss": [2.0, 1.2, 0.9],
           "train_nst_loss": [0.01, 0.004, 0.002], "train_accuracy": [0.4, 0.6, 0.7],
           "learning_rate": [0.1, 0.1, 0.01]}
  results = {"epochs": _history([40.0, 55.0, 61.0], [80.0, 90.0, 93.0], train), "teacher": {"top1": 75.0}}
  figure = curves.run_figure(results, "digits:kd_nst, seed 0")
  losses, accuracy = figure.axes
  # The total first, then the terms; neither the learning rate nor the accuracy is a loss.
  assert [t.get_text() for t in losses.get_legend().get_texts()] == ["total", "ce", "nst"]
  assert losses.get_yscale() == "log"
  np.testing.assert_allclose(losses.get_lines()[2].get_ydata(), [0.01, 0.004, 0.002])
  lines = {t.get_text(): line for t, line in zip(accuracy.get_legend().get_texts(), accuracy.get_lines(),
                                                   strict=True)}
  np.testing.assert_allclose(lines["eval top-1"].get_ydata(), [40.0, 55.0, 61.0])
  np.testing.assert_allclose(lines["train top-1 (batches)"].get_ydata(), [40.0, 60.0, 70.0])  # fraction -> %
  np.testing.assert_allclose(lines["teacher top-1 (75.00 %)"].get_ydata(), [75.0, 75.0])
  curves.save(figure, str(tmp_path / "run.png"))
  image = _pixels(tmp_path / "run.png")
  assert image.shape == (800, 2000) and image.std() > 10.0


@pytest.mark.parametrize("results", [{"epochs": _history([40.0, 50.0])}, {"epochs": []}])
def test_run_figure_of_an_older_results_json_without_train_history(results, tmp_path):
  figure = curves.run_figure(results, "old run")
  losses, _ = figure.axes
  assert not losses.get_lines() and "no train history" in losses.texts[0].get_text()
  curves.save(figure, str(tmp_path / "old.png"))
  assert _pixels(tmp_path / "old.png").std() > 5.0
