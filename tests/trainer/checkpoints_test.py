"""Tests of nst_jax.trainer.checkpoints: exact round trips, save policy, shardings, mismatch errors, the
teacher, a SIGKILL in the middle of saving, the SIGTERM flag, and damaged checkpoints (truncated data,
missing metadata) moved aside."""

import asyncio
import gc
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from nst_jax.trainer import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _replicated():
  return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())


def _state(seed=0, sharding=None, dense_out=10, extra=False):
  """A TrainState-like pytree (params, batch_stats, sgd-momentum opt_state, step, rng key data)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {"conv": {"kernel": normal(3, 3, 3, 8)}, "bn": {"scale": normal(8), "bias": normal(8)},
            "dense": {"kernel": normal(8, dense_out), "bias": normal(dense_out)}}
  if extra:
    params["head"] = {"kernel": normal(4)}
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.init(params)
  _, opt_state = tx.update(jax.tree.map(lambda p: p * 0.5 + 1.0, params), opt_state)  # Nonzero trace.
  state = {"params": params, "batch_stats": {"bn": {"mean": normal(8), "var": normal(8) ** 2}},
           "opt_state": opt_state, "step": jnp.asarray(100 + seed, jnp.int32),
           "rng": jax.random.key_data(jax.random.key(seed))}
  return jax.device_put(state, sharding or _replicated())


def _assert_bitwise_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(e).view(np.uint8))


def test_round_trip_is_bitwise_exact_with_metadata(tmp_path):
  state = _state(seed=1)
  expected = jax.tree.map(np.array, state)
  metadata = {"data_position": 640, "config_hash": "a1b2", "epoch": 1, "nested": {"x": [1, 2]}}
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1000) as ckpt:
    assert ckpt.directory == checkpoints.checkpoint_dir(tmp_path)
    assert ckpt.latest_step() is None
    assert ckpt.save(101, state, metadata, force=True)
    # The async save has copied the arrays: the caller may donate (delete) them and change the metadata.
    jax.tree.map(lambda x: x.delete(), state)
    metadata["epoch"] = 2
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1000) as ckpt:
    assert ckpt.latest_step() == 101
    template = jax.tree.map(jnp.zeros_like, _state(seed=2))
    restored, restored_metadata = ckpt.restore(template)
  _assert_bitwise_equal(restored, expected)
  assert isinstance(restored["opt_state"][0], optax.TraceState)
  assert restored["rng"].dtype == jnp.uint32
  key = jax.random.wrap_key_data(restored["rng"])
  np.testing.assert_array_equal(jax.random.key_data(key), expected["rng"])
  assert restored_metadata == {"data_position": 640, "config_hash": "a1b2", "epoch": 1,
                               "nested": {"x": [1, 2]}}


def test_save_interval_keep_last_k_and_resume_from_latest(tmp_path):
  sharding = SingleDeviceSharding(jax.devices()[0])  # Small and quick; the sharding test is separate.
  with checkpoints.Checkpointer(tmp_path, save_every_steps=3, keep=2) as ckpt:
    saved = [s for s in range(1, 11) if ckpt.save(s, _state(s, sharding), {"step": s})]
    assert saved == [3, 6, 9]
    assert ckpt.save(10, _state(10, sharding), {"step": 10}, force=True)  # The final save.
    assert not ckpt.save(10, _state(10, sharding), {"step": 10}, force=True)  # Already saved: skipped.
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [9, 10]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "9"]

  with checkpoints.Checkpointer(tmp_path, save_every_steps=3, keep=2) as ckpt:
    assert ckpt.latest_step() == 10
    template = _state(0, sharding)
    restored, metadata = ckpt.restore(template)
    _assert_bitwise_equal(restored, _state(10, sharding))
    assert metadata == {"step": 10}
    restored, metadata = ckpt.restore(template, step=9)
    _assert_bitwise_equal(restored, _state(9, sharding))
    assert metadata == {"step": 9}
    with pytest.raises(FileNotFoundError, match=r"saved steps: \[9, 10\]"):
      ckpt.restore(template, step=3)
    assert not ckpt.save(11, template, {})  # Not a save step after the resume either.
    assert ckpt.should_save(12)


def test_restore_takes_the_templates_sharding(tmp_path):
  # Saved from one device, restored replicated over the 8-device 'data' mesh.
  state = _state(seed=3, sharding=SingleDeviceSharding(jax.devices()[1]))
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.save(1, state, {})
  replicated = _replicated()
  assert len(replicated.device_set) == 8
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    restored, _ = ckpt.restore(template)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == replicated
  _assert_bitwise_equal(restored, state)


def test_mismatch_is_a_value_error_naming_the_entries(tmp_path):
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.save(5, _state(), {})
    template = _state(dense_out=100, extra=True)
    del template["batch_stats"]["bn"]["var"]
    template["rng"] = template["rng"].astype(jnp.int32)
    with pytest.raises(ValueError) as info:
      ckpt.restore(template)
  message = str(info.value)
  assert "checkpoints/5 does not fit" in message
  assert "missing in the checkpoint: params/head/kernel" in message
  assert "unexpected in the checkpoint: batch_stats/bn/var" in message
  assert "params/dense/kernel: shape (8, 100) expected, (8, 10) in the checkpoint" in message
  assert "params/dense/bias: shape (100,) expected, (10,) in the checkpoint" in message
  assert "opt_state/0/trace/dense/kernel: shape (8, 100) expected" in message  # optax NamedTuple path.
  assert "rng: dtype int32 expected, uint32 in the checkpoint" in message
  assert "conv" not in message and "Traceback" not in message

  # A different model altogether: the list is capped.
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    with pytest.raises(ValueError, match=r"\.\.\. and \d+ more$"):
      ckpt.restore({f"layer{i}": jnp.zeros(1) for i in range(50)})


def test_bad_inputs_fail_early(tmp_path):
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    with pytest.raises(TypeError, match=r"\['rng'\] is a typed PRNG key.*key_data"):
      ckpt.save(1, {"rng": jax.random.key(0)}, {})
    with pytest.raises(TypeError, match="JSON-serialisable"):
      ckpt.save(1, {"x": jnp.zeros(2)}, {"bad": object()})
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
      ckpt.restore({"x": jnp.zeros(2)})
    assert ckpt.all_steps() == []


def test_load_variables(tmp_path):
  teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
  teacher_state = _state(seed=7, sharding=SingleDeviceSharding(jax.devices()[0]))
  with checkpoints.Checkpointer(teacher_dir, save_every_steps=1) as ckpt:
    ckpt.save(50, _state(seed=6), {})
    ckpt.save(100, teacher_state, {"step": 100})

  replicated = _replicated()
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          {"params": teacher_state["params"], "batch_stats": teacher_state["batch_stats"]})
  variables = checkpoints.load_variables(teacher_dir, template)
  assert set(variables) == {"params", "batch_stats"}
  _assert_bitwise_equal(variables, {"params": teacher_state["params"],
                                    "batch_stats": teacher_state["batch_stats"]})
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(variables))

  # A different teacher architecture: named entries, and the teacher's optimizer state is not mentioned.
  wrong = _state(dense_out=100)
  with pytest.raises(ValueError, match=r"teacher checkpoint .*checkpoints/100 does not fit") as info:
    checkpoints.load_variables(teacher_dir, {"params": wrong["params"],
                                                     "batch_stats": wrong["batch_stats"]})
  assert "params/dense/kernel: shape (8, 100) expected, (8, 10)" in str(info.value)
  assert "opt_state" not in str(info.value)

  # No run at all, and a run that has not saved yet.
  with pytest.raises(FileNotFoundError, match="the teacher has to be trained first"):
    checkpoints.load_variables(tmp_path / "never_ran", template)
  checkpoints.Checkpointer(student_dir, save_every_steps=1).close()
  assert (student_dir / "checkpoints").is_dir()
  with pytest.raises(FileNotFoundError, match="the teacher has to be trained first"):
    checkpoints.load_variables(student_dir, template)


_CHILD = """
import sys
import jax, jax.numpy as jnp
from nst_jax.trainer import checkpoints
with checkpoints.Checkpointer(sys.argv[1], save_every_steps=1, keep=3) as ckpt:
  for step in range(1, 100000):
    state = {"w": jnp.full((4, 1 << 20), step, jnp.float32), "step": jnp.asarray(step, jnp.int32)}
    ckpt.save(step, state, {"step": step})
"""


def test_sigkill_while_saving_leaves_the_last_complete_checkpoint(tmp_path):
  ckpt_dir = tmp_path / "checkpoints"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  log = tmp_path / "child.log"
  with open(log, "w") as out:  # A file, not a pipe nobody reads, which could fill up and block the child.
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHILD), str(tmp_path)], env=env,
                             stdout=out, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 60
    committed = lambda: [n for n in os.listdir(ckpt_dir) if n.isdigit()] if ckpt_dir.is_dir() else []
    while len(committed()) < 2 and time.monotonic() < deadline:
      assert child.poll() is None, log.read_text()
      time.sleep(0.02)
    assert len(committed()) >= 2, "the child saved nothing in 60 s"
    # Kill it while a step is being written: the moment a temporary directory shows up.
    while time.monotonic() < deadline and not any("tmp" in n for n in os.listdir(ckpt_dir)):
      time.sleep(0.001)
    child.kill()  # SIGKILL
    child.wait(timeout=30)
  finally:
    if child.poll() is None:
      child.kill()
  assert child.returncode == -signal.SIGKILL

  leftovers = [n for n in os.listdir(ckpt_dir) if not n.isdigit()]
  complete = sorted(int(n) for n in committed())
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    assert ckpt.all_steps() == complete  # A partial step is never listed...
    template = {"w": jnp.zeros((4, 1 << 20), jnp.float32), "step": jnp.asarray(0, jnp.int32)}
    # ...and every listed one is whole: old steps are deleted only after a newer one is committed, and
    # before the next save starts.
    for step in complete:
      restored, metadata = ckpt.restore(template, step=step)
      assert metadata == {"step": step} and int(restored["step"]) == step
      np.testing.assert_array_equal(restored["w"], np.full((4, 1 << 20), step, np.float32))
    # The resumed run saves the next step; the interrupted save's leftovers are gone by then.
    assert ckpt.save(complete[-1] + 1, template, {}, force=True)
  # The kill did land in the middle of a save (else this test would prove nothing).
  assert any(n.endswith(".orbax-checkpoint-tmp") for n in leftovers), leftovers
  assert sorted(os.listdir(ckpt_dir)) == sorted(str(s) for s in complete + [complete[-1] + 1])


def test_leftover_temporary_directory_is_ignored_and_removed(tmp_path):
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.save(1, {"x": jnp.ones(3)}, {})
  partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234567890"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 10)
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    assert ckpt.all_steps() == [1]
    # Orbax removes it in a background thread started with the manager, at the latest before a save.
    assert ckpt.save(2, {"x": jnp.full(3, 2.0)}, {})
    assert not partial.exists()
    restored, _ = ckpt.restore({"x": jnp.zeros(3)})
  np.testing.assert_array_equal(restored["x"], np.full(3, 2.0))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_set_the_preemption_flag(signum, tmp_path):
  previous = signal.getsignal(signum)
  uninstall = checkpoints.install_preemption_handler()
  ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=1000)
  try:
    assert not checkpoints.preemption_requested() and not ckpt.should_save(1)
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while not checkpoints.preemption_requested() and time.monotonic() < deadline:
      time.sleep(0.01)  # Python runs signal handlers between bytecodes of the main thread.
    assert checkpoints.preemption_requested()
    assert checkpoints.preemption_signal() == signal.Signals(signum).name
    assert ckpt.should_save(2) and ckpt.reached_preemption(2) and not ckpt.reached_preemption(3)
  finally:
    uninstall()
    ckpt.close()
  assert not checkpoints.preemption_requested() and checkpoints.preemption_signal() is None
  assert signal.getsignal(signum) == previous


def test_time_based_checkpoints_with_a_fake_clock(tmp_path):
  now = [0.0]
  ckpt = checkpoints.Checkpointer(tmp_path, save_every_steps=1000, save_every_minutes=10, async_save=False,
                                  clock=lambda: now[0])
  saved = []
  with ckpt:
    for step in range(1, 40):
      now[0] += 60.0  # one minute per step
      if ckpt.should_save(step):
        ckpt.save(step, {"x": jnp.full(3, float(step))}, {"step": step}, force=True)
        saved.append(step)
  # Ten minutes after the start, then ten minutes after each save.
  assert saved == [10, 20, 30]
  assert ckpt.all_steps() == [10, 20, 30]
  with checkpoints.Checkpointer(tmp_path / "other", save_every_steps=5, save_every_minutes=0) as no_clock:
    assert [s for s in range(1, 12) if no_clock.should_save(s)] == [5, 10]


# Damaged checkpoints: moved aside, the newest one that reads restored.


def _damage(step_dir: pathlib.Path, how: str):
  """A truncated array data file (what a full disk or a copy cut short leaves), or no metadata file."""
  if how == "truncated":
    data = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    assert data, list(step_dir.rglob("*"))
    for path in data:
      os.truncate(path, path.stat().st_size // 2)
  else:
    (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how, error", [
    ("truncated", r"ValueError: OUT_OF_RANGE: .*Requested byte range .* is not valid for value of size"),
    ("no_metadata", r"AttributeError: 'NoneType' object has no attribute 'tree'"),
])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_restored(tmp_path, how, error):
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1, keep=5) as ckpt:
    for step in (22, 44, 51):
      ckpt.save(step, _state(seed=step), {"step": step})
  _damage(tmp_path / "checkpoints" / "51", how)
  reported = []
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1, keep=5) as ckpt:
    state, metadata, step = ckpt.restore_newest_readable(_state(), lambda *a: reported.append(a))
    assert ckpt.all_steps() == [22, 44] and ckpt.damaged() == ["51.damaged"]
  assert step == 44 and metadata == {"step": 44}
  _assert_bitwise_equal(state, _state(seed=44))  # exactly the older checkpoint's values
  [(bad_step, moved_to, line)] = reported
  assert bad_step == 51 and moved_to == str(tmp_path / "checkpoints" / "51.damaged")
  assert re.match(error, line) and "\n" not in line and "tensorstore_spec" not in line, line
  assert (tmp_path / "checkpoints" / "51.damaged" / "state").is_dir()  # kept, not deleted


def test_no_readable_checkpoint_left_stops_rather_than_starting_over(tmp_path):
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.save(5, _state(seed=5), {"step": 5})
  _damage(tmp_path / "checkpoints" / "5", "no_metadata")
  for _ in range(2):  # and again on the next attempt, when it was moved aside already
    with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
      with pytest.raises(checkpoints.DamagedCheckpoints, match=r"No checkpoint in .*checkpoints can be read "
                                                               r"\(moved aside: 5.damaged\).*delete them"):
        ckpt.restore_newest_readable(_state(), lambda *a: None)
  with checkpoints.Checkpointer(tmp_path / "fresh", save_every_steps=1) as ckpt:
    assert ckpt.restore_newest_readable(_state(), lambda *a: None) is None  # never had one: fresh start


def test_a_checkpoint_of_another_model_is_a_mismatch_not_damage(tmp_path):
  with checkpoints.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.save(5, _state(), {"step": 5})
    with pytest.raises(checkpoints.CheckpointMismatch, match="does not fit"):
      ckpt.restore_newest_readable(_state(dense_out=100), lambda *a: pytest.fail("reported as damage"))
    assert ckpt.all_steps() == [5] and ckpt.damaged() == []


def test_a_damaged_teacher_checkpoint_is_an_error_naming_the_teacher_run(tmp_path):
  teacher = tmp_path / "teacher"
  with checkpoints.Checkpointer(teacher, save_every_steps=1) as ckpt:
    ckpt.save(10, _state(seed=1), {})
    ckpt.save(20, _state(seed=2), {})
  _damage(teacher / "checkpoints" / "20", "truncated")
  template = {"params": _state()["params"], "batch_stats": _state()["batch_stats"]}
  with pytest.raises(checkpoints.CheckpointReadError) as info:
    checkpoints.load_variables(teacher, template)
  message = str(info.value)
  assert message.startswith(f"The teacher checkpoint {teacher / 'checkpoints' / '20'} cannot be read "
                            "(ValueError: OUT_OF_RANGE")
  assert f"the teacher run in {teacher} is damaged" in message and "\n" not in message
  assert sorted(p.name for p in (teacher / "checkpoints").iterdir()) == ["10", "20"]  # nothing moved


def test_only_the_closed_event_loop_report_is_dropped_from_the_unraisable_hook(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoints._ignore_closed_loop_callbacks()
  checkpoints._ignore_closed_loop_callbacks()  # Idempotent: one filter, not two stacked.

  def report(error, obj=None):
    return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                                 err_msg=None, object=obj)

  sys.unraisablehook(report(RuntimeError("Event loop is closed")))
  kept = [report(RuntimeError("Event loop is closed"), obj="a callback"),
          report(RuntimeError("something else")), report(ValueError("Event loop is closed"))]
  for unraisable in kept:
    sys.unraisablehook(unraisable)
  assert seen == kept


def test_only_unawaited_read_errors_of_the_checkpoint_being_read_are_dropped_from_asyncio_logs(
    tmp_path, caplog):
  """Orbax's sibling read tasks of a damaged checkpoint fail unawaited; asyncio logs each when it is
  collected. Those reports name the checkpoint's files: dropped. Any other task's error still shows."""
  damaged = tmp_path / "checkpoints" / "44"
  checkpoints._quiet_unretrieved_read_errors(damaged)
  checkpoints._quiet_unretrieved_read_errors(damaged)  # Idempotent: one filter.
  assert logging.getLogger("asyncio").filters.count(checkpoints._unretrieved_read_errors) == 1

  async def fail(message):
    raise ValueError(message)

  def run_unawaited(message):
    loop = asyncio.new_event_loop()
    task = loop.create_task(fail(message))
    loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody awaits it
    loop.close()
    del task
    gc.collect()

  caplog.set_level("ERROR", logger="asyncio")
  run_unawaited(f'OUT_OF_RANGE: Error reading "step/.zarray" at local file "{damaged}/state/"')
  assert not caplog.records, caplog.text
  for other in (f'Error reading at local file "{tmp_path / "checkpoints" / "4"}/state/"',  # not 44
                "some other failure"):
    run_unawaited(other)
  assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
      "Task exception was never retrieved"] * 2
  assert [str(r.exc_info[1]) for r in caplog.records][1] == "some other failure"
