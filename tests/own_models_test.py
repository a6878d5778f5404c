"""The own-models guide (docs/own-models.md), run from the guide's own text: example 1 (NST in a plain
Flax + optax step), the tap listing, and example 2 (a user's teacher and student, outside the package, on
PYTHONPATH, distilled by the command with its teacher stage); then the user's BatchNorm teacher resumed
bitwise from a mid-epoch checkpoint, and the config checks for import paths and module-path layers that
run before any stage trains."""

import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from nst_jax import models, taps
from nst_jax.tools import taps as taps_cli
from nst_jax.trainer import checkpoints, config_lib, train_loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "own-models.md"
EXAMPLES = ROOT / "examples" / "own_models"


def _block(heading: str, lang: str, containing: str = "") -> str:
  """The first ```lang block after `heading` in the guide (that contains `containing`)."""
  text = GUIDE.read_text()
  start = text.index(heading)
  for match in re.finditer(rf"```{lang}\n(.*?)```", text[start:], re.S):
    if containing in match.group(1):
      return match.group(1)
  raise AssertionError(f"no {lang} block with {containing!r} after {heading!r} in {GUIDE}")


def _command(block: str) -> tuple[dict, list[str]]:
  """(environment assignments, argv) of the one command line in a bash block."""
  words = shlex.split(block.replace("\\\n", " "))
  env = {}
  while "=" in words[0] and not words[0].startswith("-"):
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  return env, words


def test_example_1_plain_flax_step_runs_and_learns():
  namespace = {}
  exec(compile(_block("## Example 1", "python"), f"{GUIDE}:example-1", "exec"), namespace)  # noqa: S102
  history = namespace["history"]
  assert len(history) == 10 and all(np.isfinite(history))
  assert history[-1] < 0.5 * history[0]
  # The NST term the step adds is the guide's: the student's and teacher's `block2` taps.
  s_feats = namespace["student"].apply(namespace["variables"], namespace["x"])[1]["block2"]
  assert s_feats.shape == (32, 8, 8, 16)


def test_tap_listing_command_prints_what_the_guide_shows(monkeypatch, capsys):
  env, argv = _command(_block("## Feature taps", "bash", "nst_jax.tools.taps"))
  assert argv[:3] == ["python", "-m", "nst_jax.tools.taps"]
  monkeypatch.syspath_prepend(str(ROOT / env["PYTHONPATH"]))
  assert taps_cli.main(argv[3:]) == 0
  expected = _block("## Feature taps", "text", "ConvBlock_0/conv")
  assert capsys.readouterr().out == expected


@pytest.fixture
def examples_on_path(monkeypatch):
  monkeypatch.syspath_prepend(str(EXAMPLES))
  yield
  sys.modules.pop("my_models", None)


def _example_config(**overrides):
  config = config_lib.load_config_file(str(EXAMPLES / "kd_nst.py") + ":quick")
  return config_lib.apply_overrides(config, overrides)


@pytest.mark.parametrize("overrides,match", [
    ({"distill.nst.layers": "ConvBlock_0/cnv:block1"},
     r"config.distill.nst: student layer 'ConvBlock_0/cnv' is not a tap of the student model "
     r"'my_models:Student'. Did you mean: 'ConvBlock_0/conv'.*Available taps: ConvBlock_0/conv, "),
    ({"distill.nst.layers": "ConvBlock_0:blok1"},
     r"config.distill.nst: teacher layer 'blok1' is not a tap of the teacher model 'my_models:Teacher'. "
     r"Did you mean: 'block1'"),
    ({"distill.at.weight": 1.0, "distill.at.layers": "stage1:block1"},
     r"config.distill.at: student layer 'stage1' is not a tap"),
    ({"student.model": "my_models:Studnt"},
     r"config.student.model: Model 'my_models:Studnt': module 'my_models' .* has no attribute 'Studnt'. "
     r"Did you mean: Student\?"),
    ({"teacher.model": "their_models:Teacher"},
     r"config.teacher.model: Model 'their_models:Teacher': no module named 'their_models'; put the folder "
     r"that holds it on PYTHONPATH"),
    ({"student.model": "my_models.Student"}, r"config.student.model: unknown value 'my_models.Student'"),
])
def test_bad_models_and_layers_fail_before_any_stage(examples_on_path, tmp_path, overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    train_loop.plan(_example_config(**overrides), str(tmp_path / "own_kd_nst"))
  assert not any(tmp_path.iterdir())  # nothing trained, no workdir made


def test_build_model_wraps_with_the_pairs_taps(examples_on_path, tmp_path, monkeypatch):
  config = _example_config()
  assert [s.name for s in train_loop.plan(config, str(tmp_path / "own_kd_nst"))] == ["teacher", "student"]
  student = train_loop.build_model(config, "student", 10, (16, 16, 1))
  teacher = train_loop.build_model(config, "teacher", 10, (16, 16, 1))
  assert isinstance(student, taps.Tapped) and student.taps == ("ConvBlock_0", "ConvBlock_1")
  assert teacher.taps == ("block1", "block2")
  assert models.tap_shapes(teacher, (16, 16, 1)) == {"block1": (16, 16, 16), "block2": (8, 8, 32)}
  # A model without `train` and with a fixed class count: the count is checked against the data's.
  (tmp_path / "fixed_models.py").write_text(textwrap.dedent("""
      import flax.linen as nn

      class NoTrain(nn.Module):
        @nn.compact
        def __call__(self, x):
          return nn.Dense(3)(nn.relu(nn.Conv(4, (3, 3))(x)).mean(axis=(1, 2)))
      """))
  monkeypatch.syspath_prepend(str(tmp_path))
  plain = config_lib.apply_overrides(config_lib.load_config_file(str(EXAMPLES / "teacher.py")),
                                     {"student.model": "fixed_models:NoTrain"})
  model = train_loop.build_model(plain, "student", 3, (16, 16, 1))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  variables = model.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, model.apply(variables, x, train=True),
               model.apply(variables, x, train=False))
  with pytest.raises(config_lib.ConfigError, match=r"its output for one image of shape \(16, 16, 1\) is "
                                                   r"\(1, 3\), not the logits \(1, 10\)"):
    train_loop.build_model(plain, "student", 10, (16, 16, 1))
  sys.modules.pop("fixed_models", None)


# ----------------------------------------------------------------------------------------------------
# Example 2, as the guide gives it, and the user's teacher resumed bitwise.


def _run(argv: list[str], env_extra: dict, cwd) -> subprocess.CompletedProcess:
  if argv[0] == "nst-jax-train":  # the console script of `nst_jax.tools.cli:run`, as `python -m nst_jax`
    argv = [sys.executable, "-m", "nst_jax", *argv[1:]]
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **env_extra}  # one CPU device
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
  """The guide's example-2 command, its workdir moved to a temporary folder."""
  root = tmp_path_factory.mktemp("own_models")
  env, argv = _command(_block("## Example 2", "bash", "nst-jax-train"))
  workdir = argv.index("--workdir") + 1
  argv[workdir] = str(root / pathlib.Path(argv[workdir]).name)
  done = _run(argv, {"PYTHONPATH": str(ROOT / env["PYTHONPATH"])}, ROOT)
  return root, done


def _variables(workdir, name):
  sys.path.insert(0, str(EXAMPLES))
  try:
    template = models.variables_template(models.get_model(name, 10), (16, 16, 1))
  finally:
    sys.path.remove(str(EXAMPLES))
  return checkpoints.load_variables(str(workdir), template)


@pytest.mark.slow
def test_example_2_trains_the_users_teacher_then_distils(example_run):
  root, done = example_run
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  out = done.stdout + done.stderr
  assert out.index("nst_jax teacher stage") < out.index("nst_jax student stage")
  teacher, student = root / "own_teacher", root / "own_kd_nst"
  results = json.loads((student / "results.json").read_text())
  assert results["finished"] and json.loads((teacher / "results.json").read_text())["finished"]
  assert results["teacher"]["count"] == 359  # the user's teacher, evaluated as the student's teacher
  terms = results["epochs"][-1]["train"]
  assert {"train_nst_ConvBlock_0-block1_loss", "train_nst_ConvBlock_1-block2_loss", "train_kd_loss"} <= set(
      terms) and all(np.isfinite(list(terms.values())))
  assert json.loads((student / "config.json").read_text())["student"]["model"] == "my_models:Student"
  digest = hashlib.sha256((EXAMPLES / "my_models.py").read_bytes()).hexdigest()
  record = json.loads((student / "run.json").read_text())["models"]
  assert record == {role: {"name": f"my_models:{role.title()}", "module": "my_models", "sha256": digest,
                           "file": str(EXAMPLES / "my_models.py")} for role in ("student", "teacher")}
  assert set(json.loads((teacher / "run.json").read_text())["models"]) == {"student"}
  assert json.loads((student / "config.json").read_text())["imported_models"] == record  # beside the config


@pytest.mark.slow
def test_the_users_batchnorm_teacher_resumes_bitwise(example_run, tmp_path):
  root, done = example_run
  assert done.returncode == 0, done.stdout[-3000:]
  finished = root / "own_teacher"
  resumed = tmp_path / "own_teacher"
  shutil.copytree(finished, resumed)
  steps = sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [10, 20, 22]
  for step in steps[1:]:  # Back to the state of a run stopped at step 10.
    shutil.rmtree(resumed / "checkpoints" / str(step))
  for name in ("results.json", "run.json"):
    (resumed / name).unlink()
  again = _run([sys.executable, "-m", "nst_jax", "--config", str(EXAMPLES / "teacher.py") + ":quick",
                "--workdir", str(resumed)], {"PYTHONPATH": str(EXAMPLES)}, tmp_path)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert "resumed from step 10" in again.stdout + again.stderr
  a, b = _variables(finished, "my_models:Teacher"), _variables(resumed, "my_models:Teacher")
  assert jax.tree.structure(a) == jax.tree.structure(b) and "batch_stats" in a
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_viz_draws_the_users_models(example_run, tmp_path):
  """viz reads a run of the user's models: MMD^2 per layer at the config's module-path pairs."""
  root, done = example_run
  assert done.returncode == 0, done.stderr[-3000:]
  argv = [sys.executable, "-m", "nst_jax.tools.viz", "mmd", "--workdir", str(root / "own_kd_nst"),
          "--out", str(tmp_path)]
  drawn = _run(argv, {"PYTHONPATH": str(EXAMPLES)}, ROOT)
  assert drawn.returncode == 0, drawn.stdout[-3000:] + drawn.stderr[-3000:]
  numbers = json.loads((tmp_path / "mmd.json").read_text())
  text = json.dumps(numbers)
  assert "ConvBlock_0:block1" in text and "ConvBlock_1:block2" in text
  assert (tmp_path / "mmd.png").stat().st_size > 0
