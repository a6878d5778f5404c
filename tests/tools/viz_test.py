"""Tests of nst_jax.tools.viz on the session's sweep of configs/tiny.py (tests/conftest.py), in the
layout `<root>/<method>/seed<k>`: digits at 16 px, one epoch each of a resnet8 teacher and resnet8
students, `ce` and `kd_nst` (CE + KD + NST on stage1-3), seeds 0 and 1. `ce/seed0` is the teacher's own
config and seed, hence the same run bitwise (tests/seeds_test.py checks that): MMD^2 = 0 to the teacher.

The pure core against NumPy written from the definitions (top-k channel choice, L2 normalisation,
bilinear upsampling, per-image MMD^2 as the three double sums); MMD^2 per layer over the whole eval split
and the selectivity / t-SNE numbers against NumPy on features of the models applied directly to images
resized and normalised in NumPy; every PNG the command line writes (opens, the documented size, not
blank); its one-line errors.
"""

import copy
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from nst_jax import models
from nst_jax.tools import viz
from nst_jax.trainer import checkpoints
from nst_jax.trainer.data import sources
from tests import np_reference as ref
from tests.trainer.data.resize_reference import bilinear_resize

IMAGE_SIZE = 16  # stage1/2/3 of the CIFAR ResNets at 16 / 8 / 4 px
STAGES = [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]
TAPS = [f"{s}:{t}" for s, t in STAGES]
NUM_EVAL = 359  # digits' validation split
DPI = 50


pytestmark = pytest.mark.usefixtures("fast_compilation")  # values, not speed (tests/conftest.py)


RUNS = ("teacher", "ce/seed0", "ce/seed1", "kd_nst/seed0", "kd_nst/seed1")


@pytest.fixture(scope="module")
def root(tiny_sweep):
  """The session's sweep root: the teacher, ce and kd_nst with seeds 0 and 1."""
  assert (tiny_sweep.methods, tiny_sweep.seeds) == (("ce", "kd_nst"), (0, 1))
  return tiny_sweep.root


@pytest.fixture(scope="module")
def run(root):
  return viz.load(root / "kd_nst" / "seed0")


@pytest.fixture(scope="module")
def reference(root):
  """Eval images resized and normalised in NumPy, and every tap of the five networks applied to them."""
  digits = sources.load_digits("validation")
  pixels = bilinear_resize(digits.images, (IMAGE_SIZE, IMAGE_SIZE))
  (mean,), (std,) = sources.MEAN_STD["digits"]
  x = ((pixels / 255.0 - mean) / std).astype(np.float32)
  model = models.get_model("resnet8", 10)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
  features = {}
  for name in RUNS:
    variables = checkpoints.load_variables(root / name, template)
    _, taps = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    features[name] = {k: np.asarray(v, np.float64) for k, v in taps.items()}
  return {"pixels": pixels, "labels": digits.labels, "features": features}


# ----------------------------------------------------------------------------------------------------
# NumPy references.


def _squared_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
  """||a_i - b_j||^2 for every pair of every image, (images, n, m), as ||a||^2 + ||b||^2 - 2 a . b (the
  difference tensor of a whole split would cost seconds; the definition itself is checked with
  tests/np_reference.py's loops on small inputs above)."""
  return (A**2).sum(-1)[:, :, None] + (B**2).sum(-1)[:, None, :] - 2.0 * np.einsum("bid,bjd->bij", A, B)


def _kernel_matrices(name: str, A: np.ndarray, B: np.ndarray, sigma2) -> np.ndarray:
  """k(a_i, b_j) for every pair of every image: a . b, (a . b)^2 or exp(-||a - b||^2 / (2 sigma^2))."""
  if name == "gaussian":
    return np.exp(-_squared_distances(A, B) / (2.0 * sigma2[:, None, None]))
  dots = np.einsum("bid,bjd->bij", A, B)
  return dots if name == "linear" else dots**2


def _mmd2(name: str, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
  """The biased MMD^2 of every image, (images,): the mean of each of the three double sums; the Gaussian
  sigma^2 is the mean squared distance over the pairs i != j of the image's pooled rows."""
  sigma2 = None
  if name == "gaussian":
    Z = np.concatenate([X, Y], axis=1)
    n = Z.shape[1]
    distances = _squared_distances(Z, Z) * (1.0 - np.eye(n))  # i = j is 0 up to rounding: left out
    sigma2 = distances.sum((1, 2)) / (n * (n - 1))
  k = lambda A, B: _kernel_matrices(name, A, B, sigma2).mean((1, 2))  # noqa: E731
  return k(X, X) + k(Y, Y) - 2.0 * k(X, Y)


def _per_image(name: str, student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
  """Per-image MMD^2 of NHWC maps after RepDistiller's pooling (tests/np_reference.py's match)."""
  student, teacher = ref.match(student, teacher, "pool")
  X = np.stack([ref.channel_rows(f) for f in student])
  Y = np.stack([ref.channel_rows(f) for f in teacher])
  return _mmd2(name, X, Y)


# ----------------------------------------------------------------------------------------------------
# The pure core.


def test_top_channels_by_mean_activation_ties_to_the_lower_index():
  rng = np.random.default_rng(0)
  feature_map = rng.normal(size=(3, 4, 6))
  feature_map[..., 4] = feature_map[..., 1]  # a tie: channel 1 must come before channel 4
  feature_map[..., 1] += 10.0
  feature_map[..., 4] += 10.0
  means = [feature_map[:, :, c].sum() / 12 for c in range(6)]
  expected = sorted(range(6), key=lambda c: (-means[c], c))[:3]
  assert viz.top_channels(feature_map, 3).tolist() == expected
  assert expected[:2] == [1, 4]


def test_channel_maps_are_each_channel_divided_by_its_l2_norm():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  features[1, :, :, 2] = 0.0  # a dead channel stays all zeros, not NaN
  maps = viz.channel_maps(features)
  assert maps.shape == (2, 4, 3, 5)
  for b in range(2):
    for c in range(4):
      channel = features[b, :, :, c].astype(np.float64)
      norm = np.sqrt((channel**2).sum())
      np.testing.assert_allclose(maps[b, c], channel / max(norm, 1e-12), rtol=1e-5, atol=1e-7)
  assert not maps[1, 2].any()


@pytest.mark.parametrize("shape,size", [((4, 4), (16, 16)), ((3, 5), (12, 20)), ((2, 2), (7, 9))])
def test_upsample_is_bilinear_with_half_pixel_centres(shape, size):
  maps = np.random.default_rng(2).normal(size=(3, *shape))
  out = viz.upsample(maps, size)
  assert out.shape == (3, *size)
  expected = ref.bilinear_resize(np.moveaxis(maps, 0, -1)[None], *size)[0]
  np.testing.assert_allclose(out, np.moveaxis(expected, -1, 0), rtol=1e-5, atol=1e-5)


def test_selectivity_maps_are_the_top_channels_normalised_and_upsampled():
  rng = np.random.default_rng(3)
  feature_map = rng.normal(size=(4, 4, 5)) + np.arange(5)  # channel 4 highest on average, then 3, ...
  out = viz.selectivity_maps(feature_map, 2, (8, 8))
  assert out["channels"].tolist() == [4, 3]
  rows = ref.channel_rows(feature_map).reshape(5, 4, 4)  # (C, H, W), each row over its 16 positions
  upsampled = ref.bilinear_resize(np.moveaxis(rows, 0, -1)[None], 8, 8)[0]
  np.testing.assert_allclose(out["maps"], np.moveaxis(upsampled[..., [4, 3]], -1, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["mean"], upsampled.mean(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["activation"], feature_map.mean((0, 1))[[4, 3]])


def test_embed_keeps_two_separated_clusters_apart():
  rng = np.random.default_rng(5)
  rows = np.concatenate([rng.normal(size=(20, 60)), rng.normal(size=(20, 60)) + 8.0])
  points = viz.embed(rows, seed=0)
  assert points.shape == (40, 2) and np.isfinite(points).all()
  a, b = points[:20], points[20:]
  spread = max(np.linalg.norm(a - a.mean(0), axis=1).max(), np.linalg.norm(b - b.mean(0), axis=1).max())
  assert np.linalg.norm(a.mean(0) - b.mean(0)) > 2 * spread


def test_spread_indices_and_subsample():
  assert viz.spread_indices(3, 359) == [0, 179, 358]
  assert viz.spread_indices(10, 4) == [0, 1, 2, 3]
  assert viz.subsample(5, 10, seed=0).tolist() == [0, 1, 2, 3, 4]
  chosen = viz.subsample(100, 10, seed=0)
  assert len(set(chosen.tolist())) == 10 and chosen.tolist() == sorted(chosen.tolist()) and chosen.max() < 100


# ----------------------------------------------------------------------------------------------------
# A trained run.


def test_load_finds_the_teacher_and_the_eval_images(run, root, reference):
  assert run.teacher_workdir == str(root / "teacher") and run.teacher_model == "resnet8"
  assert run.taps == tuple(STAGES) and run.tap() == ("stage3", "stage3")  # the last configured pair
  assert run.num_eval == NUM_EVAL and run.name == "kd_nst/seed0"
  batch = run.eval_images([0, 200, 358])
  assert batch["label"].tolist() == reference["labels"][[0, 200, 358]].tolist()
  assert np.abs(batch["pixels"].astype(int) - reference["pixels"][[0, 200, 358]]).max() <= 1
  # A supervised run inside a sweep root compares against the sweep's teacher.
  assert viz.load(root / "ce" / "seed0").teacher_workdir == str(root / "teacher")


@pytest.fixture(scope="module")
def mmd(root):
  return viz.mmd_per_layer(root)


def test_mmd_per_layer_over_the_eval_split_against_numpy(mmd, reference):
  figure, numbers = mmd
  assert isinstance(figure, Figure) and len(figure.axes) == 3
  assert numbers["taps"] == TAPS and numbers["images"] == NUM_EVAL
  assert sorted(numbers["methods"]) == ["ce", "kd_nst"]
  teacher = reference["features"]["teacher"]
  for method in ("kd_nst", "ce"):
    entry = numbers["methods"][method]
    assert list(entry["runs"]) == [f"{method}/seed0", f"{method}/seed1"]
    for kernel in viz.KERNELS:
      for s, t in STAGES:
        values = []
        for run in entry["runs"]:
          expected = _per_image(kernel, reference["features"][run][s], teacher[t]).mean()
          got = entry["runs"][run][kernel][f"{s}:{t}"]
          assert got == pytest.approx(expected, rel=1e-3, abs=1e-6), (run, kernel, s)
          if run == "ce/seed0":  # the teacher's own config and seed: the teacher itself
            assert got == pytest.approx(0.0, abs=1e-6)
          values.append(got)
        assert entry["mean"][kernel][f"{s}:{t}"] == pytest.approx(np.mean(values), rel=1e-12)
        assert entry["std"][kernel][f"{s}:{t}"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
  table = viz.mmd_table(numbers)
  assert "| kd_nst | 2 | gaussian |" in table and "stage3:stage3" in table
  json.dumps(numbers)


def test_mmd_of_an_exported_sweep_reuses_the_previous_numbers(mmd, root, tmp_path):
  """A copy of the sweep without checkpoints but kd_nst/seed1's (and the teacher's): the runs the
  previous numbers hold come from them, kd_nst/seed1 is measured, and together they are the full
  measurement. Without those numbers the other runs are left out; other numbers are refused."""
  _, full = mmd
  exported = tmp_path / "root"
  shutil.copytree(root, exported)
  for run in ("ce/seed0", "ce/seed1", "kd_nst/seed0"):
    shutil.rmtree(exported / run / "checkpoints")
  previous = copy.deepcopy(full)
  del previous["methods"]["kd_nst"]["runs"]["kd_nst/seed1"]
  _, numbers = viz.mmd_per_layer(exported, previous=previous)
  assert numbers["methods"] == full["methods"]  # kd_nst/seed1 measured again, bit for bit
  assert {k: numbers[k] for k in ("taps", "images", "split")} == {k: full[k] for k in ("taps", "images",
                                                                                       "split")}
  previous["images"] = 10
  with pytest.raises(viz.VizError, match="images 10"):
    viz.mmd_per_layer(exported, previous=previous)
  with pytest.raises(viz.VizError, match="kernels"):
    viz.mmd_per_layer(exported, previous={**previous, "kernels": ["linear"]})
  _, measured = viz.mmd_per_layer(exported)  # Without them: the run with a checkpoint, the rest left out.
  assert measured["methods"] == {"kd_nst": {"runs": {"kd_nst/seed1": full["methods"]["kd_nst"]["runs"][
      "kd_nst/seed1"]}, "mean": measured["methods"]["kd_nst"]["mean"],
      "std": {k: dict.fromkeys(TAPS) for k in viz.KERNELS}}}
  assert sorted(measured["left_out"]) == ["ce/seed0", "ce/seed1", "kd_nst/seed0"]
  assert "Left out (no checkpoint, no previous numbers): ce/seed0" in viz.mmd_table(measured)
  shutil.rmtree(exported / "kd_nst" / "seed1" / "checkpoints")
  with pytest.raises(viz.VizError, match="No run of the sweep root"):
    viz.mmd_per_layer(exported)


def test_selectivity_numbers_against_numpy(run, reference):
  figure, numbers = viz.selectivity(run, images=(3, 10), tap="stage2:stage3", k=3)
  assert len(figure.axes) == 2 * 2 * (3 + 2)
  assert numbers["tap"] == "stage2:stage3" and numbers["k"] == 3
  features = reference["features"]
  poly = _per_image("polynomial", features["kd_nst/seed0"]["stage2"][[3, 10]],
                    features["teacher"]["stage3"][[3, 10]])
  for entry, index, mmd in zip(numbers["images"], (3, 10), poly, strict=True):
    assert entry["index"] == index and entry["label"] == reference["labels"][index]
    for who, tap in (("teacher", "stage3"), ("student", "stage2")):
      means = features["kd_nst/seed0" if who == "student" else "teacher"][tap][index].mean((0, 1))
      assert entry[who]["channels"] == np.argsort(-means, kind="stable")[:3].tolist()
      np.testing.assert_allclose(entry[who]["mean_activation"], np.sort(means)[::-1][:3], rtol=1e-3)
    assert entry["mmd2"]["polynomial"] == pytest.approx(mmd, rel=1e-3)
  json.dumps(numbers)


def test_tsne_against_numpy_and_the_teacher_against_itself(run, root, reference):
  figure, numbers = viz.tsne(run, compare=root / "teacher", images=[0, 100], max_maps=100)
  assert len(figure.axes) == 2 and numbers["tap"] == "stage3:stage3" and numbers["kernel"] == "polynomial"
  student, teacher = numbers["panels"]
  expected = _per_image("polynomial", reference["features"]["kd_nst/seed0"]["stage3"][[0, 100]],
                        reference["features"]["teacher"]["stage3"][[0, 100]])
  np.testing.assert_allclose(student["mmd2_per_image"], expected, rtol=1e-3)
  assert student["maps"] == {"teacher": 100, "student": 100}
  assert student["maps_total"] == {"teacher": 2 * 64, "student": 2 * 64}
  np.testing.assert_allclose(teacher["mmd2_per_image"], 0.0, atol=1e-6)  # the same maps: MMD^2 = 0
  json.dumps(numbers)


# ----------------------------------------------------------------------------------------------------
# The command line.


def _check_png(path: pathlib.Path, inches: tuple[float, float]):
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.size == (round(inches[0] * DPI), round(inches[1] * DPI)), path
    pixels = np.asarray(image.convert("RGB"), np.float64)
  h, w = pixels.shape[:2]
  for tile in (pixels[: h // 2, : w // 2], pixels[: h // 2, w // 2:], pixels[h // 2:, : w // 2],
               pixels[h // 2:, w // 2:], pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4]):
    assert tile.var() > 0, path  # every quarter and the centre drawn on
  assert (pixels.min(-1) < 250).mean() > 0.02, path  # more than a blank page with a title


def test_every_png_the_command_line_writes_is_a_real_picture(root, tmp_path, capsys):
  kd, ce = str(root / "kd_nst" / "seed0"), str(root / "ce" / "seed0")
  cell = viz.CELL_INCHES
  commands = [
      (["selectivity", "--workdir", kd, "--images", "0,5", "--k", "3"], (cell * 5, cell * 4)),
      (["tsne", "--workdir", kd, "--compare", ce, "--num_images", "2"],
       (2 * viz.TSNE_PANEL_INCHES[0], viz.TSNE_PANEL_INCHES[1])),
      (["mmd", "--workdir", kd, "--kernels", "linear,gaussian"],
       (2 * viz.MMD_PANEL_INCHES[0], viz.MMD_PANEL_INCHES[1])),
      (["curves", "--workdir", str(root)], (6.4, 4.2)),  # curves.sweep_figure's size
      (["curves", "--workdir", kd], (10.0, 4.0)),  # curves.run_figure's size
  ]
  for i, (argv, inches) in enumerate(commands):
    out = tmp_path / f"out{i}"
    written = viz.main([*argv, "--out", str(out), "--dpi", str(DPI)])
    assert sorted(pathlib.Path(p).name for p in written) == sorted(p.name for p in out.iterdir())
    command = argv[0]
    _check_png(out / f"{command}.png", inches)
    if command != "curves":
      numbers = json.loads((out / f"{command}.json").read_text())
      assert numbers
    if command == "mmd":
      assert numbers["kernels"] == ["linear", "gaussian"] and list(numbers["methods"]) == ["kd_nst/seed0"]
      assert (out / "mmd.md").read_text().count("| kd_nst/seed0 |") == 2
    if command == "tsne":
      assert [p["name"] for p in numbers["panels"]] == ["kd_nst/seed0", "ce/seed0"]
  assert "selectivity.png" in capsys.readouterr().out


@pytest.fixture(scope="module")
def broken(root, tmp_path_factory):
  """A finished run without checkpoints, and a supervised run outside any sweep."""
  base = tmp_path_factory.mktemp("broken")
  for name, source in (("no_checkpoint", "kd_nst/seed0"), ("lone_ce", "ce/seed0")):
    (base / name).mkdir()
    for file in ("config.json", "results.json"):
      shutil.copy(root / source / file, base / name / file)
  shutil.copytree(root / "ce" / "seed0" / "checkpoints", base / "lone_ce" / "checkpoints")
  (base / "empty").mkdir()
  return base


@pytest.mark.parametrize("argv,message", [
    (["selectivity", "--workdir", "{kd}", "--tap", "stage9:stage3"],
     "--tap: 'stage9' is not a tap of the student resnet8. Valid student taps: stage1, stage1_preact, "
     "stage2, stage2_preact, stage3, stage3_preact, stem."),
    (["selectivity", "--workdir", "{kd}", "--tap", "stage3:stage3_relu"], "Valid teacher taps:"),
    (["selectivity", "--workdir", "{kd}", "--images", "0,359"],
     "Image index 359 is out of range: the eval split ('validation') has 359 images, valid indices 0 to "
     "358."),
    (["selectivity", "--workdir", "{kd}", "--images", "0,x"], "--images must be comma-separated integer"),
    (["selectivity", "--workdir", "{broken}/no_checkpoint"], "has no checkpoint in"),
    (["tsne", "--workdir", "{broken}/lone_ce"], "is supervised (config.teacher.model is empty)"),
    (["mmd", "--workdir", "{broken}/missing"], "does not exist or is not a directory"),
    (["mmd", "--workdir", "{kd}", "--kernels", "cosine"],
     "Unknown kernel(s) ['cosine']. Valid kernels: linear, polynomial, gaussian."),
    (["selectivity", "--workdir", "{kd}", "--compare", "{kd}"],
     "--compare does not apply to selectivity; its options: --images, --k, --tap."),
    (["curves", "--workdir", "{broken}/empty"], "is neither a finished run"),
])
def test_bad_input_is_one_line_and_exit_status_2(root, broken, tmp_path, capsys, argv, message):
  argv = [a.format(kd=root / "kd_nst" / "seed0", broken=broken) for a in argv]
  with pytest.raises(SystemExit) as exit_info:
    viz.main([*argv, "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("nst_jax.tools.viz: ") and "\n" not in err and message in err, err
  assert not (tmp_path / "out").exists()


def test_unknown_command_is_an_argparse_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    viz.main(["draw", "--workdir", str(tmp_path), "--out", str(tmp_path)])
  assert exit_info.value.code == 2 and "invalid choice: 'draw'" in capsys.readouterr().err


def test_channel_samples_are_the_normalised_rows_after_pooling():
  rng = np.random.default_rng(4)
  student = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  teacher = np.abs(rng.normal(size=(2, 8, 6, 5))).astype(np.float32)  # pooled to 4 x 4 per axis
  _, t = ref.match(student, teacher, "pool")
  X, Y = viz.channel_samples(student, teacher)
  np.testing.assert_allclose(Y[1], ref.channel_rows(t[1]), rtol=1e-5, atol=1e-6)
  assert X.shape == (2, 3, 16) and Y.shape == (2, 5, 16)
