r"""PyTorch checkpoints as nst_jax variables, and back: RepDistiller's CIFAR models, torchvision's ResNets.

    python -m nst_jax.tools.convert --model resnet32x4 --num_classes 100 --checkpoint PATH --workdir DIR \
      [--config CONFIG_FILE] [--evaluate] [--overwrite]

turns a PyTorch checkpoint into a finished teacher run in DIR, which every distillation config reads
unchanged as `--config.teacher.workdir=DIR`: `checkpoints/` (an Orbax checkpoint of `{"params",
"batch_stats"}` at step 0), `config.json` (the run's config: CONFIG_FILE's, default `configs/default.py`'s,
with `student.model` the model and no teacher), `run.json` (the source file, its SHA-256 and format, the
model, the class count, the time) and, last, `results.json` marked `"finished": true`, with the top-1 /
top-5 accuracy on the config's evaluation split when `--evaluate` is given (else null).

Library: `from_torch(model_name, state_dict, num_classes)` -> `{"params", "batch_stats"}` (NumPy float32)
for every model in `SUPPORTED`: RepDistiller's (and mdistiller's, the same modules) CIFAR family and
torchvision's `resnet18/34/50/101`; `to_torch(model_name, variables)` -> a PyTorch `state_dict` of NumPy
arrays (`{k: torch.from_numpy(v)}` loads it strictly, `num_batches_tracked` included);
`read_checkpoint(path)` -> (tensors, format description).

What `from_torch` accepts: a `state_dict`, RepDistiller's `{"model": state_dict, "epoch", "accuracy",
...}` wrapper (or `{"state_dict": ...}`), `module.`-prefixed keys (DataParallel), tensors or arrays, or a
path: `.pth` / `.pt` files are read with `torch.load(..., weights_only=True)` (PyTorch is needed only
for these: `pip install -r requirements-torch.txt`), `.safetensors` files with the `safetensors`
package's NumPy API, no PyTorch needed.

Layouts: a convolution's OIHW weight (grouped and depthwise ones as (O, I / groups, H, W)) is the HWIO
kernel (H, W, I / groups, O); a linear layer's (out, in) weight is the (in, out) kernel; a BatchNorm's
weight / bias / running_mean / running_var are its scale / bias and `batch_stats` mean / var
(`num_batches_tracked` is not used). Names: the nst_jax module path with Flax's automatic wrapper names
(`Conv_0`, `BatchNorm_0`, ...) left out, e.g. `layer1_0/conv1`, renamed by the family's rules in
`_RULES` to the PyTorch module path, e.g. `layer1.0.conv1`. Every mismatch is an error naming it: an
unknown model, missing and unexpected keys, a shape that does not fit (name, expected, found), a class
count other than `num_classes`.
"""

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from nst_jax import models
from nst_jax.tools import evaluate as evaluate_lib
from nst_jax.trainer import checkpoints, config_lib, rundir

_CIFAR_RESNETS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                  "resnet8x4", "resnet32x4")

# PyTorch module path from the nst_jax one, per family: (pattern, replacement) pairs applied in order
# with re.sub to the "/"-joined path, then "/" -> ".". A replacement may be a function of the match.
_RULES = {
    # RepDistiller `models/resnet.py` and torchvision `models/resnet.py`: blocks `layer{i}.{j}`, the
    # projection `downsample` = Sequential(conv, bn).
    "resnet": ((r"^layer(\d+)_(\d+)/", r"layer\1.\2/"), (r"downsample_conv$", "downsample.0"),
               (r"downsample_bn$", "downsample.1")),
    # RepDistiller `models/resnetv2.py`: the projection is `shortcut`, the classifier `linear`.
    "resnetv2": ((r"^layer(\d+)_(\d+)/", r"layer\1.\2/"), (r"downsample_conv$", "shortcut.0"),
                 (r"downsample_bn$", "shortcut.1"), (r"^fc$", "linear")),
    # RepDistiller `models/wrn.py`: stages `block{i}.layer.{j}`, the 1x1 projection `convShortcut`.
    "wrn": ((r"^block(\d)_(\d+)/", r"block\1.layer.\2/"), (r"conv_shortcut$", "convShortcut")),
    # RepDistiller `models/vgg.py`: each block a Sequential of conv, BN, ReLU, conv, BN, ...
    "vgg": ((r"^(block\d)/conv(\d+)$", lambda m: f"{m[1]}/{3 * int(m[2])}"),
            (r"^(block\d)/bn(\d+)$", lambda m: f"{m[1]}/{3 * int(m[2]) + 1}")),
    # RepDistiller `models/mobilenetv2.py`: stem `conv1` and head `conv2` are Sequential(conv, BN, ReLU);
    # a block's `conv` is Sequential(pw, BN, ReLU, dw, BN, ReLU, pw-linear, BN); `classifier.0`.
    "mobilenetv2": ((r"^stem_conv$", "conv1.0"), (r"^stem_bn$", "conv1.1"), (r"^head_conv$", "conv2.0"),
                    (r"^head_bn$", "conv2.1"), (r"^classifier$", "classifier.0"),
                    (r"^group(\d)_block(\d+)/", r"blocks.\1.\2.conv."),
                    (r"conv_expand$", "0"), (r"bn_expand$", "1"), (r"conv_depthwise$", "3"),
                    (r"bn_depthwise$", "4"), (r"conv_project$", "6"), (r"bn_project$", "7")),
    # RepDistiller `models/ShuffleNetv1.py`: `conv1` / `bn1` stem, units `layer{i}.{j}`, `linear`.
    "shufflev1": ((r"^stem_conv$", "conv1"), (r"^stem_bn$", "bn1"), (r"^classifier$", "linear"),
                  (r"^stage(\d)_unit(\d+)/", r"layer\1.\2/")),
    # RepDistiller `models/ShuffleNetv2.py`: `layer{i}.0` is the down-sampling unit, the basic units
    # follow from 1; head `conv2` / `bn2`, `linear`.
    "shufflev2": ((r"^stem_conv$", "conv1"), (r"^stem_bn$", "bn1"), (r"^head_conv$", "conv2"),
                  (r"^head_bn$", "bn2"), (r"^classifier$", "linear"), (r"^stage(\d)_down/", r"layer\1.0/"),
                  (r"^stage(\d)_unit(\d+)/", lambda m: f"layer{m[1]}.{int(m[2]) + 1}/")),
}

SUPPORTED: dict[str, str] = {  # Model name -> family in `_RULES`.
    **{name: "resnet" for name in _CIFAR_RESNETS},
    **{name: "wrn" for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{name: "vgg" for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": "mobilenetv2", "ShuffleV1": "shufflev1", "ShuffleV2": "shufflev2", "ResNet50": "resnetv2",
    **{name: "resnet" for name in ("resnet18", "resnet34", "resnet50", "resnet101")},  # torchvision
}

_WRAPPER_KEYS = ("model", "state_dict")  # RepDistiller / mdistiller save {"model": ...}; others "state_dict".
_PREFIX = "module."  # torch.nn.DataParallel's.
_MAX_LISTED = 12  # Keys named in a missing / unexpected error.
_AUTO_NAME = re.compile(r"^[A-Z]\w*_\d+$")  # Flax's names for unnamed submodules, e.g. Conv_0.


class ConversionError(ValueError):
  """A checkpoint, model name or run directory that cannot be converted; the message says why."""


def _check_model(model_name: str) -> str:
  if model_name not in SUPPORTED:
    raise ConversionError(f"Cannot convert model {model_name!r}. Supported: {', '.join(SUPPORTED)}.")
  return SUPPORTED[model_name]


@functools.cache  # Tracing a deep model takes a second; the shapes of a (name, class count) never change.
def _template(model_name: str, num_classes: int) -> dict:
  """The shapes of the model's `{"params", "batch_stats"}` (traced, nothing computed)."""
  return models.variables_template(models.get_model(model_name, num_classes), (32, 32, 3))  # 32 px: all


def _entries(model_name: str, template: Mapping) -> list[tuple[tuple[str, ...], str, tuple[int, ...]]]:
  """(nst_jax path, PyTorch key, nst_jax shape) of every variable of the template."""
  rules = _RULES[_check_model(model_name)]
  out = []
  for collection in ("params", "batch_stats"):
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(template[collection]):
      path = (collection, *(k.key for k in key_path))
      module = "/".join(p for p in path[1:-1] if not _AUTO_NAME.match(p))
      for pattern, replacement in rules:
        module = re.sub(pattern, replacement, module)
      out.append((path, f"{module.replace('/', '.')}.{_TORCH_LEAF[collection][path[-1]]}", tuple(leaf.shape)))
  return out


_TORCH_LEAF = {"params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
               "batch_stats": {"mean": "running_mean", "var": "running_var"}}


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
  """HWIO conv kernel -> OIHW, (in, out) dense kernel -> (out, in); vectors unchanged."""
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array.T if array.ndim == 2 else array


def _to_jax_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if array.ndim == 2 else array


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  return _to_torch_layout(np.empty(shape, np.bool_)).shape


def _as_numpy(value: Any, key: str) -> np.ndarray:
  """A tensor or array as a float32 NumPy array (half and bfloat16 tensors go through float32)."""
  if hasattr(value, "detach"):  # A torch.Tensor; not imported, so that arrays need no PyTorch.
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if not np.issubdtype(value.dtype, np.number):
    raise ConversionError(f"Checkpoint entry {key!r} is not a numeric tensor (dtype {value.dtype}).")
  return value


def unwrap(checkpoint: Mapping) -> tuple[dict[str, Any], list[str]]:
  """The state_dict inside `checkpoint` with any `module.` prefix removed, and what was unwrapped."""
  notes = []
  if not isinstance(checkpoint, Mapping):
    raise ConversionError(f"A checkpoint must be a state_dict (a mapping of names to tensors), got "
                     f"{type(checkpoint).__name__}.")
  for key in _WRAPPER_KEYS:
    if isinstance(checkpoint.get(key), Mapping):
      notes.append(f"{{{key!r}: state_dict}} wrapper")
      checkpoint = checkpoint[key]
      break
  state = dict(checkpoint)
  if state and all(k.startswith(_PREFIX) for k in state):
    notes.append(f"{_PREFIX!r} prefix")
    state = {k[len(_PREFIX):]: v for k, v in state.items()}
  return state, notes


def read_checkpoint(path: str | os.PathLike) -> tuple[Mapping, str]:
  """(the file's contents, its format): a safetensors file as NumPy arrays, else PyTorch's torch.load."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"Checkpoint file {path!r} does not exist.")
  with open(path, "rb") as f:
    head = f.read(9)
  # safetensors: an 8-byte little-endian header length, then the JSON header.
  if path.endswith(".safetensors") or head[8:9] == b"{":
    from safetensors.numpy import load_file
    return load_file(path), "safetensors"
  try:
    import torch
  except ImportError:
    raise ConversionError(f"Reading {path!r} (a PyTorch file) needs PyTorch: pip install -r "
                          "requirements-torch.txt, or save the state_dict as .safetensors "
                          "(safetensors.torch.save_file) where PyTorch is installed: those need no PyTorch "
                          "here.") from None
  kind = "torch zip" if head[:2] == b"PK" else "torch legacy"
  try:
    # RepDistiller's `<model>_last.pth` also holds its argparse options; allowing that one plain class
    # keeps the load free of arbitrary code, which is what weights_only is for.
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True), kind
  except Exception as error:  # weights_only refuses pickled objects other than tensors and containers.
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise ConversionError(f"torch.load({path!r}, weights_only=True) failed: {first_line} Re-save just the "
                          "state_dict (torch.save(model.state_dict(), path)).") from error


def _list(keys, what: str) -> str:
  keys = sorted(keys)
  more = len(keys) - _MAX_LISTED
  shown = ", ".join(keys[:_MAX_LISTED]) + (f", ... ({more} more)" if more > 0 else "")
  return f"{len(keys)} {what}: {shown}"


def from_torch(model_name: str, state_dict: Mapping | str | os.PathLike, num_classes: int) -> dict:
  """`{"params", "batch_stats"}` (nested dicts of float32 NumPy arrays) of the zoo model `model_name` with
  `num_classes` classes, from a PyTorch state_dict, a wrapper of one, or a .pth / .pt / .safetensors path
  (module docstring). Raises ConversionError (a ValueError) naming what does not fit."""
  family = _check_model(model_name)
  if isinstance(state_dict, str | os.PathLike):
    state_dict, _ = read_checkpoint(state_dict)
  state, _ = unwrap(state_dict)
  state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  template = _template(model_name, num_classes)
  entries = _entries(model_name, template)

  expected = {key for _, key, _ in entries}
  missing, unexpected = expected - set(state), set(state) - expected
  if missing or unexpected:
    parts = [_list(missing, "missing keys")] if missing else []
    parts += [_list(unexpected, "unexpected keys")] if unexpected else []
    raise ConversionError(f"The checkpoint does not fit {model_name} (RepDistiller / torchvision names, "
                          f"family {family!r}): {'; '.join(parts)}.")

  classifier = next(key for _, key, shape in entries if len(shape) == 2)
  found_classes = np.shape(state[classifier])[0]
  if found_classes != num_classes:
    raise ConversionError(f"The checkpoint has {found_classes} classes ({classifier} is "
                          f"{tuple(np.shape(state[classifier]))}), but num_classes is {num_classes}.")

  variables: dict = {}
  for path, key, shape in entries:
    value = _as_numpy(state[key], key)
    if value.shape != _torch_shape(shape):
      raise ConversionError(f"Checkpoint entry {key}: expected shape {_torch_shape(shape)} for "
                            f"{model_name} (nst_jax {'/'.join(path)} {shape}), found {value.shape}.")
    node = variables
    for part in path[:-1]:
      node = node.setdefault(part, {})
    # A copy, never a view: torch's `tensor.numpy()` shares memory, and training would change it.
    node[path[-1]] = np.array(_to_jax_layout(value), dtype=np.float32, order="C", copy=True)
  return variables


def to_torch(model_name: str, variables: Mapping) -> dict[str, np.ndarray]:
  """The PyTorch state_dict (NumPy arrays, RepDistiller's / torchvision's names, `num_batches_tracked`
  0) of `variables` (`{"params", "batch_stats"}`) of the zoo model `model_name`."""
  _check_model(model_name)
  kernels = [leaf for leaf in jax.tree.leaves(variables.get("params", {})) if np.ndim(leaf) == 2]
  if len(kernels) != 1:
    raise ConversionError(f"variables of {model_name} must have params with exactly one dense "
                          f"(classifier) kernel, found {len(kernels)}.")
  template = _template(model_name, int(np.shape(kernels[0])[-1]))

  checkpoints.check_fits(template, jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.float32),
                                                {k: variables.get(k) for k in template}),
                         f"variables given for {model_name}")
  state = {}
  for path, key, _ in _entries(model_name, template):
    node = variables
    for part in path:
      node = node[part]
    state[key] = np.array(_to_torch_layout(np.asarray(node, np.float32)), order="C", copy=True)
    if key.endswith(".running_var"):
      state[key[:-len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
  return state


# ---------------------------------------------------------------------------------------------------
# The teacher run directory.


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _run_config(model_name: str, config_file: str | None):
  """The teacher run's config: `config_file`'s (or configs/default.py's) with this model, no teacher."""
  path = config_file or os.path.join(config_lib.REPO_ROOT, "configs", "default.py")
  config = config_lib.load_config_file(path)
  config.student.model = model_name
  config.teacher.model = ""
  return config


def _finite_or_none(value):
  return None if value is None or not math.isfinite(value) else float(value)


def write_teacher_run(workdir: str, model_name: str, num_classes: int, checkpoint: str, *,
                      config_file: str | None = None, evaluate: bool = False,
                      overwrite: bool = False) -> dict:
  """Converts `checkpoint` and writes the finished teacher run `workdir` (module docstring); returns
  results.json's contents."""
  _check_model(model_name)
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.fspath(checkpoints.checkpoint_dir(workdir))
  replace = os.path.isdir(ckpt_dir) and bool(os.listdir(ckpt_dir))
  if replace and not overwrite:
    raise ConversionError(f"{ckpt_dir} already holds a checkpoint: give a new --workdir, or --overwrite "
                          "to replace that run.")
  config = _run_config(model_name, config_file)
  contents, fmt = read_checkpoint(checkpoint)
  state, notes = unwrap(contents)
  variables = jax.tree.map(jax.numpy.asarray, from_torch(model_name, state, num_classes))

  accuracy = {}
  if evaluate:
    try:
      accuracy = evaluate_lib.evaluate_variables(config, variables)
    except ValueError as error:
      if "does not fit" not in str(error):  # Only the data-vs-model mismatch is the user's input.
        raise
      lines = str(error).splitlines()
      raise ConversionError(f"--evaluate: the data of {config_file or 'configs/default.py'} "
                            f"({config.data.name}) does not fit {model_name} with {num_classes} classes; "
                            f"give --config the config of the checkpoint's dataset. {lines[0]} "
                            + "; ".join(line.strip() for line in lines[1:])) from None

  results_path = os.path.join(workdir, rundir.RESULTS)
  if replace:  # The old run stops being a finished teacher before its checkpoint goes.
    if os.path.exists(results_path):
      os.remove(results_path)
    shutil.rmtree(ckpt_dir)
  os.makedirs(workdir, exist_ok=True)
  source = {"source": os.path.abspath(checkpoint), "sha256": _sha256(checkpoint),
            "format": ", ".join([fmt, *notes]), "model": model_name, "num_classes": num_classes}
  ckpt = checkpoints.Checkpointer(workdir, save_every_steps=1)
  ckpt.save(0, variables, {"step": 0, "source": source["source"], "sha256": source["sha256"]}, force=True)
  ckpt.close()
  rundir.write_json(os.path.join(workdir, rundir.CONFIG), json.loads(config.to_json_best_effort()))
  rundir.write_json(os.path.join(workdir, rundir.RUN), {
      **source, "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "evaluated": config.data.eval_split if evaluate else None, "command": " ".join(sys.argv)})
  top1, top5 = _finite_or_none(accuracy.get("top1")), _finite_or_none(accuracy.get("top5"))
  results = {"finished": True, "source": "converted", "last_top1": top1, "last_top5": top5,
             "best_top1": top1, "best_top5": top5, "best_epoch": 0, "epochs": [],
             "eval_count": accuracy.get("count")}
  # Written last: a results.json marked finished is what makes the directory a finished teacher.
  rundir.write_json(results_path, results)
  return results


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m nst_jax.tools.convert",
                                   description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help=f"the zoo model: {', '.join(SUPPORTED)}")
  parser.add_argument("--num_classes", required=True, type=int, help="the checkpoint's class count")
  parser.add_argument("--checkpoint", required=True, help="a .pth / .pt (PyTorch) or .safetensors file")
  parser.add_argument("--workdir", required=True, help="the teacher run directory to write")
  parser.add_argument("--config", default=None,
                      help="the run's config file (CONFIG or CONFIG:ARG; default configs/default.py)")
  parser.add_argument("--evaluate", action="store_true", help="evaluate on the config's eval split first")
  parser.add_argument("--overwrite", action="store_true", help="replace the checkpoint of an existing run")
  args = parser.parse_args(argv)
  try:
    results = write_teacher_run(args.workdir, args.model, args.num_classes, args.checkpoint,
                                config_file=args.config, evaluate=args.evaluate, overwrite=args.overwrite)
  except (ConversionError, config_lib.ConfigError) as error:  # Anything else keeps its traceback.
    parser.exit(2, f"error: {error}\n")
  print(json.dumps(results))
  return results


if __name__ == "__main__":
  main()
