"""Data parallelism: one mechanism with two faces, chosen by `config.parallel`.

* "jit" (default): global-view `jax.jit` over a 1-D `data` mesh; the state and the teacher variables
  are replicated (`P()`), the batch is sharded along `data` (`P('data')`). XLA inserts the gradient
  all-reduce and the cross-device BatchNorm statistics itself.
* "pmap": the same step body under `jax.pmap` with a per-device batch, as in pmap-era code: the body gets
  `axis_name="batch"`, averages gradients and metrics with `lax.pmean`, and the models' BatchNorm
  synchronises over that axis. The state and the teacher are stacked along a leading device axis, one
  slice on each device, once (`put_replicated`); a batch from the input pipeline, already sharded along
  `data`, is reshaped to (devices, per-device batch, ...) on the devices, without a host round trip.

Both run unchanged across several processes (each process holds the shards of its own devices) and both
give the global-batch result of a single device (tests/train_test.py). The input pipelines build their
batches on this module's mesh and `batch_sharded` layout; this module owns how programs, state and
batches are laid out over the devices.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
PMAP_AXIS = "batch"
MODES = ("jit", "pmap")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_global_batch(global_batch: int, num_devices: int) -> int:
  """The per-device batch; a global batch that does not divide by the device count is an error."""
  if global_batch < 1 or global_batch % num_devices:
    raise ValueError(f"The global batch size {global_batch} does not divide by the {num_devices} devices; "
                     f"use a multiple of {num_devices} (config.schedule.batch_size).")
  return global_batch // num_devices


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
  """Places a pytree on every device of the mesh (a replicated global array per leaf). In a
  multi-process run every process must pass the same values."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch, mesh: Mesh):
  """Places a host batch (NumPy, the same global batch on every process) sharded along its leading axis."""
  return jax.device_put(batch, batch_sharded(mesh))


def to_host(tree):
  """A replicated (or per-device identical) pytree's values as NumPy, from this process's first shard:
  works in multi-process runs, where the arrays are not fully addressable."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)


class Runner:
  """Compiles step bodies for one parallel mode and converts state and batches to and from its layout.

  A train body is `body(state, teacher_variables, batch, axis_name) -> (state, metrics)`, an eval body
  `body(variables, batch, axis_name) -> sums`; with `axis_name` set they must reduce gradients and
  metrics over it themselves (`lax.pmean`, `lax.psum`). Compiled programs take arguments in the mode's
  layout: `put_replicated` for state and variables, `put_batch` for batches.
  """

  def __init__(self, mode: str, mesh: Mesh):
    if mode not in MODES:
      raise ValueError(f"Unknown parallel mode {mode!r}. Valid modes: {', '.join(MODES)}.")
    self.mode, self.mesh = mode, mesh
    self.num_devices = mesh.devices.size
    rep, shard = replicated(mesh), batch_sharded(mesh)
    n = self.num_devices
    # Layout conversions, compiled once; under pmap they are device-local copies and reshapes.
    self._stack = jax.jit(lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), t),
                          out_shardings=shard)
    self._unstack = jax.jit(lambda t: jax.tree.map(lambda x: x[0], t), out_shardings=rep)
    self._split = jax.jit(lambda b: jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), b),
                          out_shardings=shard)

  @property
  def axis_name(self) -> str | None:
    """The BatchNorm axis the models must be built with in this mode."""
    return PMAP_AXIS if self.mode == "pmap" else None

  def compile_train(self, body: Callable) -> Callable:
    """`step(state, teacher_variables, batch) -> (state, metrics)` in this mode's layout; the state is
    donated. The result is the jitted (or pmapped) program itself, so `.lower(...)` works on it."""
    if self.mode == "jit":
      rep, shard = replicated(self.mesh), batch_sharded(self.mesh)
      return jax.jit(lambda s, t, b: body(s, t, b, None), in_shardings=(rep, rep, shard),
                     out_shardings=(rep, rep), donate_argnums=0)
    return jax.pmap(lambda s, t, b: body(s, t, b, PMAP_AXIS), axis_name=PMAP_AXIS,
                    devices=list(self.mesh.devices.flat), donate_argnums=0)

  def compile_eval(self, body: Callable) -> Callable:
    """`evaluate(variables, batch) -> sums` in this mode's layout (sums reduced over devices; read them
    with `to_host`, or `metrics_to_host` for either mode)."""
    if self.mode == "jit":
      rep, shard = replicated(self.mesh), batch_sharded(self.mesh)
      return jax.jit(lambda v, b: body(v, b, None), in_shardings=(rep, shard), out_shardings=rep)
    return jax.pmap(lambda v, b: body(v, b, PMAP_AXIS), axis_name=PMAP_AXIS,
                    devices=list(self.mesh.devices.flat))

  def put_replicated(self, tree):
    """Host or device pytree -> this mode's replicated layout (for pmap: one slice per device)."""
    tree = replicate(tree, self.mesh)
    return tree if self.mode == "jit" else self._stack(tree)

  def get_replicated(self, tree):
    """This mode's replicated layout -> replicated global arrays (the jit layout, which checkpoints use)."""
    return tree if self.mode == "jit" else self._unstack(tree)

  def put_batch(self, batch):
    """A global batch -> this mode's layout. Batches from the input pipelines are already sharded along
    `data` and stay on the devices; a NumPy batch (benchmarks, tests) is placed first."""
    if not _is_sharded_like(batch, self.mesh):
      batch = shard_batch(batch, self.mesh)
    return batch if self.mode == "jit" else self._split(batch)

  def metrics_to_host(self, metrics) -> dict[str, float]:
    """A step's (or eval's) outputs as Python floats (under pmap every device holds the same value)."""
    return {k: float(np.ravel(v)[0]) for k, v in to_host(metrics).items()}


def _is_sharded_like(batch, mesh: Mesh) -> bool:
  target = batch_sharded(mesh)
  return all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim)
             for x in jax.tree.leaves(batch))
