"""nst_jax/tools/analysis.py against hand computations and SciPy's own Welch test."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from nst_jax.tools import analysis
from nst_jax.trainer import config_lib


def test_welch_matches_a_hand_computation():
  a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0]
  # Means 2 and 6; sample variances 1 and 4; squared standard errors 1/3 and 4/3.
  t = -4.0 / np.sqrt(5.0 / 3.0)
  dof = (5.0 / 3.0) ** 2 / ((1.0 / 3.0) ** 2 / 2 + (4.0 / 3.0) ** 2 / 2)  # = (25/9) / (17/18) = 50/17
  test = analysis.welch(a, b)
  assert test.difference == pytest.approx(-4.0)
  assert test.t == pytest.approx(t) and test.dof == pytest.approx(50.0 / 17.0)
  assert dof == pytest.approx(50.0 / 17.0)
  assert test.p == pytest.approx(2 * stats.t.sf(abs(t), 50.0 / 17.0))
  # Intervals 2 +- 2/sqrt(3) and 6 +- 4/sqrt(3): 3.15 < 3.69, apart.
  assert test.separated


def test_welch_matches_scipy_ttest_ind_unequal_variances():
  rng = np.random.default_rng(0)
  for n, m in ((3, 3), (3, 5), (10, 4)):
    a, b = rng.normal(70, 1.5, n), rng.normal(71, 0.5, m)
    expected = stats.ttest_ind(a, b, equal_var=False)
    test = analysis.welch(a, b)
    assert test.t == pytest.approx(expected.statistic) and test.p == pytest.approx(expected.pvalue)


def test_welch_overlapping_intervals_and_undefined_cases():
  test = analysis.welch([70.0, 71.0, 72.0], [70.5, 71.5, 72.5])
  assert not test.separated and test.p > 0.5
  assert analysis.welch([70.0], [71.0, 72.0]) is None     # one seed: no spread to compare with
  assert analysis.welch([70.0, 70.0], [71.0, 71.0]) is None  # no spread on either side


def test_each_method_is_compared_with_ce_and_with_itself_less_one_term():
  methods = ["ce", "kd", "nst", "kd_nst", "nst_linear", "kd_fitnet", "kd_fitnet_nst", "at"]
  assert analysis.references_of("ce", methods) == []
  assert analysis.references_of("kd", methods) == ["ce"]
  assert analysis.references_of("kd_nst", methods) == ["ce", "kd", "nst"]
  assert analysis.references_of("nst_linear", methods) == ["ce", "nst"]
  assert analysis.references_of("kd_fitnet_nst", methods) == ["ce", "kd_nst", "kd_fitnet"]
  assert analysis.references_of("kd_nst", ["kd_nst", "kd"]) == ["kd"]  # no ce swept: not invented


def _run(top1, *, nst_start=0.1, nst_end=0.02, loss_start=10.0, loss_end=2.0):
  return {"last_top1": top1, "epochs": [
      {"epoch": 1, "train": {"train_loss": loss_start, "train_ce_loss": 2.0, "train_nst_loss": nst_start}},
      {"epoch": 2, "train": {"train_loss": loss_end, "train_ce_loss": 0.5, "train_nst_loss": nst_end}}]}


def test_comparison_rows_carry_the_welch_numbers():
  found = {"ce": {0: _run(60.0), 1: _run(61.0), 2: _run(62.0)},
           "nst": {0: _run(64.0), 1: _run(66.0), 2: _run(68.0)}}
  rows = analysis.comparisons(found, ["ce", "nst"])
  assert len(rows) == 1
  row = rows[0]
  expected = stats.ttest_ind([64.0, 66.0, 68.0], [60.0, 61.0, 62.0], equal_var=False)
  assert (row["method"], row["against"], row["n"], row["n_against"]) == ("nst", "ce", 3, 3)
  assert row["difference"] == pytest.approx(5.0) and row["p"] == pytest.approx(expected.pvalue)
  text = analysis.comparisons_markdown(rows, "t")
  assert "| nst | ce | 3 vs 3 | 5.00 |" in text


def test_term_values_are_unweighted_with_weighted_shares():
  config = {"distill": {"ce_weight": 1.0, "kd_weight": 0.0, "nst": {"weight": 50.0},
                        "fitnet": {"weight": 0.0}, "at": {"weight": 0.0}}}
  values = analysis.term_values(_run(60.0), config)
  assert set(values) == {"ce", "nst"}  # kd has weight 0: not a term of this run
  assert values["nst"] == pytest.approx({"weight": 50.0, "start": 0.1, "end": 0.02,
                                         "start_share": 50 * 0.1 / 10.0, "end_share": 50 * 0.02 / 2.0})
  assert values["ce"]["start_share"] == pytest.approx(0.2)
  assert values["ce"]["end_share"] == pytest.approx(0.25)
  rows = analysis.term_rows({"nst": {0: _run(60.0), 1: _run(61.0, nst_end=0.04)}},
                            {"nst": {0: config, 1: config}})
  nst = next(r for r in rows if r["term"] == "nst")
  assert nst["n"] == 2 and nst["end"] == pytest.approx(0.03) and nst["end_share"] == pytest.approx(0.75)


def test_relative_paths_leave_no_absolute_path():
  root = str(config_lib.REPO_ROOT)
  data = {"command": [os.path.join(root, "nst_jax", "__main__.py"), "--workdir", "workdirs/x",
                      f"--config.teacher.workdir={os.path.join(root, 'workdirs', 't')}"],
          "stages": [{"workdir": os.path.join(root, "workdirs", "x")}], "steps": 3,
          "data": os.path.join(os.path.dirname(root), "shared", "data")}
  out = analysis.relative_paths(data)
  assert out == {"command": [os.path.join("nst_jax", "__main__.py"), "--workdir", "workdirs/x",
                             f"--config.teacher.workdir={os.path.join('workdirs', 't')}"],
                 "stages": [{"workdir": os.path.join("workdirs", "x")}], "steps": 3,
                 "data": os.path.join("..", "shared", "data")}


def test_export_copies_tables_and_summaries_not_checkpoints(tmp_path):
  root, dest = tmp_path / "sweep", tmp_path / "out"
  run = root / "nst" / "seed0"
  (run / "checkpoints" / "3").mkdir(parents=True)
  (run / "checkpoints" / "3" / "state").write_text("weights")
  (root / "results.md").write_text("| table |\n")
  (root / "sweep.json").write_text(json.dumps({"config": str(config_lib.REPO_ROOT / "configs" / "x.py")}))
  (run / "run.json").write_text(json.dumps({"workdir": str(run.resolve()), "wall_s": 1.5}))
  (run / "results.json").write_text(json.dumps({"finished": True, "last_top1": 60.0}))
  written = analysis.export(str(root), str(dest), ["nst/seed0"])
  assert sorted(written) == ["nst/seed0/results.json", "nst/seed0/run.json", "results.md", "sweep.json"]
  assert json.loads((dest / "sweep.json").read_text()) == {"config": os.path.join("configs", "x.py")}
  assert not (dest / "nst" / "seed0" / "checkpoints").exists()
  assert (dest / "results.md").read_text() == "| table |\n"
  stored = json.loads((dest / "nst" / "seed0" / "run.json").read_text())
  assert not os.path.isabs(stored["workdir"]) and stored["wall_s"] == 1.5


def test_claims_against_the_papers_differences():
  found = {"nst": {0: {"last_top1": 65.0}, 1: {"last_top1": 65.2}, 2: {"last_top1": 65.4}},
           "fitnet": {0: {"last_top1": 63.0}, 1: {"last_top1": 63.1}, 2: {"last_top1": 63.3}},
           "at": {0: {"last_top1": 65.1}, 1: {"last_top1": 65.5}, 2: {"last_top1": 64.9}},
           "kd": {0: {"last_top1": 66.0}, 1: {"last_top1": 66.1}, 2: {"last_top1": 66.3}},
           "one": {0: {"last_top1": 60.0}}}
  references = {"nst": (95.61, "s"), "fitnet": (95.25, "s"), "at": (95.36, "s"), "kd": (95.53, "s"),
                "one": (95.53, "s")}
  claims = [("nst", "fitnet", "NST beats FitNet"), ("nst", "at", "NST beats AT"),
            ("nst", "kd", "NST beats KD"), ("kd", "nst", "KD loses to NST"), ("nst", "one", "n = 1"),
            ("kd", "one", "equal in the paper")]
  rows = {(r["method"], r["against"]): r for r in analysis.claim_rows(found, claims, references)}
  row = rows["nst", "fitnet"]
  assert row["paper_difference"] == pytest.approx(0.36)
  assert row["difference"] == pytest.approx(2.0667, abs=1e-4)
  p = stats.ttest_ind([65.0, 65.2, 65.4], [63.0, 63.1, 63.3], equal_var=False).pvalue
  assert row["p"] == pytest.approx(p) and p < 0.05 and row["verdict"] == "holds"
  assert rows["nst", "at"]["verdict"] == "not shown"  # +0.03 here, p far above 0.05
  assert rows["nst", "kd"]["verdict"] == "reversed"  # the paper +0.08; here -0.93 with p < 0.05
  assert rows["kd", "nst"]["verdict"] == "reversed"  # the same pair turned round: the paper -0.08, here +0.93
  assert rows["nst", "one"]["verdict"].startswith("no test") and rows["nst", "one"]["p"] is None
  assert rows["kd", "one"]["verdict"].startswith("no test")
  table = analysis.claims_markdown(list(rows.values()), "t")
  assert "| NST beats FitNet | nst | fitnet | 3 vs 3 | +0.36 | +2.07 |" in table


def test_a_claim_the_paper_finds_no_difference_for():
  assert analysis.verdict(0.0, 0.4, 0.3) == "no difference shown, as in the paper"
  assert analysis.verdict(0.0, -1.4, 0.01) == "differs here"
  assert analysis.verdict(-0.33, 0.2, 0.6) == "not shown, opposite sign"
