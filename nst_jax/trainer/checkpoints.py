"""Checkpoints: the training state and its JSON metadata under `<workdir>/checkpoints`, and preemption.

Owns everything that touches checkpoint files:

* `Checkpointer`, a thin layer over Orbax's `CheckpointManager` (`args=` API). One checkpoint per saved
  step, a Composite of two items: `state`, any pytree of arrays (StandardSave), and `metadata`, a JSON
  dict (JsonSave) for what is not an array: the data position, a config hash, ... Saves happen every
  `save_every_steps` steps (or when forced), asynchronously by default, and the last `keep` are kept.
* Restoring onto a template: the template's structure, shapes and dtypes are compared with the
  checkpoint's stored tree metadata first, so a checkpoint that does not fit is a `ValueError` naming
  every mismatching entry; then the arrays come back with the template's shardings and dtypes.
* Damaged checkpoints (`restore_newest_readable`): a checkpoint that fails to read (a truncated data
  file, a missing metadata file, ...) is moved aside to `<step>.damaged` (never deleted, so it can be
  inspected) and the next older one is tried; when none is left that reads, `DamagedCheckpoints` says so
  (a run never starts from scratch beside checkpoints it could not read). A checkpoint that reads but
  does not fit the template (`CheckpointMismatch`, a config change) is not damage: it is moved nowhere.
* `load_variables`: only `params` and `batch_stats` of the latest checkpoint of a run (a teacher for a
  student, a finished run for evaluation). The teacher is never part of the student's `state`; it is
  read from its own workdir. A teacher checkpoint that fails to read is a `CheckpointReadError` naming
  the run (never a silent fallback to an older or no teacher).
* A SIGTERM handler that sets a flag the training loop polls (`preemption_requested()`).

Atomicity: on a local or POSIX filesystem Orbax writes step N to `N.orbax-checkpoint-tmp` and renames it to
`N` only after every item, the step metadata and `commit_success.txt` are written (on GCS, where renames are
not atomic, Orbax relies on that commit file instead; not tested here). Temporary directories are never
listed as steps, and a `Checkpointer` deletes leftovers in a background thread it starts on creation
(finished at the latest before its first save). A process killed at any moment (SIGKILL, OOM killer)
therefore leaves the previous complete checkpoints intact, and a resume starts from the last one committed
(tests/checkpoints_test.py kills a child in the middle of writing a step to check it). One window is not
atomic: dropping the checkpoint beyond `keep` is a plain recursive delete, done after the newer step is
committed, so a kill just then can leave that oldest step partly deleted yet listed until the next save
drops it again. The latest step, the one a resume reads, is never affected.

Cadence: every `save_every_steps` steps, and also when `save_every_minutes` have passed since the last
save (the training loop adds epoch ends and the final step), so a crash loses minutes, not most of a run.
In a multi-process run every process must save the same steps: the time rule is decided by process 0 and
broadcast, every `time_check_every` steps.

Random keys: a state holding a typed PRNG key is rejected; store `jax.random.key_data(key)` and rebuild
the key with `jax.random.wrap_key_data` after restoring.
"""

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

PyTree = Any

CHECKPOINT_DIR = "checkpoints"
DAMAGED_SUFFIX = ".damaged"  # `<step>.damaged`: a checkpoint that failed to read, moved aside.
_MAX_LISTED = 40  # Mismatching entries named in the error.


class CheckpointMismatch(ValueError):
  """A checkpoint that reads but does not fit the template (another model or optimizer)."""


class CheckpointReadError(Exception):
  """A checkpoint that exists but cannot be read; the message is one line naming it and what to do."""


class DamagedCheckpoints(CheckpointReadError):
  """Every checkpoint of a run failed to read and was moved aside: nothing is left to resume from."""


def last_line(error: BaseException) -> str:
  """`error`'s type and the last non-empty line of its message (TensorStore's errors run to pages)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  line = re.sub(r"\s*\[tensorstore_spec=.*$", "", lines[-1]) if lines else ""  # a page of JSON
  line = line if len(line) <= 1000 else line[:1000] + " ..."
  return f"{type(error).__name__}: {line}".rstrip(": ")


def _ignore_closed_loop_callbacks() -> None:
  """Drops one harmless report from the process's unraisable-exception hook, from now on.

  When a read of a damaged checkpoint fails, Orbax closes its event loop while TensorStore still has
  reads of the other files in flight; as each finishes, its callback finds the loop closed and Python
  prints a `RuntimeError: Event loop is closed` traceback, dozens of them, after the run has already
  reported the damage and gone on. Only that exact report (no object, that type and message) is dropped;
  everything else reaches the hook that was there before. Idempotent.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_nst_jax_closed_loop_filter", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if (unraisable.object is None and isinstance(error, RuntimeError)
        and str(error) == "Event loop is closed"):
      return
    previous(unraisable)

  hook._nst_jax_closed_loop_filter = True
  sys.unraisablehook = hook


class _UnretrievedReadErrors(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports of errors that name a checkpoint being
  read (`<checkpoint>/...` in their message).

  Orbax reads a checkpoint's arrays as concurrent asyncio tasks; when one fails on a damaged file, the
  first error is raised (and reported by the caller, in one line) while the siblings' errors, about the
  same checkpoint's other files, are never awaited. When those tasks are collected, asyncio logs each
  with its traceback, at a moment that depends on the garbage collector. Reports of any other error pass.
  """

  def __init__(self):
    super().__init__()
    self.checkpoints: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is None or not str(record.msg).startswith("Task exception was never retrieved"):
      return True
    text = str(error)
    return not any(f"{path}/" in text for path in self.checkpoints)


_unretrieved_read_errors = _UnretrievedReadErrors()


def _quiet_unretrieved_read_errors(checkpoint: str | os.PathLike) -> None:
  """From now on, asyncio's reports of unawaited read errors of `checkpoint` (a step's directory) are
  dropped (see `_UnretrievedReadErrors`). Call before reading it: the reports may come before or after
  the read's own error."""
  logger = logging.getLogger("asyncio")
  if _unretrieved_read_errors not in logger.filters:
    logger.addFilter(_unretrieved_read_errors)
  _unretrieved_read_errors.checkpoints.add(os.fspath(checkpoint).rstrip("/"))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`<workdir>/checkpoints` as an absolute path (Orbax rejects relative ones); URLs are kept as given."""
  workdir = os.fspath(workdir)
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir)) / CHECKPOINT_DIR


class Checkpointer:
  """Saves and restores the training state of one run (a context manager; `close()` when done).

  Args:
    workdir: the run's directory; checkpoints go to `<workdir>/checkpoints`.
    save_every_steps: `save` writes only at multiples of this (unless forced or by the time rule).
    save_every_minutes: also save when this long has passed since the last save (or since creation);
      0 or None: no time rule.
    keep: how many of the latest checkpoints to keep (None: all).
    async_save: write in a background thread; `save` returns after the arrays are copied to host
      memory, so the caller may donate or overwrite the state right away.
    clock: seconds, monotonic (tests pass a fake one).
    time_check_every: in multi-process runs, how often (steps) process 0's clock is consulted.
  """

  def __init__(self, workdir: str | os.PathLike, *, save_every_steps: int, keep: int | None = 3,
               save_every_minutes: float | None = None, async_save: bool = True,
               clock: Callable[[], float] = time.monotonic, time_check_every: int = 10):
    if save_every_steps < 1:
      raise ValueError(f"save_every_steps must be >= 1, got {save_every_steps}")
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None, got {keep}")
    options = ocp.CheckpointManagerOptions(
        # Orbax's default also saves on the first call of a fresh run (InitialSavePolicy): not wanted.
        # Preemption is checked by `should_save` itself, once per step (see `reached_preemption`).
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(save_every_steps),
        preservation_policy=checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    # Registered up front so that a new process can read metadata and restore before its first save.
    for item, args in (("state", ocp.args.StandardSave), ("state", ocp.args.StandardRestore),
                       ("metadata", ocp.args.JsonSave), ("metadata", ocp.args.JsonRestore)):
      registry.add(item, args)
    self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, handler_registry=registry)
    self._interval_s = 60.0 * save_every_minutes if save_every_minutes else None
    self._clock, self._time_check_every = clock, time_check_every
    self._last_save_time = clock()
    self._preempted_at = None

  @property
  def directory(self) -> epath.Path:
    return self._manager.directory

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints on disk (and of a save in flight), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The latest saved step, None if there is no checkpoint (a fresh run)."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without `force` would write (lets the caller skip gathering metadata).
    Call it once per step: in multi-host runs it is also JAX's preemption sync point."""
    step = int(step)
    if jax.process_count() == 1:
      preempted = preemption_requested()
    else:  # JAX's sync point must be asked exactly once per step, by every process.
      preempted = self._manager.reached_preemption(step)
    self._preempted_at = step if preempted else None
    return preempted or self._manager.should_save(step) or self._time_is_up(step)

  def _time_is_up(self, step: int) -> bool:
    if self._interval_s is None:
      return False
    if jax.process_count() == 1:
      return self._clock() - self._last_save_time >= self._interval_s
    if step % self._time_check_every:
      return False
    due = np.asarray(self._clock() - self._last_save_time >= self._interval_s, np.int32)
    return bool(multihost_utils.broadcast_one_to_all(due))  # Process 0's clock decides for all.

  def save(self, step: int, state: PyTree, metadata: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Saves `state` and `metadata` as step `step` if it is a save step, or always with `force`.

    Without `force` it asks `should_save(step)`: a caller that decides itself (the training loop) calls
    `should_save` once per step and then `save(..., force=True)`, since in multi-host runs the save
    policy must see every step exactly once to catch JAX's preemption sync point. `state` is a pytree of
    arrays; `metadata` must be JSON-serialisable and is copied now, so the caller may change it afterwards.
    Returns whether a save was started. A step that is already saved is skipped
    (the final forced save may coincide with a periodic one).
    """
    step = int(step)
    if step in self._manager.all_steps() or not (force or self.should_save(step)):
      return False
    _reject_typed_keys(state, "state")
    try:
      metadata = json.loads(json.dumps(dict(metadata or {})))
    except TypeError as e:  # Raised here, not later in the background thread.
      raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata))
    self._last_save_time = self._clock()
    return self._manager.save(step, args=args, force=True)  # Already decided: don't ask the policy twice.

  def restore(self, template_state: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Restores `(state, metadata)` of `step` (default: the latest) onto `template_state`.

    The template is the state a fresh run would start from (concrete arrays, or `jax.ShapeDtypeStruct`s
    with shardings): the result has its structure, dtypes and shardings. A checkpoint that does not fit
    it raises a ValueError naming the missing, unexpected and mismatching entries.
    """
    _reject_typed_keys(template_state, "template_state")
    _ignore_closed_loop_callbacks()  # Before the read: the callbacks may come before its error does.
    self._manager.wait_until_finished()  # A step still being written is listed but not readable.
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; saved steps: "
                              f"{self.all_steps()}.")
    _quiet_unretrieved_read_errors(self.directory / str(step))
    stored = self._manager.metadata(step).item_metadata["state"].tree
    check_fits(template_state, stored, f"checkpoint {self.directory / str(step)}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template_state), metadata=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["metadata"] or {})

  def damaged(self) -> list[str]:
    """Names of the checkpoints moved aside as damaged (`<step>.damaged`, ...), oldest step first."""
    if not self.directory.is_dir():
      return []
    names = [p.name for p in self.directory.iterdir() if DAMAGED_SUFFIX in p.name]
    return sorted(names, key=lambda n: (int(n.split(".")[0]) if n.split(".")[0].isdigit() else -1, n))

  def restore_newest_readable(self, template_state: PyTree, on_damaged: Callable[[int, str, str], None]
                              ) -> tuple[PyTree, dict[str, Any], int] | None:
    """`(state, metadata, step)` of the newest checkpoint that reads, None when there is none at all.

    Each newer checkpoint that fails to read is moved aside to `<step>.damaged` (see `move_aside`) and
    reported as `on_damaged(step, new path, last line of the error)` first. Raises `DamagedCheckpoints`
    when checkpoints exist or existed (moved aside now or by an earlier run) but none reads, and
    `CheckpointMismatch` (untouched) when one reads but does not fit `template_state`.
    """
    self._manager.wait_until_finished()
    while (step := self.latest_step()) is not None:
      try:
        state, metadata = self.restore(template_state, step)
        return state, metadata, step
      except CheckpointMismatch:
        raise
      except Exception as error:  # noqa: BLE001 -- any failure to read a checkpoint is damage to it.
        on_damaged(step, str(self.move_aside(step)), last_line(error))
    if damaged := self.damaged():
      raise DamagedCheckpoints(
          f"No checkpoint in {self.directory} can be read (moved aside: {', '.join(damaged)}); the run "
          "stops rather than train again from scratch beside them: delete them (or the workdir) to start "
          "over.")
    return None

  def move_aside(self, step: int) -> epath.Path:
    """Renames checkpoint `step` to `<step>.damaged` (`<step>.damaged.1`, ... when that exists) and
    returns the new path; Orbax lists it no more. In a multi-process run process 0 renames it and the
    others wait for it."""
    source = self.directory / str(int(step))
    target = self.directory / f"{int(step)}{DAMAGED_SUFFIX}"
    n = 0
    while target.exists():
      n += 1
      target = self.directory / f"{int(step)}{DAMAGED_SUFFIX}.{n}"
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"nst_jax: checkpoint {step} moved aside")
    self._manager.reload()  # Its list of steps is cached.
    return target

  def reached_preemption(self, step: int) -> bool:
    """Whether the run must save `step` and stop, as found by `should_save(step)` (call that first):
    the signal flag in a single-process run; in a multi-process run JAX's preemption sync point, the
    same step on every process."""
    return self._preempted_at == int(step)

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight (if any) is committed; re-raises its error."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight and releases Orbax's threads. Call before the process exits."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def load_variables(workdir: str | os.PathLike, template_variables: PyTree, *,
                   role: str = "teacher") -> PyTree:
  """`params` and `batch_stats` from the latest checkpoint of the run in `workdir` (`role` names the run
  in errors: "teacher", "run", ...).

  `template_variables` is the model's variables (`{'params': ..., 'batch_stats': ...}`, e.g.
  from `model.init` or `jax.eval_shape` with shardings): the result has its structure, dtypes and
  shardings. Only those collections are read; the optimizer state stays on disk. The
  run must have saved its state with top-level `params` and `batch_stats` entries (as a `Checkpointer`
  of the trainer does). Raises FileNotFoundError if the run has no checkpoint yet (it has to be
  trained first) and ValueError if its checkpoint does not fit the template.
  """
  _reject_typed_keys(template_variables, "template_variables")
  _ignore_closed_loop_callbacks()
  directory = checkpoint_dir(workdir)
  missing = FileNotFoundError(
      f"No {role} checkpoint in {directory}: the {role} has to be trained first, with its own config and "
      f"--workdir={workdir}.")
  if not directory.is_dir():
    raise missing
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeRestore)  # PyTreeRestore can read a subset of the saved tree.
  registry.add("metadata", ocp.args.JsonRestore)  # Registered so that Orbax does not warn about it.
  # Not `read_only=True`: that only adds warnings; this manager never saves (and creates nothing).
  options = ocp.CheckpointManagerOptions(create=False)
  with ocp.CheckpointManager(directory, options=options, handler_registry=registry) as manager:
    step = manager.latest_step()
    if step is None:
      raise missing
    _quiet_unretrieved_read_errors(directory / str(step))
    try:
      stored = manager.metadata(step).item_metadata["state"].tree
      # Compare only the collections the teacher needs, so optimizer state and step are not "unexpected".
      wanted = {k: v for k, v in stored.items() if k in template_variables}
      check_fits(template_variables, wanted, f"{role} checkpoint {directory / str(step)}")
      restore_args = ocp.checkpoint_utils.construct_restore_args(template_variables)  # Its shardings.
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=template_variables, restore_args=restore_args, partial_restore=True)))
    except CheckpointMismatch:
      raise
    except Exception as error:  # noqa: BLE001 -- a checkpoint that does not read, whatever the layer says.
      raise CheckpointReadError(
          f"The {role} checkpoint {directory / str(step)} cannot be read ({last_line(error)}): the {role} "
          f"run in {workdir} is damaged; train it again there (move its {CHECKPOINT_DIR} folder aside "
          f"first) or point to another finished {role} run.") from error
  return restored["state"]


def check_fits(template: PyTree, stored_tree: PyTree, where: str) -> None:
  """Raises CheckpointMismatch (a ValueError) if `stored_tree` (Orbax tree metadata) does not fit
  `template`, naming every entry.

  Entries are compared by their '/'-joined key paths (dict keys, attribute names, sequence indices), the
  same names Orbax stores, so a flax struct or optax NamedTuple template matches its saved form.
  """
  want = ocp.tree.to_flat_dict(template, sep="/")
  have = ocp.tree.to_flat_dict(stored_tree, sep="/")
  problems = [f"  missing in the checkpoint: {k}" for k in want if k not in have]
  problems += [f"  unexpected in the checkpoint: {k}" for k in have if k not in want]
  for key in want.keys() & have.keys():
    w_shape, w_dtype = _shape_dtype(want[key])
    h_shape, h_dtype = _shape_dtype(have[key])
    if h_shape is not None and w_shape != h_shape:
      problems.append(f"  {key}: shape {w_shape} expected, {h_shape} in the checkpoint")
    elif w_dtype is not None and h_dtype is not None and w_dtype != h_dtype:
      problems.append(f"  {key}: dtype {w_dtype} expected, {h_dtype} in the checkpoint")
  if problems:
    problems.sort()
    if len(problems) > _MAX_LISTED:  # A different architecture would list every parameter.
      problems[_MAX_LISTED:] = [f"  ... and {len(problems) - _MAX_LISTED} more"]
    raise CheckpointMismatch(f"The {where} does not fit the configured model/state; mismatching entries:\n"
                     + "\n".join(problems))


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...] | None, np.dtype | None]:
  """Shape and dtype of an array-like leaf or Orbax metadata entry; Python scalars have no fixed dtype."""
  if isinstance(leaf, int | float | bool | complex):
    return (), None
  shape = getattr(leaf, "shape", None)
  dtype = getattr(leaf, "dtype", None)
  return (tuple(shape) if shape is not None else None), (np.dtype(dtype) if dtype is not None else None)


def _reject_typed_keys(tree: PyTree, name: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      raise TypeError(f"{name}{jax.tree_util.keystr(path)} is a typed PRNG key: store "
                      "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data.")


# Preemption. SIGTERM is what schedulers (Slurm, Kubernetes, preemptible VMs) send before killing a job,
# SIGINT what Ctrl-C sends; the handler only sets a flag, because saving from inside a signal handler could
# interrupt a half-done device step. SIGKILL cannot be caught: after one, a resume starts from the last
# committed checkpoint. Multi-process runs: each host gets its own signal at its own time, but all hosts
# must save the same step, so there the handler is not installed (it would replace the SIGTERM handler of
# JAX's preemption notifier, which `jax.distributed.initialize()` starts): `Checkpointer.should_save`,
# asked once per step, reaches JAX's preemption sync point on all hosts together, and
# `Checkpointer.reached_preemption(step)` then tells the loop to stop.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_preemption = threading.Event()
_received: list[str] = []


def install_preemption_handler(signums=PREEMPTION_SIGNALS) -> Callable[[], None]:
  """Makes `signums` (SIGTERM, SIGINT) set the flag read by `preemption_requested()` instead of ending
  the process. Call from the main thread of a single-process run (see above for multi-process runs).
  The training loop polls the flag once per step; when set, it saves, waits for the save and stops.
  Returns a function that restores the previous handlers and clears the flag."""
  _preemption.clear()
  _received.clear()

  def handler(signum, _):
    _received.append(signal.Signals(signum).name)
    _preemption.set()

  previous = {signum: signal.signal(signum, handler) for signum in signums}

  def uninstall() -> None:
    for signum, old in previous.items():
      signal.signal(signum, old)
    _preemption.clear()
    _received.clear()

  return uninstall


def preemption_requested() -> bool:
  """Whether a preemption signal has arrived since `install_preemption_handler()`."""
  return _preemption.is_set()


def preemption_signal() -> str | None:
  """The name of the first preemption signal received ("SIGTERM", "SIGINT"), None if none."""
  return _received[0] if _received else None
