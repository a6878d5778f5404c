"""The documentation as a user meets it: README.md, docs/*.md and results/*/README.md.

* README's first ```python block (the kernel snippet) runs as a script from a temporary directory, as a
  researcher who imports nst_jax into their own code would; every value it prints is checked against the
  NumPy double sums of tests/np_reference.py.
* Every other ```python block runs: a page's blocks in order, as one script (later blocks may use what
  earlier ones defined), from a temporary directory, except the blocks named in SKIP with the reason.
* Every ```bash block is parsed into command lines. The files a command names (a script, a `--config`
  file and the method after its colon, a `-r` requirements file, a path into the repository's folders)
  must exist, and each distinct program invoked (`nst-jax-train`, `python launch.py`, `python -m
  nst_jax...`, `bench/*.py`) must answer `--help` with exit status 0. Other programs must be installed.

Synopses with placeholders belong in ```text blocks, which are not run. The subprocesses run a few at a
time (see `_results`), so the module takes well under a minute on two cores.
"""

import concurrent.futures
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import np_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("results/*/README.md"))]

# Python blocks that are not run: {(page relative to the repository, text the block contains): reason}.
# For blocks that need a GPU, data that is not in the repository, or a long training run.
SKIP: dict[tuple[str, str], str] = {
    ("docs/own-models.md", "taps.Tapped(MyNet(num_classes=10)"):
        "a sketch: MyNet stands for the reader's model; example 1 on the same page runs these calls",
}

# Programs that do not answer --help in the nst_jax way, but must be installed: pip and venv set-up lines.
SETUP_PROGRAMS = ("pip", "pip3")
SHELL_PROGRAMS = ("cd", "export", "echo")
REPO_FOLDERS = ("configs/", "bench/", "notebooks/", "tests/", "results/", "docs/", "nst_jax/")
OUTPUT_OPTIONS = ("--workdir", "--root", "--out", "--export")  # What they name may not exist yet.
HELP_WORKERS = 4
TIMEOUT_S = 300


def _rel(page: pathlib.Path) -> str:
  return str(page.relative_to(ROOT))


def _blocks(page: pathlib.Path, language: str) -> list[str]:
  return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.S | re.M)


def _command_lines(block: str) -> list[str]:
  """A bash block's command lines: continuation lines joined, comments and blank lines dropped."""
  joined = re.sub(r"\\\n\s*", " ", block)
  return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _commands(line: str) -> list[list[str]]:
  """One line -> its simple commands (split at && || ; |), leading VAR=value assignments dropped."""
  commands, current = [], []
  for token in shlex.split(line, comments=True):
    if token in ("&&", "||", ";", "|"):
      commands.append(current)
      current = []
    else:
      current.append(token)
  commands.append(current)
  result = []
  for command in commands:
    while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
      command = command[1:]
    if command:
      result.append(command)
  return result


def _is_python(program: str) -> bool:
  return re.fullmatch(r"python3?(\.\d+)?", os.path.basename(program)) is not None


def _option_values(args: list[str], name: str) -> list[str]:
  """The values of `--name VALUE` and `--name=VALUE` in `args`."""
  values = [b for a, b in zip(args, args[1:], strict=False) if a == name]
  return values + [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]


def _check_command(command: list[str]) -> tuple[list[str], tuple[str, str] | None]:
  """(problems, the program to ask for --help or None) of one simple command."""
  program, args = command[0], command[1:]
  problems, help_target = [], None
  if _is_python(program):
    if args[:1] == ["-c"]:
      return problems, None
    if args[:1] == ["-m"]:
      module = args[1]
      if module == "pytest":
        problems += [f"missing test path {a}" for a in args[2:] if a.startswith("tests/")
                     and not (ROOT / a.split("::")[0]).exists()]
        return problems, None
      if module == "venv":
        return problems, None
      help_target = ("module", module)
    else:
      script = args[0]
      if not (ROOT / script).is_file():
        problems.append(f"missing script {script}")
      help_target = ("script", script)
  elif os.path.basename(program) == "nst-jax-train":
    help_target = ("console", "nst-jax-train")
  elif os.path.basename(program) in SETUP_PROGRAMS:
    problems += [f"missing requirements file {f}" for f in _option_values(args, "-r")
                 if not (ROOT / f).is_file()]
  elif program not in SHELL_PROGRAMS and not (shutil.which(program) or shutil.which(
      os.path.basename(program), path=str(pathlib.Path(sys.executable).parent))):
    problems.append(f"program {program!r} is not installed")

  for value in _option_values(args, "--config"):
    path, _, method = value.partition(":")
    if not (ROOT / path).is_file():
      problems.append(f"missing config {path}")
    elif method:
      from nst_jax.trainer import config_lib  # noqa: PLC0415 -- JAX is up by now (conftest).

      try:  # The argument after the colon is get_config's: the config decides what it accepts.
        config_lib.load_config_file(f"{ROOT / path}:{method}")
      except config_lib.ConfigError as error:
        problems.append(f"{path}:{method}: {error}")
  for previous, arg in zip(["", *args], args, strict=False):
    value = arg.split("=", 1)[-1]
    is_output = previous in OUTPUT_OPTIONS or arg.split("=", 1)[0] in OUTPUT_OPTIONS
    if value.startswith(REPO_FOLDERS) and not is_output and not (ROOT / value.split(":")[0]).exists():
      problems.append(f"missing path {value}")
  return problems, help_target


def _bash_commands() -> list[tuple[str, str, list[str]]]:
  """(page, line, command) of every command of every bash block."""
  found = []
  for page in PAGES:
    for block in _blocks(page, "bash"):
      for line in _command_lines(block):
        found += [(_rel(page), line, command) for command in _commands(line)]
  return found


def _help_targets() -> list[tuple[str, str]]:
  targets = {_check_command(command)[1] for _, _, command in _bash_commands()}
  return sorted(t for t in targets if t is not None)


def _page_script(page: pathlib.Path) -> tuple[str, list[str]]:
  """(the page's python blocks to run, joined; the reasons of those skipped)."""
  blocks = _blocks(page, "python")
  if page.name == "README.md" and page.parent == ROOT:
    blocks = blocks[1:]  # The kernel snippet has its own test, with its values checked.
  kept, reasons = [], []
  for block in blocks:
    reason = next((why for (where, text), why in SKIP.items() if where == _rel(page) and text in block), None)
    if reason:
      reasons.append(reason)
    else:
      kept.append(block)
  return "\n".join(kept), reasons


def _python_pages() -> list[str]:
  return [_rel(page) for page in PAGES if _page_script(page)[0].strip() or _page_script(page)[1]]


def _clean_env(home: pathlib.Path) -> dict[str, str]:
  """No PYTHONPATH and no repository on the path: nst_jax must import because it is installed. XLA's
  optimisation passes are off (the values are the same; they would take half of the scripts' time)."""
  return {"PATH": f"{pathlib.Path(sys.executable).parent}:/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
          "HOME": str(home), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def _help_job(target: tuple[str, str]):
  kind, name = target
  if kind == "module":
    argv = [sys.executable, "-m", name, "--help"]
  elif kind == "script":
    argv = [sys.executable, name, "--help"]
  else:
    argv = [str(pathlib.Path(sys.executable).parent / name), "--help"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return lambda: subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _script_job(script: str, workdir: pathlib.Path):
  def run():
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "page.py"
    path.write_text(script)
    return subprocess.run([sys.executable, str(path)], cwd=workdir, env=_clean_env(workdir),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  return run


@pytest.fixture(scope="module")
def _results(request, tmp_path_factory):
  """Runs the subprocesses the selected tests need, a few at a time; {job: CompletedProcess}."""
  jobs = {}
  for item in request.session.items:
    job = getattr(item, "callspec", None) and item.callspec.params.get("job")
    if pathlib.Path(str(item.path)) != pathlib.Path(__file__) or job is None or job in jobs:
      continue
    kind, name = job
    if kind == "help":
      jobs[job] = _help_job(name)
    elif kind == "snippet":
      jobs[job] = _script_job(_blocks(ROOT / "README.md", "python")[0], tmp_path_factory.mktemp("snippet"))
    else:
      jobs[job] = _script_job(_page_script(ROOT / name)[0], tmp_path_factory.mktemp("page"))
  with concurrent.futures.ThreadPoolExecutor(HELP_WORKERS) as pool:
    futures = {job: pool.submit(run) for job, run in jobs.items()}
    return {job: future.result() for job, future in futures.items()}


@pytest.mark.parametrize("job", [("snippet", "README.md")], ids=["readme-kernel-snippet"])
def test_readme_snippet_runs_as_a_script_from_anywhere(job, _results):
  proc = _results[job]
  assert proc.returncode == 0, ("run `pip install -e .` (the README's set-up) first?\n" + proc.stderr)
  printed = dict(re.findall(r"^(\w+) = (.+)$", proc.stdout, re.M))
  assert set(printed) == {"nst_polynomial", "nst_grad_shape", "mmd2_gaussian", "mmd2_linear_unbiased",
                          "mmd2_polynomial_x_x", "kd_uniform"}, proc.stdout

  key_s, key_t = jax.random.split(jax.random.key(0))  # the snippet's inputs, rebuilt here
  student = np.maximum(np.asarray(jax.random.normal(key_s, (8, 16, 16, 32))), 0)
  teacher = np.maximum(np.asarray(jax.random.normal(key_t, (8, 16, 16, 64))), 0)
  x = np.asarray(jax.random.normal(key_s, (10, 5)))
  y = np.asarray(jax.random.normal(key_t, (7, 5))) + 1.0
  np.testing.assert_allclose(float(printed["nst_polynomial"]), np_reference.nst(student, teacher), rtol=1e-4)
  assert printed["nst_grad_shape"] == "(8, 16, 16, 32)"
  sigma2 = np_reference.sigma2_heuristic(x, y)
  np.testing.assert_allclose(float(printed["mmd2_gaussian"]),
                             np_reference.mmd2(x, y, "gaussian", sigma2=sigma2), rtol=1e-4)
  np.testing.assert_allclose(float(printed["mmd2_linear_unbiased"]),
                             np_reference.mmd2(x, y, "linear", unbiased=True), rtol=1e-4, atol=1e-6)
  assert abs(float(printed["mmd2_polynomial_x_x"])) < 1e-5
  assert abs(float(printed["kd_uniform"])) < 1e-6


@pytest.mark.parametrize("job", [("page", page) for page in _python_pages()], ids=_python_pages())
def test_python_blocks_run(job, _results):
  _, page = job
  script, skipped = _page_script(ROOT / page)
  if not script.strip():
    pytest.skip("; ".join(skipped))
  proc = _results[job]
  assert proc.returncode == 0, f"{page}: its python blocks failed:\n{proc.stderr[-4000:]}"


def test_skip_entries_name_existing_blocks():
  for (page, text), reason in SKIP.items():
    assert reason.strip(), f"SKIP entry for {page} needs a reason"
    assert any(text in block for block in _blocks(ROOT / page, "python")), (
        f"SKIP names a block of {page} containing {text!r}, which no python block there contains")


@pytest.mark.parametrize("page, line, command", _bash_commands(),
                         ids=[f"{page}:{' '.join(command)[:60]}" for page, _, command in _bash_commands()])
def test_bash_command_names_existing_files(page, line, command):
  problems, _ = _check_command(command)
  assert not problems, f"{page}: `{line}`: {'; '.join(problems)}"


@pytest.mark.parametrize("job", [("help", target) for target in _help_targets()],
                         ids=[" ".join(target) for target in _help_targets()])
def test_program_answers_help(job, _results):
  proc = _results[job]
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"{' '.join(job[1])} --help exited {proc.returncode}:\n{output[-2000:]}"
  assert "--" in output, output[-2000:]  # it listed its flags


def test_docs_and_readme_have_commands_to_check():
  """The parser found what the pages hold (a regex that matched nothing would pass every test above)."""
  programs = {name for _, name in _help_targets()}
  assert {"nst-jax-train", "nst_jax.tools.sweep", "nst_jax.tools.viz", "nst_jax.tools.convert",
          "nst_jax.tools.evaluate"} <= programs, programs
  assert any(page.startswith("docs/") for page in _python_pages())
