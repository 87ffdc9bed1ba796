"""Data packs (`nc_jax.data.pack`, benchmarks/pack_data.py) and CIFAR-100
as a PNG export (`train/<fine label name>/<name>.png`).

A pack must give a run exactly what the dataset gives it: the same subset
(ids, pixels, order), the same test split, the same class names; and it
must refuse what it cannot give, naming the fix. The CIFAR-100 tree is
synthetic, in the layout of the public lossless export: 100 class folders
named by the fine labels, files named after the images' source names.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from nc_jax.configs import cifar_lt
from nc_jax import validation
from nc_jax.data import in_memory
from nc_jax.data import long_tail
from nc_jax.data import pack
from nc_jax.data import pack_writer
from nc_jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
FINE_LABELS = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl "
    "boy bridge bus butterfly camel can castle caterpillar cattle chair "
    "chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree "
    "motorcycle mountain mouse mushroom oak_tree orange orchid otter "
    "palm_tree pear pickup_truck pine_tree plain plate poppy porcupine "
    "possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper "
    "table tank telephone television tiger tractor train trout tulip turtle "
    "wardrobe whale willow_tree wolf woman worm").split()


def test_delta_filter_round_trips():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
  d = pack.delta_encode(x)
  assert d.dtype == np.uint8 and not np.array_equal(d, x)
  np.testing.assert_array_equal(pack.delta_decode(d), x)


@pytest.fixture(scope="module")
def folder_pack(tiny_image_folder, tmp_path_factory):
  path = tmp_path_factory.mktemp("pack") / "tiny.npz"
  summary = pack_writer.pack_dataset(path, "cifar10", str(tiny_image_folder),
                              imb_factors=[0.1, 0.5])
  return path, summary


def test_a_pack_reads_as_its_dataset(tiny_image_folder, folder_pack):
  path, summary = folder_pack
  # r = 0.5's subset holds r = 0.1's: the pack holds the larger one.
  want = [long_tail.long_tail_counts(40, r, num_classes=10)
          for r in (0.1, 0.5)]
  assert summary["splits"]["train"] == {"held": sum(want[1]), "total": 400}
  assert summary["splits"]["test"] == {"held": 60, "total": 60}
  assert summary["subsets"]["0.1"]["images"] == sum(want[0])
  assert sources.check_data_dir("cifar10", path).kind == "pack"
  for r in (0.1, 0.5):
    a = in_memory.load_train_lt("cifar10", str(path), r, "exp", 0)
    b = in_memory.load_train_lt("cifar10", str(tiny_image_folder), r,
                                "exp", 0)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.subset_record() == b.subset_record()
  a = in_memory.load_split("cifar10", str(path), "test")
  b = in_memory.load_split("cifar10", str(tiny_image_folder), "test")
  np.testing.assert_array_equal(a.images, b.images)
  assert a.ids == b.ids and a.class_names == b.class_names


def test_a_pack_refuses_what_it_lacks(folder_pack, tmp_path):
  path, _ = folder_pack
  with pytest.raises(ValueError, match=r"lacks \d+ of the \d+ train images.*"
                     r"imb_factor=0.1 \(exp, selection seed 0\), "
                     r"imb_factor=0.5.*--imb_factors"):
    in_memory.load_train_lt("cifar10", str(path), 1.0, "exp", 0)
  with pytest.raises(ValueError, match="a pack of 'cifar10', not 'svhn'"):
    sources.check_data_dir("svhn", path)
  with pytest.raises(ValueError, match="packs hold the small datasets"):
    sources.check_data_dir("imagenet_lt", path)
  bad = tmp_path / "other.npz"
  np.savez(bad, x=np.zeros(3))
  with pytest.raises(ValueError, match="not a readable nc_jax data pack.*"
                     "pack_data.py"):
    sources.check_data_dir("cifar10", bad)


@pytest.mark.slow  # the command in a subprocess
def test_pack_data_command_checks_the_size(tiny_image_folder, tmp_path):
  cmd = [sys.executable, str(REPO / "benchmarks" / "pack_data.py"),
         "--dataset", "cifar10", "--data_dir", str(tiny_image_folder),
         "--imb_factors", "0.1", "--out", str(tmp_path / "p.npz")]
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
  ok = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)["bytes"] == (tmp_path / "p.npz").stat().st_size
  over = subprocess.run(cmd + ["--limit_mib", "0.01"], capture_output=True,
                        text=True, env=env)
  assert over.returncode == 1
  assert "over --limit_mib=0.01" in over.stderr


# ------------------------------------------------- CIFAR-100, PNG export
def _write_export(root: pathlib.Path, per_class: dict[str, int]) -> None:
  """Class folders named by the fine labels, in a scrambled creation
  order; files `<class>_s_<6 digits>.png` with gaps, as the export's."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  for split, n in per_class.items():
    for c in rng.permutation(len(FINE_LABELS)):
      name = FINE_LABELS[c]
      d = root / split / name
      d.mkdir(parents=True)
      numbers = np.sort(rng.choice(10**6, n, replace=False))
      for j in rng.permutation(n):
        img = np.full((32, 32, 3), (c, j % 256, 7), np.uint8)
        Image.fromarray(img).save(d / f"{name}_s_{numbers[j]:06d}.png")


@pytest.fixture(scope="module")
def cifar100_export(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar100") / "CIFAR-100-dataset"
  _write_export(root, {"train": 100, "test": 2})
  return root


@pytest.mark.slow
def test_cifar100_presets_read_the_png_export(cifar100_export, tmp_path):
  """Classes are the sorted folder names (= the release's fine-label
  order), 100 of them; the r = 0.01 subset is the reference's rule over
  the folder's canonical order (files in natural order); a pack of the
  paper's three ratios gives the same."""
  root = str(cifar100_export)
  config = cifar_lt.get_config("cifar100_r0.01_etf_dr")
  config.unlock()
  config.data_dir = root
  config.lock()
  validation.validate_config(config)
  source = sources.check_data_dir("cifar100", root)
  assert sources.class_names(source) == tuple(FINE_LABELS)
  assert sorted(FINE_LABELS) == FINE_LABELS
  subset = in_memory.load_train_lt("cifar100", root, 0.01, "exp", 0)
  want = long_tail.long_tail_counts(100, 0.01, num_classes=100)
  assert list(subset.counts) == want and min(want) == 1
  # The rule, from an independent listing of the tree.
  ids, labels = [], []
  for c, name in enumerate(FINE_LABELS):
    files = sorted(os.listdir(cifar100_export / "train" / name))
    ids += [f"{name}/{f}" for f in files]
    labels += [c] * len(files)
  idx, _ = long_tail.select_long_tail(np.asarray(labels), want, seed=0)
  assert subset.ids == tuple(ids[i] for i in idx)
  labels = np.asarray(labels)
  within = idx - np.searchsorted(labels, labels[idx])  # place in its class
  np.testing.assert_array_equal(subset.images[:, 0, 0, 0], labels[idx])
  np.testing.assert_array_equal(subset.images[:, 0, 0, 1], within % 256)
  path = tmp_path / "c100.npz"
  pack_writer.pack_dataset(path, "cifar100", root, imb_factors=[0.005, 0.01, 0.02])
  for r in (0.01, 0.02):  # 0.005 empties classes of this 100-per-class tree
    a = in_memory.load_train_lt("cifar100", str(path), r, "exp", 0)
    b = in_memory.load_train_lt("cifar100", root, r, "exp", 0)
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.images, b.images)
  config.unlock()
  config.data_dir = str(path)
  config.lock()
  validation.validate_config(config)
