"""ImageNet-LT: list parsing, tfds imagenet2012 mock + tiny list, folder tree."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nc_jax import data
from nc_jax import sharding
from nc_jax.data import imagenet_lt
from nc_jax.data import sources

MESH = sharding.make_mesh(jax.devices()[:1])
N_MOCK = 24


def take(it, n):
  return [jax.tree.map(np.asarray, b) for b in itertools.islice(it, n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_read_split_list(tmp_path):
  p = tmp_path / "list.txt"
  p.write_text("train/n01440764/n01440764_10026.JPEG 0\n\n"
               "train/n01443537/a b.JPEG 1\n")
  paths, labels = imagenet_lt.read_split_list(p)
  assert paths == ["train/n01440764/n01440764_10026.JPEG",
                   "train/n01443537/a b.JPEG"]
  assert labels.tolist() == [0, 1]
  p.write_text("train/x.JPEG\n")
  with pytest.raises(ValueError, match="list.txt:1"):
    imagenet_lt.read_split_list(p)
  with pytest.raises(FileNotFoundError, match="imagenet_lt_train_list"):
    imagenet_lt.read_split_list(None)


@pytest.fixture
def mock_imagenet(tmp_path):
  """A tfds-style data_dir and a list of every other mocked example."""
  (tmp_path / "imagenet2012").mkdir()
  with tfds.testing.mock_data(num_examples=N_MOCK):
    src = sources.check_data_dir("imagenet_lt", tmp_path)
    names = [ex["file_name"].decode() for ex in
             sources.encoded_dataset(src, "train").as_numpy_iterator()]
    listed = names[::2]
    # Labels chosen here, not the mock's: the list is authoritative.
    lines = [f"train/n{i % 3:08d}/{n} {7 * (i % 3)}"
             for i, n in enumerate(listed)]
    lst = tmp_path / "ImageNet_LT_train.txt"
    lst.write_text("\n".join(lines) + "\n")
    yield str(tmp_path), str(lst)


def test_tfds_imagenet_lt_train_stream(mock_imagenet):
  root, lst = mock_imagenet
  kw = dict(data_dir=root, imb_factor=1.0, batch_size=4, seed=2, mesh=MESH,
            imagenet_lt_train_list=lst)
  ti = data.make_train_input("imagenet_lt", **kw)
  assert ti.num_examples == N_MOCK // 2 and ti.steps_per_epoch == 3
  assert ti.counts[0] == 4 and ti.counts[7] == 4 and ti.counts[14] == 4
  assert sum(ti.counts) == 12
  assert ti.info.class_groups["tail"] == tuple(range(1000))  # all < 20
  full = take(ti.iterate(0), 7)
  b = full[0]
  assert b["image"].shape == (4, 224, 224, 3) and b["image"].dtype == np.uint8
  assert set(np.concatenate([x["label"] for x in full])) <= {0, 7, 14}
  # One epoch: each listed image once (4 per class, 12 = 3 full batches).
  epoch = np.concatenate([x["label"] for x in full[:3]])
  assert np.bincount(epoch, minlength=15)[[0, 7, 14]].tolist() == [4, 4, 4]
  assert_same(take(data.make_train_input("imagenet_lt", **kw).iterate(0), 7),
              full)
  for k in (2, 3, 4):
    assert_same(take(ti.iterate(k), 7 - k), full[k:])
  parts = [take(data.make_train_input("imagenet_lt", _process=(p, 2), **kw)
                .iterate_local(1), 2) for p in range(2)]
  for s in range(2):
    np.testing.assert_array_equal(
        np.concatenate([parts[0][s]["image"], parts[1][s]["image"]]),
        full[1 + s]["image"])
  with pytest.raises(ValueError, match="tfdata"):
    data.make_train_input("imagenet_lt", pipeline="device", **kw)


def test_tfds_imagenet_lt_eval(mock_imagenet):
  root, lst = mock_imagenet  # the fixture keeps tfds mocked
  src = sources.check_data_dir("imagenet_lt", root)
  labels = [int(ex["label"]) for ex in
            sources.encoded_dataset(src, "test").as_numpy_iterator()]
  ev = data.make_eval_input("imagenet_lt", data_dir=root, batch_size=10,
                            mesh=MESH)
  batches = take(ev.iterate(), 100)
  tl = data.make_eval_input("imagenet_lt", data_dir=root, batch_size=8,
                            mesh=MESH, split="train_lt",
                            imagenet_lt_train_list=lst)
  tb = take(tl.iterate(), 100)
  assert ev.num_examples == N_MOCK and len(batches) == 3
  assert batches[0]["image"].shape == (10, 224, 224, 3)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == N_MOCK and not mask[-1]
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in batches])[mask], labels)
  assert not np.concatenate([b["image"] for b in batches])[~mask].any()
  tmask = np.concatenate([b["mask"] for b in tb])
  assert tmask.sum() == 12 and len(tb) == 2
  assert np.bincount(np.concatenate([b["label"] for b in tb])[tmask]
                     ).tolist()[::7] == [4, 4, 4]


def test_folder_imagenet_lt(tmp_path):
  rng = np.random.default_rng(0)
  lines = []
  for split in ("train", "test"):
    for c in range(3):
      d = tmp_path / split / f"n{c:08d}"
      d.mkdir(parents=True)
      for i in range(5):
        hw = rng.integers(20, 60, 2)
        img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        tf.io.write_file(str(d / f"{i}.JPEG"), tf.io.encode_jpeg(img))
        if split == "train" and i < 4 - c:
          lines.append(f"train/n{c:08d}/{i}.JPEG {c}")
  lst = tmp_path / "list.txt"
  lst.write_text("\n".join(lines))
  kw = dict(data_dir=tmp_path, imb_factor=1.0, batch_size=3, seed=0,
            mesh=MESH, imagenet_lt_train_list=str(lst))
  ti = data.make_train_input("imagenet_lt", **kw)
  assert ti.counts[:3] == [4, 3, 2] and ti.steps_per_epoch == 3
  full = take(ti.iterate(0), 7)
  assert full[0]["image"].shape == (3, 224, 224, 3)
  assert np.bincount(np.concatenate([b["label"] for b in full[:3]])
                     ).tolist() == [4, 3, 2]
  assert_same(take(ti.iterate(4), 3), full[4:])
  ev = data.make_eval_input("imagenet_lt", data_dir=tmp_path, batch_size=4,
                            mesh=MESH)
  evs = take(ev.iterate(), 100)
  mask = np.concatenate([b["mask"] for b in evs])
  assert ev.num_examples == 15 and mask.sum() == 15 and len(evs) == 4
  assert np.bincount(np.concatenate([b["label"] for b in evs])[mask]
                     ).tolist() == [5, 5, 5]


def test_tfds_stream_detects_listed_images_missing(mock_imagenet, tmp_path):
  root, lst = mock_imagenet
  bad = tmp_path / "bad.txt"
  bad.write_text(open(lst).read() + "".join(
      f"train/n00000000/missing_{i}.JPEG 0\n" for i in range(4)))
  ti = data.make_train_input("imagenet_lt", data_dir=root, imb_factor=1.0,
                             batch_size=4, seed=0, mesh=MESH,
                             imagenet_lt_train_list=str(bad))
  assert ti.steps_per_epoch == 4  # 16 listed, only 12 exist
  with pytest.raises(RuntimeError, match="fewer than the 16 listed"):
    take(ti.iterate(0), 5)
