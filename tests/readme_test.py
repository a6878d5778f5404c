"""The README's "Using the kernels" snippet runs as written and prints sane values."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  if not blocks:
    pytest.fail("README.md has no python snippet")
  for block in blocks:
    exec(compile(block, str(README), "exec"), {})  # noqa: S102
  printed = capsys.readouterr().out.split()
  values = [float(v) for v in printed if re.fullmatch(r"-?\d+\.\d+(e-?\d+)?", v)]
  assert values and all(v >= 0 for v in values)
