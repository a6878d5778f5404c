"""The training step and its state: a student trained against an objective, and a teacher traced in the
same compiled program but never updated.

`train_step(state, teacher_variables, batch, *, ...)` is pure: the teacher is a separate, non-donated
argument, its outputs are under `stop_gradient`, and only the student is differentiated. The zoo's models
draw no randomness (no dropout), so the step takes no rng. With `axis_name` set (the pmap path)
gradients and metrics are averaged over that device axis; under global-view jit they need no reduction.
Metrics are a flat dict of scalars: every loss component, the total, top-1 accuracy and the learning rate.

`eval_step` returns exact (sum, count) pairs for top-1 and top-5, with padded examples masked out.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from nst_jax import objective as objective_lib

# How the teacher's BatchNorm runs in the train step: its running statistics, or the batch's (official).
TEACHER_BATCHNORM_MODES = ("running", "batch")


class TrainState(struct.PyTreeNode):
  """The student's parameters, its BatchNorm statistics, the optimizer state and the step.

  One variable tree: with FitNet the regressor is part of the student module (`objective.HintStudent`).
  The teacher is not part of it, so it is never checkpointed with the student. A checkpoint of this state
  has the student's `params` and `batch_stats` at its top level, so any finished run can serve as a
  teacher (`checkpoints.load_variables`).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, params, batch_stats, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), tx=tx)

  def apply_gradients(self, *, grads, batch_stats) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class Models:
  """The modules of a run: the student (with FitNet's regressor inside, when used) and the teacher
  (None: supervised), and how the teacher's BatchNorm runs ("running" or "batch" statistics)."""

  student: nn.Module
  teacher: nn.Module | None = None
  teacher_batchnorm: str = "running"


def make_optimizer(learning_rate: Callable[[int], float] | float, momentum: float, nesterov: bool,
                   weight_decay: float) -> optax.GradientTransformation:
  """PyTorch's SGD: weight decay added to the gradient (every parameter, as RepDistiller), then momentum."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def step_schedule(base_lr: float, steps_per_epoch: int, decay_epochs, decay_factor: float):
  """Piecewise-constant learning rate: x decay_factor at each of `decay_epochs`."""
  boundaries = {int(e) * steps_per_epoch: decay_factor for e in decay_epochs}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def create_train_state(student: nn.Module, optimizer: optax.GradientTransformation,
                       sample_images: jax.Array, rng: jax.Array) -> TrainState:
  """Initialises the student (regressor included) from one sample batch."""
  variables = student.init(rng, sample_images, train=False)
  return TrainState.create(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                           tx=optimizer)


def teacher_outputs(models: Models, teacher_variables, images):
  """The teacher's (logits, tapped features) as the train step sees them; (None, None) without a teacher."""
  if models.teacher is None:
    return None, None
  if models.teacher_batchnorm == "batch":
    # The official code's teacher: BatchNorm with the batch's statistics; the updated running
    # statistics are thrown away, so the teacher's variables never change.
    (logits, features), _ = models.teacher.apply(teacher_variables, images, train=True,
                                                 mutable=["batch_stats"])
  else:
    logits, features = models.teacher.apply(teacher_variables, images, train=False)
  return jax.lax.stop_gradient((logits, features))


def train_step(state: TrainState, teacher_variables, batch, *, models: Models,
               objective: objective_lib.Objective, learning_rate_fn: Callable[[int], Any],
               axis_name: str | None = None):
  """One SGD step of the student; returns (new state, metrics)."""
  images, labels = batch["image"], batch["label"]
  teacher_logits, teacher_features = teacher_outputs(models, teacher_variables, images)

  def loss_fn(params):
    (logits, features), new_vars = models.student.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"])
    total, components = objective(labels, logits, features, teacher_logits, teacher_features)
    return total, (components, new_vars["batch_stats"], logits)

  grads, (components, new_stats, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  metrics = {f"train_{k.replace('/', '_')}_loss" if k != "total" else "train_loss": v
             for k, v in components.items()}
  metrics["train_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
  metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  return state.apply_gradients(grads=grads, batch_stats=new_stats), metrics


def eval_step(variables, batch, *, model: nn.Module, axis_name: str | None = None):
  """Exact evaluation sums of one model: correct top-1, correct top-5 and the count of real (unmasked)
  examples. `variables` are the model's {"params", "batch_stats"} (see `student_variables`)."""
  logits, _ = model.apply(variables, batch["image"], train=False)
  return topk_sums(logits, batch["label"], batch.get("mask"), axis_name)


def student_variables(state: TrainState) -> dict:
  """The student's variables, as `model.apply` and a teacher checkpoint hold them."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def topk_sums(logits, labels, mask=None, axis_name: str | None = None):
  """{"top1_correct", "top5_correct", "count"} summed over the batch (and the device axis)."""
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top = jax.lax.top_k(logits.astype(jnp.float32), k)[1]
  hit = top == labels[:, None]
  sums = {"top1_correct": jnp.sum(hit[:, 0] * mask), "top5_correct": jnp.sum(jnp.any(hit, -1) * mask),
          "count": jnp.sum(mask)}
  return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def train_body(models: Models, objective: objective_lib.Objective, learning_rate_fn):
  """The train step body in the signature `parallel.Runner.compile_train` expects."""
  return lambda s, t, b, axis: train_step(s, t, b, models=models, objective=objective,
                                          learning_rate_fn=learning_rate_fn, axis_name=axis)


def eval_body(model: nn.Module):
  """The eval step body of one model, in the signature `parallel.Runner.compile_eval` expects."""
  return lambda v, b, axis: eval_step(v, b, model=model, axis_name=axis)
