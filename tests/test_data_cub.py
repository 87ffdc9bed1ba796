"""CUB-200-2011 (`nc_jax.data.cub`): the official layout, its archive,
tfds's caltech_birds2011 (mocked), the long-tailed variant, and a short
fine-tuning run of the `cub200` preset from a random "pretrained" file."""

from __future__ import annotations

import itertools
import json
import pathlib
import tarfile

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nc_jax import data
from nc_jax import pretrained
from nc_jax import validation
from nc_jax import sharding
from nc_jax.data import archive
from nc_jax.data import cub
from nc_jax.data import registry
from nc_jax.data import long_tail

MESH = sharding.make_mesh(jax.devices()[:1])
K = 200


def write_release(root: pathlib.Path, *, train_per_class=(2,),
                  test_images: int = 200, seed: int = 0) -> pathlib.Path:
  """A CUB_200_2011/ folder in the official layout with small JPEGs of
  varied sizes: `train_per_class` images of class c (cycled), and
  `test_images` test images over the classes in turn. As in the real
  release, ids are not in path order (they are shuffled here); the split
  interleaves."""
  rng = np.random.default_rng(seed)
  top = root / cub.FOLDER
  rows = []  # (relative path, class 1..K, is_train)
  per = itertools.cycle(train_per_class)
  for c in range(K):
    folder = f"{c + 1:03d}.Bird_{c + 1:03d}"
    n_train = next(per)
    n_test = len(range(c, test_images, K))
    for i in range(n_train + n_test):
      rows.append((f"{folder}/Bird_{c + 1:03d}_{i:04d}.jpg", c + 1,
                   int(i < n_train)))
  rows.sort()
  rows = [rows[j] for j in rng.permutation(len(rows))]  # ids != path order
  for rel, c, _ in rows:
    path = top / "images" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rng.integers(12, 40, 2)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        path, quality=90)
  lines = lambda f: "\n".join(f(i + 1, r) for i, r in enumerate(rows))  # pylint: disable=unnecessary-lambda-assignment
  (top / "images.txt").write_text(lines(lambda i, r: f"{i} {r[0]}"))
  (top / "image_class_labels.txt").write_text(lines(lambda i, r: f"{i} {r[1]}"))
  (top / "train_test_split.txt").write_text(lines(lambda i, r: f"{i} {r[2]}"))
  (top / "classes.txt").write_text("\n".join(
      f"{c + 1} {c + 1:03d}.Bird_{c + 1:03d}" for c in range(K)))
  return top


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  return write_release(tmp_path_factory.mktemp("cub"))


def take(it, n):
  return [jax.tree.map(np.asarray, b) for b in itertools.islice(it, n)]


def test_read_release_in_path_order(release):
  """The canonical order is the path under images/, not images.txt's ids
  (which the fixture shuffles, as the real release's are not in path
  order): the order tfds's file names give too."""
  splits, names = cub.read_release(str(release))
  train, test = splits["train"], splits["test"]
  assert list(train.ids) == sorted(train.ids)
  assert train.labels.size == 2 * K and test.labels.size == K
  assert np.bincount(train.labels, minlength=K).tolist() == [2] * K
  assert train.read_files and train.ids[:2] == (
      "001.Bird_001/Bird_001_0000.jpg", "001.Bird_001/Bird_001_0001.jpg")
  assert test.ids[0] == "001.Bird_001/Bird_001_0002.jpg"
  assert train.labels[0] == 0 and test.labels[-1] == K - 1
  assert names[0] == "001.Bird_001" and len(names) == K
  assert all(pathlib.Path(p).is_file() for p in train.items[:5])


@pytest.mark.parametrize("form", ["folder", "parent", "archive"])
def test_data_dir_forms(release, tmp_path, monkeypatch, form):
  monkeypatch.setenv("NC_JAX_CACHE", str(tmp_path / "cache"))
  given = {"folder": release, "parent": release.parent}.get(form)
  if form == "archive":
    given = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(given, "w:gz") as t:
      t.add(release, arcname=cub.FOLDER)
      (tmp_path / "attributes.txt").write_text("1 has_bill_shape\n")
      t.add(tmp_path / "attributes.txt", arcname="attributes.txt")
  resolved = archive.resolve_data_dir(str(given))
  data.check_data("cub200", resolved)
  ev = data.make_eval_input("cub200", data_dir=resolved, batch_size=64,
                            mesh=MESH)
  assert ev.num_examples == K and ev.num_batches == 4


def _copy(release, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  out = tmp_path / cub.FOLDER
  shutil.copytree(release, out)
  return out


def test_a_damaged_release_names_the_file(release, tmp_path):
  bad = _copy(release, tmp_path)
  (bad / "train_test_split.txt").unlink()
  with pytest.raises(ValueError, match=r"train_test_split.txt is missing"):
    data.check_data("cub200", str(bad))
  bad = _copy(release, tmp_path / "b")
  first = next((bad / "images").rglob("*.jpg"))
  first.unlink()
  with pytest.raises(ValueError, match=rf"not on disk, e.g. .*{first.name}"):
    data.check_data("cub200", str(bad))
  bad = _copy(release, tmp_path / "c")
  (bad / "image_class_labels.txt").write_text("1 1\nnot a line\n")
  with pytest.raises(ValueError, match=r"image_class_labels.txt line 2"):
    data.check_data("cub200", str(bad))
  with pytest.raises(ValueError, match=r"neither the CUB-200-2011 release"):
    data.check_data("cub200", str(tmp_path / "c" / cub.FOLDER / "images"))


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
def test_balanced_train_input_resumes_exactly(release):
  kw = dict(data_dir=str(release), imb_factor=1.0, batch_size=8, seed=3,
            mesh=MESH, options={"crop_min_area": 0.2, "color_jitter": 0.0})
  ti = data.make_train_input("cub200", **kw)
  assert ti.counts == [2] * K and ti.steps_per_epoch == 50
  assert dict(ti.info.class_groups) == {} and "no groups" in ti.groups_note
  assert ti.subset["images"][0] == ["001.Bird_001/Bird_001_0000.jpg",
                                    "001.Bird_001/Bird_001_0001.jpg"]
  full = take(ti.iterate(48), 4)  # crosses the epoch boundary at 50
  assert full[0]["image"].shape == (8, 224, 224, 3)
  assert full[0]["image"].dtype == np.uint8
  for a, b in zip(take(ti.iterate(50), 2), full[2:]):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # One epoch holds every image once (400 = 50 steps of 8).
  epoch = take(ti.iterate(0), 50)
  assert np.bincount(np.concatenate([b["label"] for b in epoch]),
                     minlength=K).tolist() == [2] * K


def test_long_tailed_variant(tmp_path):
  top = write_release(tmp_path, train_per_class=(8,), test_images=K)
  ti = data.make_train_input("cub200", data_dir=str(top), imb_factor=0.25,
                             batch_size=8, seed=0, mesh=MESH)
  want = long_tail.long_tail_counts(8, 0.25, num_classes=K)
  assert ti.counts == want and ti.counts[0] == 8 and ti.counts[-1] == 2
  assert ti.info.class_groups["tail"] == tuple(range(140, 200))
  # The reference's selection, in the official order.
  labels = np.repeat(np.arange(K), 8)
  idx, _ = long_tail.select_long_tail(labels, want, seed=0)
  split = cub.read_release(str(top))[0]["train"]
  assert [i for ids in ti.subset["images"] for i in ids] == [
      split.ids[j] for j in idx]
  with pytest.raises(ValueError, match="no image of"):
    data.make_train_input("cub200", data_dir=str(top), imb_factor=0.01,
                          batch_size=8, seed=0, mesh=MESH)


def test_eval_input_pads_and_masks(release):
  ev = data.make_eval_input("cub200", data_dir=str(release), batch_size=48,
                            mesh=MESH)
  batches = take(ev.iterate(), 10)
  assert len(batches) == 5 and batches[0]["image"].shape == (48, 224, 224, 3)
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert mask.sum() == K and labels.tolist() == list(range(K))
  tr = data.make_eval_input("cub200", data_dir=str(release), batch_size=48,
                            mesh=MESH, split="train_lt", imb_factor=1.0)
  assert tr.num_examples == 2 * K


def test_tfds_route_orders_by_file_name_and_streams_from_memory():
  """tfds caltech_birds2011, mocked with 2 JPEGs per class stored in a
  shuffled order: read in file-name order, encoded bytes held in memory,
  the same batches as the equal folder tree would give."""
  rng = np.random.default_rng(1)
  names = [f"{c + 1:03d}.Bird_{c + 1:03d}/Bird_{c + 1:03d}_{i:04d}.jpg"
           for c in range(K) for i in range(2)]
  # tfds stores the archive's path of each image.
  stored = [f"CUB_200_2011/images/{n}" for n in names]
  labels = np.repeat(np.arange(K), 2)
  jpegs = [tf.io.encode_jpeg(rng.integers(0, 256, (20, 24, 3), np.uint8)
                             ).numpy() for _ in names]
  order = rng.permutation(len(names))

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    return tf.data.Dataset.from_tensor_slices({
        "image": [jpegs[j] for j in order],
        "image/filename": [stored[j] for j in order],
        "label": labels[order]})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    split, class_names = cub.read_tfds(None, "train")
    ti = data.make_train_input("cub200", data_dir=None, imb_factor=1.0,
                               batch_size=8, seed=0, mesh=MESH)
    batches = take(ti.iterate(0), 2)
  # The release's ids (the path under images/), in the release's order.
  assert list(split.ids) == names and not split.read_files
  assert split.items == tuple(jpegs) and len(class_names) == K
  assert ti.counts == [2] * K and batches[0]["image"].shape == (8, 224, 224,
                                                                 3)


@pytest.mark.parametrize("override,match", [
    ({"pipeline": "device"}, "streamed from disk"),
    ({"crop_min_area": 0.0}, r"crop_min_area must lie in \(0, 1\]"),
    ({"imb_factor": 0.0}, "imb_factor"),
])
def test_options_are_checked_before_any_work(override, match):
  options = {"color_jitter": 0.0, "crop_min_area": 0.2}
  kw = dict(pipeline="tfdata", imb_factor=1.0)
  for k, v in override.items():
    (kw if k in kw else options)[k] = v
  with pytest.raises(ValueError, match=match):
    registry.get_dataset("cub200").check_options(options=options, **kw)


def test_preset_needs_the_weights_and_names_them():
  from nc_jax.configs import cifar_lt as cfg_lib  # pylint: disable=g-import-not-at-top
  config = cfg_lib.get_config("cub200_etf_dr")
  assert (config.backbone, config.batch_size, config.optim.lr,
          config.optim.backbone_lr_scale, config.optim.nesterov) == (
              "resnet50_standard", 48, 0.01, 0.1, True)
  validation.check_values(config)  # the numbers; the file is checked apart
  with pytest.raises(ValueError, match=r"--config.pretrained="):
    pretrained.check_request(config)
  config.unlock()
  config.pretrained = "/nonexistent/resnet50.pth"
  with pytest.raises(ValueError, match="No pretrained-weights file"):
    pretrained.check_request(config)
  assert "cub200_etf_dr" not in cfg_lib.presets()
  assert set(cfg_lib.fine_grained_presets()) == {"cub200_ce", "cub200_etf_dr"}


@pytest.mark.slow
def test_fine_tuning_from_a_converted_file_end_to_end(tmp_path):
  """The cub200 preset for 2 steps from a random torchvision-layout
  ResNet-50 file: the backbone starts from the file (not from the seed),
  the head and BatchNorm train, results.json has top-1/top-5/per-class."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from nc_jax.configs import cifar_lt as cfg_lib  # pylint: disable=g-import-not-at-top
  from nc_jax import runs, train  # pylint: disable=g-import-not-at-top
  from tests.test_pretrained import _torchvision_state_dict  # pylint: disable=g-import-not-at-top
  top = write_release(tmp_path / "data", train_per_class=(1,), test_images=2)
  weights = {k: v.numpy() for k, v in _torchvision_state_dict(1).items()}
  safetensors.numpy.save_file(weights, str(tmp_path / "resnet50.safetensors"))
  c = cfg_lib.get_config("cub200_etf_dr,steps=2")
  c.unlock()
  c.update(dict(data_dir=str(top), batch_size=2, eval_batch_size=2,
                pretrained=str(tmp_path / "resnet50.safetensors"),
                log_every_steps=1, eval_every_epochs=None,
                checkpoint_every_epochs=None))
  c.optim.decay_epochs = ()
  # A random "pretrained" network gives huge gradients; a backbone rate of
  # ~0 keeps its weights where the file put them, to be checked below.
  c.optim.backbone_lr_scale = 1e-9
  c.lock()
  res = train.train_and_evaluate(c, tmp_path / "wd")
  assert res["final"]["num_examples"] == 2
  assert {"top1", "top5", "per_class"} <= set(res["final"])
  assert len(res["final"]["per_class"]) == K and res["train_counts"] == [1] * K
  conf = json.loads((tmp_path / "wd" / "config.json").read_text())
  assert conf["pretrained"].endswith("resnet50.safetensors")
  # The backbone's kernels are the file's (OIHW -> HWIO).
  run = runs.load(tmp_path / "wd")
  backbone = run.params["backbone"]
  for got, name in ((backbone["conv1"]["kernel"], "conv1.weight"),
                    (backbone["layer4_2"]["conv3"]["kernel"],
                     "layer4.2.conv3.weight")):
    ref = weights[name].transpose(2, 3, 1, 0)
    np.testing.assert_allclose(np.asarray(got), ref,
                               atol=1e-4 * np.abs(ref).max(), err_msg=name)
