"""Long-tailed counts, the seeded selection, the registry and data_dir checks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from nc_jax import data
from nc_jax.data import long_tail
from nc_jax.data import datasets
from nc_jax.data import sources

CIFAR10_R001 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_cifar10_counts_at_r001_match_the_paper():
  counts = data.long_tail_counts(5000, 0.01, num_classes=10)
  assert counts == CIFAR10_R001
  assert sum(counts) == 12406


@pytest.mark.parametrize("r,total10,total100,tail100", [
    (0.005, 11203, 9502, 2), (0.01, 12406, 10847, 5), (0.02, 13996, 12608, 10)])
def test_totals_for_cifar10_and_cifar100(r, total10, total100, tail100):
  c10 = data.long_tail_counts(5000, r, num_classes=10)
  c100 = data.long_tail_counts(500, r, num_classes=100)
  assert sum(c10) == total10
  assert sum(c100) == total100
  assert c10[0] == 5000 and c10[-1] == int(5000 * r)
  assert c100[0] == 500 and c100[-1] == tail100
  assert all(a >= b for a, b in zip(c100, c100[1:]))  # non-increasing


def test_step_profile():
  assert data.long_tail_counts(5000, 0.01, num_classes=10, profile="step") == (
      [5000] * 5 + [50] * 5)
  # CIFAR-100 step at r=0.1: half 500, half 50.
  c = data.long_tail_counts(500, 0.1, num_classes=100, profile="step")
  assert c == [500] * 50 + [50] * 50
  # Odd K keeps every class (the reference would lose the last one).
  assert data.long_tail_counts(100, 0.1, num_classes=5, profile="step") == (
      [100, 100, 10, 10, 10])


def test_balanced_and_float_n_max():
  assert data.long_tail_counts(500, 1.0, num_classes=100) == [500] * 100
  # SVHN train: 73,257 / 10 = 7325.7 -> truncated like the reference.
  c = data.long_tail_counts(73257 / 10, 0.01, num_classes=10)
  assert c[0] == 7325 and c[-1] == int(7325.7 * 0.01)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, math.nan, "x", None])
def test_bad_ratios_raise_naming_the_range(bad):
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    data.long_tail_counts(5000, bad, num_classes=10)


def test_unknown_profile_raises():
  with pytest.raises(ValueError, match="profile"):
    data.long_tail_counts(5000, 0.01, num_classes=10, profile="linear")


def _reference_selection(labels, counts, seed):
  """The reference's procedure, verbatim in spirit: global seed + shuffles."""
  state = np.random.get_state()
  try:
    np.random.seed(seed)
    out = []
    for c, n in zip(np.unique(labels), counts):
      idx = np.where(labels == c)[0]
      np.random.shuffle(idx)
      out.append(idx[:n])
  finally:
    np.random.set_state(state)
  return np.sort(np.concatenate(out))


def test_selection_is_the_reference_subset_and_deterministic():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(10), 50)
  rng.shuffle(labels)
  counts = data.long_tail_counts(50, 0.1, num_classes=10)
  idx, got = data.select_long_tail(labels, counts, seed=0)
  assert got == counts
  np.testing.assert_array_equal(idx, _reference_selection(labels, counts, 0))
  np.testing.assert_array_equal(idx, data.select_long_tail(labels, counts,
                                                           seed=0)[0])
  assert np.all(np.diff(idx) > 0)
  assert np.bincount(labels[idx], minlength=10).tolist() == counts
  other, _ = data.select_long_tail(labels, counts, seed=1)
  assert not np.array_equal(idx, other)


def test_selection_keeps_what_a_short_class_has():
  labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
  idx, got = data.select_long_tail(labels, [8, 5, 4], seed=0)
  assert got == [8, 3, 4]
  assert idx.size == 15
  with pytest.raises(ValueError, match="labels must lie"):
    data.select_long_tail(np.array([0, 3]), [1, 1], seed=0)


def test_groups_by_count_imagenet_rule():
  g = long_tail.groups_by_count([500, 101, 100, 20, 19, 0])
  assert g == {"head": (0, 1), "medium": (2, 3), "tail": (4, 5)}


def test_registry():
  assert set(data.REGISTRY) == {"cifar10", "cifar100", "svhn", "stl10",
                                "imagenet_lt", "cub200"}
  c10 = data.dataset_info("cifar10")
  assert c10.num_classes == 10 and c10.image_shape == (32, 32, 3)
  assert c10.mean == (0.4914, 0.4822, 0.4465)
  assert c10.std == (0.2023, 0.1994, 0.2010)
  assert c10.train_augment == "crop_flip"
  assert c10.class_groups == {"head": (0, 1, 2), "medium": (3, 4, 5, 6),
                              "tail": (7, 8, 9)}
  c100 = data.dataset_info("cifar100")
  assert c100.mean == c10.mean and c100.std == c10.std
  assert c100.class_groups["head"] == tuple(range(36))
  assert c100.class_groups["medium"] == tuple(range(36, 71))
  assert c100.class_groups["tail"] == tuple(range(71, 100))
  for name in ("svhn", "stl10"):
    info = data.dataset_info(name)
    assert info.mean == info.std == (0.5, 0.5, 0.5)
    assert info.train_augment == "none"
  assert data.dataset_info("svhn").train_splits == ("train", "extra")
  assert data.dataset_info("svhn").tfds_name == "svhn_cropped"
  assert data.dataset_info("stl10").image_shape == (96, 96, 3)
  assert data.dataset_info("imagenet_lt").train_augment == "imagenet"
  for info in data.REGISTRY.values():
    groups = [c for g in info.class_groups.values() for c in g]
    assert sorted(groups) == (list(range(info.num_classes)) if groups else [])
  with pytest.raises(dataclasses.FrozenInstanceError):
    c10.num_classes = 3  # type: ignore[misc]


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match="cifar100.*svhn"):
    data.dataset_info("mnist")


def test_check_data_dir_messages(tmp_path):
  # Unset: tfds's default data directory (prepared by tfds_prepare.prepare_tfds).
  assert sources.check_data_dir("cifar10", None) == sources.Source(
      "tfds", None, datasets.REGISTRY["cifar10"])
  with pytest.raises(FileNotFoundError, match="does not exist.*cifar-10-batches-py"):
    data.check_data_dir("cifar10", tmp_path / "missing")
  with pytest.raises(ValueError, match="neither.*train/ and test/"):
    data.check_data_dir("cifar10", tmp_path)
  (tmp_path / "cifar10").mkdir()
  assert sources.check_data_dir("cifar10", tmp_path).kind == "tfds"
  for split in ("train", "test"):
    (tmp_path / split / "a").mkdir(parents=True)
  assert sources.check_data_dir("cifar10", tmp_path).kind == "folder"
