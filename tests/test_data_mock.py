"""CIFAR-100, SVHN (train + extra) and STL-10 through tfds mock data.

`tfds.testing.mock_data` yields the same deterministic random examples for
every split; the data_dir only has to look like a tfds data directory
(`<dir>/<tfds_name>/`) for `check_data_dir`.
"""

from __future__ import annotations

import itertools
import os
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from nc_jax import data
from nc_jax import sharding
from nc_jax.data import device as device_lib
from nc_jax.data import long_tail
from nc_jax.data import sources
from nc_jax.data import tfds_prepare
from nc_jax.data import in_memory

MESH = sharding.make_mesh(jax.devices()[:1])


@pytest.fixture
def tfds_dir(tmp_path):
  for name in ("cifar100", "svhn_cropped", "stl10"):
    (tmp_path / name).mkdir()
  return str(tmp_path)


def expected_counts(source, split, r, k):
  labels = sources.split_index(source, split).labels
  want = long_tail.long_tail_counts(labels.size / k, r, num_classes=k)
  return long_tail.select_long_tail(labels, want, seed=0)[1]


def take(it, n):
  return [jax.tree.map(np.asarray, b) for b in itertools.islice(it, n)]


def test_cifar100_mock(tfds_dir):
  with tfds.testing.mock_data(num_examples=600):
    source = sources.check_data_dir("cifar100", tfds_dir)
    assert source.kind == "tfds"
    want = expected_counts(source, "train", 0.5, 100)
    ti = data.make_train_input("cifar100", data_dir=tfds_dir, imb_factor=0.5,
                               batch_size=32, seed=0, mesh=MESH)
    ev = data.make_eval_input("cifar100", data_dir=tfds_dir, batch_size=64,
                              mesh=MESH)
    evs = take(ev.iterate(), 100)
  assert ti.counts == want and ti.num_examples == sum(want)
  assert ti.info.num_classes == 100
  b = take(ti.iterate(0), 2)
  assert b[0]["image"].shape == (32, 32, 32, 3)
  assert b[0]["image"].dtype == np.uint8
  assert ev.num_examples == 600 and len(evs) == 10
  assert sum(int(x["mask"].sum()) for x in evs) == 600


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
def test_svhn_mock_concatenates_train_and_extra(tfds_dir):
  with tfds.testing.mock_data(num_examples=300):
    source = sources.check_data_dir("svhn", tfds_dir)
    one = expected_counts(source, "train", 0.1, 10)
    ti = data.make_train_input("svhn", data_dir=tfds_dir, imb_factor=0.1,
                               batch_size=16, seed=1, mesh=MESH)
    dev = data.make_train_input("svhn", data_dir=tfds_dir, imb_factor=0.1,
                                batch_size=16, seed=1, mesh=MESH,
                                pipeline="device")
  # Mock train and extra are the same 300 examples, each subsampled with the
  # same ratio and seed, so every class count doubles.
  assert ti.counts == [2 * c for c in one]
  arrays = in_memory.load_train_lt("svhn", os.path.abspath(tfds_dir), 0.1,
                                 "exp", 0)
  half = arrays.labels.size // 2
  np.testing.assert_array_equal(arrays.images[:half], arrays.images[half:])
  # No augmentation: batches are the selected images, in the plan's order.
  perm = np.asarray(device_lib.epoch_permutation(1, 0, ti.num_examples))
  batches = take(ti.iterate(0), 3)
  for s, b in enumerate(batches):
    idx = perm[s * 16:(s + 1) * 16]
    np.testing.assert_array_equal(b["image"], arrays.images[idx])
    np.testing.assert_array_equal(b["label"], arrays.labels[idx])
  for x, y in zip(batches, take(dev.iterate(0), 3)):
    np.testing.assert_array_equal(x["image"], y["image"])


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
def test_stl10_mock_keeps_96x96(tfds_dir):
  with tfds.testing.mock_data(num_examples=120):
    source = sources.check_data_dir("stl10", tfds_dir)
    want = expected_counts(source, "train", 0.5, 10)
    ti = data.make_train_input("stl10", data_dir=tfds_dir, imb_factor=0.5,
                               batch_size=8, seed=0, mesh=MESH)
    ev = data.make_eval_input("stl10", data_dir=tfds_dir, batch_size=16,
                              mesh=MESH)
    evs = take(ev.iterate(), 100)
  assert ti.counts == want
  assert ti.info.image_shape == (96, 96, 3)
  assert next(ti.iterate(0))["image"].shape == (8, 96, 96, 3)
  assert evs[0]["image"].shape == (16, 96, 96, 3)
  assert sum(int(x["mask"].sum()) for x in evs) == 120
  assert not evs[-1]["mask"][-1]


@pytest.mark.slow
def test_unset_data_dir_trains_through_tfds(tmp_path, monkeypatch):
  """With data_dir unset, training asks tfds for the dataset in tfds's
  default data directory (download_and_prepare, then as_dataset), here
  mocked by tfds itself."""
  from nc_jax import train  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  # A machine that can reach the dataset's host (no network probe).
  monkeypatch.setattr(tfds_prepare, "unreachable", lambda builder: None)
  asked = []
  with tfds.testing.mock_data(num_examples=200):
    mocked = tfds.core.DatasetBuilder.download_and_prepare

    def spy(self, *args, **kwargs):
      asked.append(self.name)
      return mocked(self, *args, **kwargs)

    config = tiny_config(None, arg="steps=2")
    config.unlock()
    config.data_dir = None
    config.lock()
    # (Restored before mock_data restores the original.)
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                           spy):
      res = train.train_and_evaluate(config, tmp_path / "run")
  assert asked == ["cifar10"]
  # tfds's 200 random examples per split, long-tailed at r = 0.1.
  assert res["final"]["num_examples"] == 200
  assert 0 < res["num_train_examples"] <= 20 * 10
  assert res["config"]["data_dir"] is None
