"""Data parallelism: the only module that knows about devices.

Two ways to run one step body on many devices, chosen by `config.parallel`:

* "jit" (default): global-view `jax.jit` over a 1-D `data` mesh; the state and the teacher variables
  are replicated (`P()`), the batch is sharded along `data` (`P('data')`). XLA inserts the gradient
  all-reduce and the cross-device BatchNorm statistics itself, and the same program runs unchanged on
  many hosts (each process feeds the shards of its own devices).
* "pmap": the same body under `jax.pmap` with a per-device batch, as in pmap-era code: the step body
  gets `axis_name="batch"`, averages gradients and metrics with `lax.pmean`, and the models' BatchNorm
  synchronises over that axis. State is kept stacked along a leading device axis.

Both give the global-batch result of a single device (tests/train_test.py checks the parameters after
three steps on 8 devices with jit, 1 device with jit and 8 devices with pmap).
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
  """Places a pytree on every device of the mesh (a replicated global array per leaf)."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch, mesh: Mesh):
  """Places a host batch (global arrays or NumPy) sharded along its leading axis."""
  return jax.device_put(batch, batch_sharded(mesh))


class Runner:
  """Compiles step bodies for one parallel mode and converts state and batches to its layout.

  A train body is `body(state, teacher_variables, batch, rng, axis_name) -> (state, metrics)`, an eval
  body `body(variables, batch, axis_name) -> sums`; with `axis_name` set they must reduce gradients and
  metrics over it themselves (`lax.pmean`, `lax.psum`).
  """

  def __init__(self, mode: str, mesh: Mesh):
    if mode not in MODES:
      raise ValueError(f"Unknown parallel mode {mode!r}. Valid modes: {', '.join(MODES)}.")
    self.mode, self.mesh = mode, mesh
    self.num_devices = mesh.devices.size

  @property
  def axis_name(self) -> str | None:
    """The BatchNorm axis the models must be built with in this mode."""
    return PMAP_AXIS if self.mode == "pmap" else None

  def compile_train(self, body: Callable) -> Callable:
    """`step(state, teacher_variables, batch, rng) -> (state, metrics)`; the state is donated."""
    if self.mode == "jit":
      rep, shard = replicated(self.mesh), batch_sharded(self.mesh)
      step = jax.jit(lambda s, t, b, r: body(s, t, b, r, None), in_shardings=(rep, rep, shard, rep),
                     out_shardings=(rep, rep), donate_argnums=0)
      return lambda s, t, b, r: step(s, t, self.put_batch(b), r)
    step = jax.pmap(lambda s, t, b, r: body(s, t, b, r, PMAP_AXIS), axis_name=PMAP_AXIS,
                    in_axes=(0, 0, 0, None), devices=list(self.mesh.devices.flat), donate_argnums=0)

    def run(s, t, b, r):
      s, metrics = step(s, t, self.put_batch(b), r)
      return s, jax.tree.map(lambda x: x[0], metrics)

    return run

  def compile_eval(self, body: Callable) -> Callable:
    """`evaluate(variables, batch) -> sums` (one copy of the sums, reduced over devices)."""
    if self.mode == "jit":
      rep, shard = replicated(self.mesh), batch_sharded(self.mesh)
      fn = jax.jit(lambda v, b: body(v, b, None), in_shardings=(rep, shard), out_shardings=rep)
      return lambda v, b: fn(v, self.put_batch(b))
    fn = jax.pmap(lambda v, b: body(v, b, PMAP_AXIS), axis_name=PMAP_AXIS,
                  devices=list(self.mesh.devices.flat))
    return lambda v, b: jax.tree.map(lambda x: x[0], fn(v, self.put_batch(b)))

  def put_replicated(self, tree):
    """Host or device pytree -> this mode's replicated layout (stacked per device for pmap)."""
    if self.mode == "jit":
      return replicate(tree, self.mesh)
    return jax.tree.map(lambda x: jnp.stack([x] * self.num_devices), jax.device_get(tree))

  def get_replicated(self, tree):
    """This mode's replicated layout -> one copy (device arrays for jit, the first replica for pmap)."""
    return tree if self.mode == "jit" else jax.tree.map(lambda x: x[0], tree)

  def put_batch(self, batch):
    """A global batch (sharded along `data` or on the host) -> this mode's batch layout."""
    check_global_batch(len(jax.tree.leaves(batch)[0]), self.num_devices)
    if self.mode == "jit":
      return batch if _is_sharded_like(batch, self.mesh) else shard_batch(batch, self.mesh)
    return jax.tree.map(lambda x: np.asarray(x).reshape(self.num_devices, -1, *x.shape[1:]), batch)


def _is_sharded_like(batch, mesh: Mesh) -> bool:
  target = batch_sharded(mesh)
  return all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim)
             for x in jax.tree.leaves(batch))
