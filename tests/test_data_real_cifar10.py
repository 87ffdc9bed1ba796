"""Integration on the real CIFAR-10 as an image-folder tree (real-data tier).

The session fixture `cifar10_dir` (tests/conftest.py) writes the tree from
the original release named by $NC_JAX_CIFAR10_RELEASE, losslessly (PNG):
file NNNN of a class is that class's NNNN-th image in the release.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np

from nc_jax import data
from nc_jax import sharding
import pytest

# Writes and decodes 60,000 real images.
pytestmark = [pytest.mark.slow, pytest.mark.real_data]

MESH = sharding.make_mesh(jax.devices()[:1])
CIFAR10_R001 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def take(it, n):
  return [jax.tree.map(np.asarray, b) for b in itertools.islice(it, n)]


def test_cifar10_lt_train_input(cifar10_dir):
  ti = data.make_train_input("cifar10", data_dir=cifar10_dir, imb_factor=0.01,
                             batch_size=128, seed=0, mesh=MESH)
  assert ti.counts == CIFAR10_R001
  assert ti.num_examples == 12406 and ti.steps_per_epoch == 96
  dev = data.make_train_input("cifar10", data_dir=cifar10_dir,
                              imb_factor=0.01, batch_size=128, seed=0,
                              mesh=MESH, pipeline="device")
  t_epoch = take(ti.iterate(0), 96)
  d_epoch = take(dev.iterate(0), 96)
  b = t_epoch[0]
  assert b["image"].shape == (128, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["label"].dtype == np.int32
  assert 40 < b["image"].mean() < 200  # real pixels, not zeros
  hist_t = np.bincount(np.concatenate([x["label"] for x in t_epoch]),
                       minlength=10)
  hist_d = np.bincount(np.concatenate([x["label"] for x in d_epoch]),
                       minlength=10)
  np.testing.assert_array_equal(hist_t, hist_d)
  assert hist_t.sum() == 96 * 128
  assert np.all(hist_t <= CIFAR10_R001)
  assert np.all(hist_t >= np.asarray(CIFAR10_R001) - 12406 % 128)
  for x, y in zip(t_epoch[:4], d_epoch[:4]):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_cifar10_test_set_once(cifar10_dir):
  ev = data.make_eval_input("cifar10", data_dir=cifar10_dir, batch_size=512,
                            mesh=MESH)
  assert ev.num_examples == 10000 and ev.num_batches == 20
  batches = take(ev.iterate(), 100)
  assert len(batches) == 20
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 10000 and batches[-1]["mask"].sum() == 10000 % 512
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert np.bincount(labels).tolist() == [1000] * 10
  images = np.concatenate([b["image"] for b in batches])[mask]
  assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
  # Each file appears once: (nearly) all 10,000 images are distinct.
  assert len({x.tobytes() for x in images}) >= 9990


def _reference_subset(classes, ratio):
  """The reference's selection, computed here from its description alone:
  np.random.seed(0) once, then per class in label order shuffle the
  indices of that class (CIFAR-10's original order, which the tree's
  NNNN numbering keeps) and keep the first n_c."""
  rng = np.random.RandomState(0)
  out = []
  for c, name in enumerate(classes):
    n_c = int(5000 * ratio ** (c / 9.0))
    idx = np.arange(5000)
    rng.shuffle(idx)
    out.append(sorted(f"{name}/{i:04d}.png" for i in idx[:n_c]))
  return out


def test_cifar10_r001_subset_is_the_references(cifar10_dir):
  from nc_jax.data import in_memory
  arrays = in_memory.load_train_lt("cifar10", str(cifar10_dir), 0.01, "exp", 0)
  rec = arrays.subset_record()
  assert rec["classes"] == ["airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"]
  want = _reference_subset(rec["classes"], 0.01)
  assert [len(x) for x in want] == CIFAR10_R001
  assert [sorted(x) for x in rec["images"]] == want
  # The images held are those files, in the record's order.
  first = rec["images"][9][0]
  from PIL import Image
  pixels = np.asarray(Image.open(cifar10_dir / "train" / first).convert("RGB"))
  np.testing.assert_array_equal(
      arrays.images[arrays.ids.index(first)], pixels)
