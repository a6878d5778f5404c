"""The published numbers in the configs: each config's module-level `REFERENCE` is their one copy.

`REFERENCE` maps a method (or "teacher") to (published top-1 accuracy in %, its source); a teacher config's
is one such pair. The source names the table cell the number comes from, in one of three forms:
  RepDistiller   "RepDistiller CIFAR-100 table, row vgg13 -> vgg8 (last epoch, one run), KD column"
  paper CIFAR    "NST paper, CIFAR-10 table (ResNet-1001 -> Inception-BN), 100 - error 4.47 of row KD"
  paper ImageNet "NST paper, ImageNet (...), 100 - top-1 error 24.56 of row KD (top-5 error 7.35)"
The first two tests check the data on its own, on any clone; the last one checks it against the tables of
`../shared/reference/nst-method.md` §8, where that file exists.
"""

import pathlib
import re

import pytest

from nst_jax.tools import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHOD_MD = ROOT.parent / "shared" / "reference" / "nst-method.md"
# Experiment configs: not `_*.py` helpers, not `default.py` (the keys, no experiment).
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py")
                 if not p.name.startswith("_") and p.stem != "default")
NUMBER = re.compile(r"\d+\.\d\d")


def _reference_numbers(module) -> dict[str, tuple[float, str]]:
  reference = getattr(module, "REFERENCE", None)
  if isinstance(reference, tuple):
    return {"teacher config": reference}
  return dict(reference or {})


# The sources' forms: RepDistiller's accuracies name their row and column; the paper's error rates name the
# error, then the row (and, for ImageNet, the top-5 error beside it).
REPDISTILLER = re.compile(r"RepDistiller CIFAR-100 table, row (\w+) -> (\w+)(?: \(last epoch, one run\))?, "
                          r"(\w+) column(?: \(last epoch, one run\))?")
PAPER = re.compile(r"NST paper, (CIFAR-10|CIFAR-100) table \(ResNet-1001 -> Inception-BN\), "
                   r"100 - error (\d+\.\d\d) of row (.+)")
IMAGENET = re.compile(r"NST paper, ImageNet \(ResNet-101 -> Inception-BN\), "
                      r"100 - top-1 error (\d+\.\d\d) of row (.+) \(top-5 error \d+\.\d\d\)")
REPDISTILLER_COLUMNS = {"ce": "student", "kd": "KD", "fitnet": "FitNet", "at": "AT", "nst": "NST",
                        "teacher": "teacher", "teacher config": "teacher"}
WITH_REFERENCE = [p for p in CONFIGS if "REFERENCE" in p.read_text()]


@pytest.mark.parametrize("path", WITH_REFERENCE, ids=lambda p: p.stem)
def test_reference_data_is_self_consistent(path):
  """Each entry is (two-decimal accuracy, source naming its cell); an error-derived one names 100 - value."""
  module = sweep.load_config_module(str(path))
  data = _reference_numbers(module)
  assert data, path
  methods = tuple(getattr(module, "METHODS", ()))
  if methods:  # Keyed by method.
    assert set(data) <= set(methods) | {"teacher"}, sorted(set(data) - set(methods))
  else:  # A teacher config: one (value, source) pair.
    assert set(data) == {"teacher config"}, sorted(data)
  for method, entry in data.items():
    assert isinstance(entry, tuple) and len(entry) == 2, (method, entry)
    value, source = entry
    assert isinstance(value, float) and 0 < value < 100 and round(value, 2) == value, (method, value)
    assert isinstance(source, str) and source.strip(), (method, source)
    teacher = method in ("teacher", "teacher config")
    if match := REPDISTILLER.fullmatch(source):
      assert match.group(3) == REPDISTILLER_COLUMNS[method], (method, source)
      if methods:  # A pair config: its own row.
        assert path.stem == f"cifar100_{match.group(1)}_to_{match.group(2)}", (path.stem, source)
      else:  # A teacher config: a row of its teacher.
        assert path.stem == f"cifar100_{match.group(1)}", (path.stem, source)
      continue
    match = PAPER.fullmatch(source) or IMAGENET.fullmatch(source)
    assert match, f"{method}: {source!r} is none of the source forms in this file's docstring"
    error, row = match.groups()[-2:]
    assert f"{100 - value:.2f}" == error, (method, value, source)
    assert (row == "teacher") == teacher and (row == "student") == (method == "ce"), (method, source)
    if match.re is PAPER:
      dataset = "cifar10" if match.group(1) == "CIFAR-10" else "cifar100"
      assert path.stem.startswith(f"{dataset}_"), (path.stem, source)
    else:
      assert path.stem.startswith("imagenet_"), (path.stem, source)


@pytest.mark.parametrize("path", WITH_REFERENCE, ids=lambda p: p.stem)
def test_a_method_without_reference_data_says_so(path):
  """A method missing from REFERENCE has "no published number" in its row of the docstring's table."""
  module = sweep.load_config_module(str(path))
  for method in set(getattr(module, "METHODS", ())) - set(_reference_numbers(module)):
    row = re.search(rf"^\| `{method}` \|.*$", module.__doc__, re.M)
    assert row and "no published number" in row.group(0), method


def _method_md_tables(text: str) -> dict:
  """nst-method.md §8 as {("repdistiller", pair, column): accuracy, ("paper", dataset, row): error, ...}."""
  section = text.split("## 8.", 1)[1].split("\n## ", 1)[0]
  table = {}
  header = None
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| pair |") or line.startswith("| method |"):
      header = cells
    elif line.startswith("|") and header and not set(cells[0]) <= {"-", " "}:
      for column, value in zip(header[1:], cells[1:], strict=True):
        kind = "repdistiller" if header[0] == "pair" else "paper"
        table[kind, cells[0], column] = float(value)
  imagenet = " ".join(section.split("Inception-BN:", 1)[1].split("PASCAL", 1)[0].split())
  for row, top1, top5 in re.findall(r"([A-Za-z][A-Za-z +]*?) (\d+\.\d\d) / (\d+\.\d\d)", imagenet):
    table["imagenet", row.strip(), "top1"], table["imagenet", row.strip(), "top5"] = float(top1), float(top5)
  teacher = re.search(r"teacher ResNet-101 \((\d+\.\d\d) / (\d+\.\d\d)\)", section)
  table["imagenet", "teacher", "top1"], table["imagenet", "teacher", "top5"] = map(float, teacher.groups())
  return table


@pytest.mark.skipif(not METHOD_MD.exists(), reason=f"{METHOD_MD} is not here")
@pytest.mark.parametrize("path", WITH_REFERENCE, ids=lambda p: p.stem)
def test_reference_data_matches_the_published_tables(path):
  """Each entry's source names its table cell; the cell there holds the entry's number."""
  table = _method_md_tables(METHOD_MD.read_text())
  module = sweep.load_config_module(str(path))
  for method, (value, source) in _reference_numbers(module).items():
    if source.startswith("RepDistiller"):
      pair = re.search(r"row (\w+ -> \w+)", source).group(1)
      column = re.search(r"(\w+) column", source).group(1)
      assert table["repdistiller", pair, column] == value, (method, source)
    elif "ImageNet" in source:
      row = re.search(r"row (.+?) \(top-5", source).group(1)
      error1, error5 = (float(x) for x in NUMBER.findall(source))
      assert table["imagenet", row, "top1"] == error1 and table["imagenet", row, "top5"] == error5, source
      assert value == pytest.approx(100.0 - error1)
    else:
      dataset = re.search(r"(CIFAR-10+)", source).group(1)
      row = re.search(r"of row (.+)$", source)
      row = row.group(1) if row else "teacher"
      assert table["paper", row, dataset] == pytest.approx(100.0 - value), (method, source)
