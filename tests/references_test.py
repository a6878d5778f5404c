"""The published numbers in the configs: each config's `REFERENCE` data against the numbers its docstring
quotes, and both against the tables of `../shared/reference/nst-method.md` §8 (where that file exists).

Docstring forms (every published number has two decimals):
  RepDistiller rows   | `kd` | 0.1 CE + 0.9 KD (T = 4) | 73.33 |               accuracy
  paper CIFAR rows    | `kd` | CE + KD (T = 4) | 22.18 (77.82), row "KD" |     error (accuracy)
  paper ImageNet rows | `kd` | CE + KD | 24.56 / 7.35 (75.44 / 92.65) |       top-1 / top-5 error (accuracy)
  "Teacher: ..." lines and teacher configs' "Expected ...:" sentences, in the same three forms.
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


def _published(numbers: list[float]) -> dict:
  """Two-decimal numbers in the docstring's order -> {"top1": accuracy, ...}; errors must add up to 100."""
  if len(numbers) == 1:
    return {"top1": numbers[0]}
  if len(numbers) == 2:
    error, accuracy = numbers
    assert error + accuracy == pytest.approx(100.0, abs=1e-9), numbers
    return {"top1": accuracy, "error1": error}
  assert len(numbers) == 4, numbers
  error1, error5, accuracy1, accuracy5 = numbers
  assert error1 + accuracy1 == pytest.approx(100.0) and error5 + accuracy5 == pytest.approx(100.0), numbers
  return {"top1": accuracy1, "error1": error1, "error5": error5}


def docstring_numbers(doc: str) -> dict[str, dict]:
  """method (or "teacher") -> its published numbers, as the docstring states them."""
  found = {}
  for method, cell in re.findall(r"^\| `(\w+)` \|.*\| ([^|]*) \|$", doc, re.M):
    numbers = [float(x) for x in NUMBER.findall(cell)]
    if numbers:
      found[method] = _published(numbers)
    else:
      assert "no published number" in cell, cell
  teacher = re.search(r"^Teacher: (.*)$", doc, re.M)
  if teacher:
    found["teacher"] = _published([float(x) for x in NUMBER.findall(teacher.group(1))])
  expected = re.search(r"^Expected [a-z ]*(accuracy|error): (.*?)(?:\n\n|$)", doc, re.M | re.S)
  if expected and not found:  # A teacher config: one sentence, one run.
    count = 1 if expected.group(1) == "accuracy" else (4 if "top-5" in expected.group(2) else 2)
    numbers = [float(x) for x in NUMBER.findall(expected.group(2))][:count]
    if numbers and "no published number" not in expected.group(2).split(".")[0]:
      found["teacher config"] = _published(numbers)
  return found


def _reference_numbers(module) -> dict[str, tuple[float, str]]:
  reference = getattr(module, "REFERENCE", None)
  if isinstance(reference, tuple):
    return {"teacher config": reference}
  return dict(reference or {})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_reference_data_matches_the_docstring(path):
  module = sweep.load_config_module(str(path))
  quoted = docstring_numbers(module.__doc__)
  data = _reference_numbers(module)
  assert set(data) == set(quoted), f"data {sorted(data)} vs docstring {sorted(quoted)}"
  for method, (value, source) in data.items():
    assert isinstance(value, float) and value == quoted[method]["top1"], (method, value, quoted[method])
    assert source, method
    for kind in ("error1", "error5"):  # The source names the error it was computed from.
      if kind in quoted[method]:
        assert f"{quoted[method][kind]:.2f}" in source, (method, source)
  if not data:
    assert "no published number" in module.__doc__
  valid = set(getattr(module, "METHODS", ())) | {"teacher", "teacher config"}
  assert set(data) <= valid, set(data) - valid


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
@pytest.mark.parametrize("path", [p for p in CONFIGS if "REFERENCE" in p.read_text()], ids=lambda p: p.stem)
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
