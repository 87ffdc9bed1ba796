"""What a `data_dir` holds, for the small datasets and the streamed ones.

`data_dir` is the CIFAR python release (`cifar_release.py`, the release's
order), an image-folder tree `{train,test}/<class>/<image>` (`folders.py`:
sorted class folders give the labels), a data pack (`pack.py`), a tfds
data directory, or None (tfds's default; `tfds_prepare` downloads there).
`check_data_dir` names the form (a `Source`); `check_source` makes the
cheap checks before any work. Labels are read first, undecoded, in the
canonical order (`split_index`); the long-tailed selection is made in
numpy as the reference does, and only the selected images are decoded
(`decode_images`). What every dataset shares (`splits_key`,
`check_dataset_data`, `dataset_class_names`) lives here. TensorFlow is
imported only for tfds sources, so folders and packs run without it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Mapping

from absl import logging
import numpy as np

from nc_jax.data import cifar_release
from nc_jax.data import datasets
from nc_jax.data import folders
from nc_jax.data import pack

# Datasets decoded into host memory (and eligible for the device pipeline).
IN_MEMORY = tuple(n for n, i in datasets.REGISTRY.items() if not i.streamed)


# ------------------------------------------------------------------ sources


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a dataset's files are: kind "release" (a CIFAR python release;
  root is its folder), "folder" (an image-folder tree), "pack" (an nc_jax
  data pack, `pack.py`; root is the file) or "tfds", and the root (None:
  tfds's default data directory)."""
  kind: str
  root: str | None
  info: datasets.DatasetInfo

  def builder(self):
    """The tfds builder (kind "tfds" only)."""
    if self.kind != "tfds":
      raise ValueError(f"{self.root} is an image folder, not a tfds data_dir.")
    return _tfds().builder(self.info.tfds_name, data_dir=self.root)

  def tree(self) -> folders.FolderTree:
    """The listed image-folder tree (kind "folder" only)."""
    return folders.list_tree(self.root)

  def split_name(self, split: str) -> str:
    """Maps "test" to the source's test split (ImageNet: "validation")."""
    if split == "test" and self.kind == "tfds":
      return self.info.test_split
    return split


def accepted_forms(info: datasets.DatasetInfo, *, unset: bool = True) -> str:
  """What `--config.data_dir` accepts for `info`, for error messages
  (`unset`: mention that it may be left unset, for tfds to download)."""
  release = cifar_release.RELEASES.get(info.name)
  release = f"{cifar_release.describe_forms(release)}; " if release else ""
  unset = (f"; or leave it unset to have tfds download and prepare "
           f"{info.tfds_name} in its data directory (needs internet)"
           if unset and info.name in IN_MEMORY else "")
  return (f"Pass --config.data_dir= one of: {release}an image-folder tree "
          f"with train/ and test/ holding one folder of images per class "
          f"(DIR/train/<class>/*.jpg|png); such a tree as a "
          f".tar.gz/.tgz/.tar/.zip archive; an nc_jax data pack (.npz, "
          f"benchmarks/pack_data.py); a tfds data directory "
          f"holding a prepared {info.tfds_name}/{unset}.")


def check_data_dir(name: str, data_dir: str | os.PathLike | None) -> Source:
  """Finds out what `data_dir` holds for dataset `name`, or raises.

  Args:
    name: registry key.
    data_dir: an image-folder tree with train/ and test/ class folders, a
      tfds data directory containing `<tfds_name>/`, or None for tfds's
      default data directory (see `tfds_prepare`; not checked here).

  Returns:
    The `Source`.

  Raises:
    ValueError: unknown name, or `data_dir` holds neither.
    FileNotFoundError: `data_dir` does not exist.
  """
  info = datasets.dataset_info(name)
  if data_dir is None or str(data_dir) == "":
    return Source("tfds", None, info)
  root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  if pack.is_pack(root):
    if info.name not in IN_MEMORY:
      raise ValueError(f"data_dir {root} is a data pack; packs hold the "
                       f"small datasets ({', '.join(IN_MEMORY)}), not "
                       f"{name!r}. " + accepted_forms(info))
    pack.check_pack(root, name)
    return Source("pack", root, info)
  if os.path.isfile(root):
    raise ValueError(f"data_dir {root} is a file, not a folder or an archive "
                     "(.tar.gz, .tgz, .tar, .zip). " + accepted_forms(info))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data_dir {root} does not exist. "
                            + accepted_forms(info))
  found = cifar_release.find(root, name)
  if found is not None:
    release, folder = found
    if release.dataset != name:
      want = cifar_release.RELEASES.get(name)
      data = (f"the {want.archive} release (or its {want.folder}/ folder)"
              if want else f"data of {name!r}")
      raise ValueError(
          f"data_dir {root} holds the {release.folder}/ release, which is "
          f"{release.dataset!r}, not {name!r}: pass {data}, or train a "
          f"{release.dataset} config on it (a preset such as "
          f"{release.dataset}_r0.01_etf_dr, or --config.dataset="
          f"{release.dataset}).")
    return Source("release", folder, info)
  if all(folders.has_class_folders(os.path.join(root, s))
         for s in ("train", "test")):
    return Source("folder", root, info)
  if os.path.isdir(os.path.join(root, info.tfds_name)):
    return Source("tfds", root, info)
  raise ValueError(f"data_dir {root} holds neither an image-folder tree nor "
                   f"a tfds dataset for {name!r}. " + accepted_forms(info))


# How many images per class and split `check_source` decodes.
SAMPLE_PER_CLASS = 2


def check_source(source: Source, train_splits: tuple[str, ...] | None = None
                 ) -> None:
  """Cheap checks of an image-folder source before any work is done.

  Lists the tree (no image files: error), checks the number of class
  folders and decodes the first `SAMPLE_PER_CLASS` images of every class and
  split with Pillow. A bad file among the rest is found by the full decode.
  A CIFAR release is read whole (its md5s and layout checked).
  Only the in-memory datasets are checked (ImageNet-LT's folders hold images
  of every size); tfds sources are not.

  Raises:
    ValueError: naming the problem and the fix.
  """
  if source.kind == "release":
    cifar_release.check_release(source.info.name, source.root)
    return
  if source.kind == "pack":
    meta = pack.check_pack(source.root, source.info.name)
    if tuple(meta["image_shape"]) != source.info.image_shape:
      raise ValueError(
          f"data_dir {source.root} packs {tuple(meta['image_shape'])} "
          f"images; {source.info.name!r} needs {source.info.image_shape}. "
          "Pack the dataset again.")
    for split in available_splits(source, train_splits) + ("test",):
      split_index(source, split)
    return
  if source.kind != "folder" or source.info.name not in IN_MEMORY:
    return
  for split in available_splits(source, train_splits) + ("test",):
    index = split_index(source, split)
    paths = source.tree().paths(split)
    sample = [paths[i] for c in range(source.info.num_classes)
              for i in np.flatnonzero(index.labels == c)[:SAMPLE_PER_CLASS]]
    folders.check_decodes(sample, source.info.image_shape)


def folder_examples(source: Source, split: str
                     ) -> tuple[list[str], np.ndarray]:
  """(absolute paths, labels) of an image-folder split, canonical order."""
  tree = source.tree()
  if split not in tree.splits:
    raise ValueError(f"{source.root} has no {split}/ folder of classes.")
  return tree.paths(split), tree.splits[split].labels


@dataclasses.dataclass(frozen=True)
class SplitIndex:
  """A split's examples in the dataset's canonical (original) order.

  Attributes:
    labels: `(N,)` int64 labels, canonical order.
    ids: N example ids: `<class>/<file>` for image folders, the tfds `id`
      (e.g. "train_00017") or `<split>_<stored position>` for tfds sets
      without one.
    stored: `(N,)` int64 position of each example in the source's stored
      order (the identity for image folders).
    canonical: whether the order is the dataset's original one (False for
      tfds sets without an `id` feature, which keep tfds's stored order).
  """
  labels: np.ndarray
  ids: tuple[str, ...]
  stored: np.ndarray
  canonical: bool


def _tfds_index(source: Source, split: str) -> SplitIndex:
  tf = _tf()
  ds = source.builder().as_dataset(
      split=split, shuffle_files=False,
      decoders={"image": _tfds().decode.SkipDecoding()})
  has_id = "id" in source.builder().info.features
  ds = ds.map(lambda ex: (tf.cast(ex["label"], tf.int64),
                          ex["id"] if has_id else tf.constant("")))
  labels, ids = [], []
  for y, i in ds.batch(8192).as_numpy_iterator():
    labels.append(y)
    ids += [x.decode() for x in i]
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
  n = labels.size
  stored = np.arange(n, dtype=np.int64)
  nums = [re.search(r"(\d+)$", i) for i in ids] if has_id else []
  if has_id and all(nums) and len({int(m.group(1)) for m in nums}) == n:
    # tfds writes examples in a hashed order; the id keeps the original
    # index (e.g. cifar10 "train_16399").
    order = np.argsort([int(m.group(1)) for m in nums], kind="stable")
    return SplitIndex(labels[order], tuple(ids[j] for j in order),
                      stored[order], True)
  logging.warning(
      "%s/%s has no numeric example id: the long-tailed selection walks "
      "tfds's stored order, not the dataset's original one.",
      source.info.tfds_name, split)
  return SplitIndex(labels, tuple(f"{split}_{j}" for j in range(n)), stored,
                    False)


@functools.lru_cache(maxsize=16)
def split_index(source: Source, split: str) -> SplitIndex:
  """The `SplitIndex` of a split (labels and ids, no image decoded).

  Raises:
    ValueError: labels outside the dataset's classes, or an image folder
      whose number of class folders is not the dataset's.
  """
  split = source.split_name(split)
  k = source.info.num_classes
  if source.kind == "folder":
    tree = source.tree()
    if len(tree.classes) != k:
      raise ValueError(
          f"{source.root} has {len(tree.classes)} class folders "
          f"({', '.join(tree.classes[:5])}{', ...' if len(tree.classes) > 5 else ''}); "
          f"{source.info.name!r} needs {k}. Pass the tree of this dataset, "
          "or name the dataset whose classes it holds.")
    if split not in tree.splits:
      raise ValueError(f"{source.root} has no {split}/ folder of classes.")
    fs = tree.splits[split]
    idx = SplitIndex(fs.labels, fs.ids, np.arange(fs.labels.size), True)
  elif source.kind == "pack":
    labels, ids, canonical = pack.read_split_index(source.root, split)
    idx = SplitIndex(labels, ids, np.arange(labels.size), canonical)
  elif source.kind == "release":
    _, labels = cifar_release.read_split(source.info.name, source.root, split)
    n = labels.size
    idx = SplitIndex(labels, tuple(f"{split}_{i:05d}" for i in range(n)),
                     np.arange(n), True)
  else:
    idx = _tfds_index(source, split)
  if idx.labels.size and (idx.labels.min() < 0 or idx.labels.max() >= k):
    raise ValueError(
        f"{source.root} split {split!r} has labels outside [0, {k}) for "
        f"{source.info.name!r}: is it the right dataset?")
  return idx


def class_names(source: Source) -> tuple[str, ...]:
  """The K class names, in label order."""
  if source.kind == "folder":
    return source.tree().classes
  if source.kind == "release":
    return cifar_release.read_class_names(source.info.name, source.root)
  if source.kind == "pack":
    return tuple(pack.meta(source.root)["class_names"])
  names = source.builder().info.features["label"].names
  return tuple(str(n) for n in names)


def encoded_dataset(source: Source, split: str, indices: np.ndarray | None = None):
  """Undecoded examples in the source's stored order (needs TensorFlow).

  Args:
    source: from `check_data_dir`.
    split: a source split name ("train", "extra", "test", "validation").
    indices: optional ascending stored positions to keep (None = all).

  Returns:
    tf.data.Dataset of dicts {'image': encoded bytes (scalar tf.string),
    'label': int64 scalar, 'file_name': base file name (tf.string)}.
  """
  tf = _tf()
  split = source.split_name(split)
  if source.kind == "folder":
    paths, labels = folder_examples(source, split)
    if indices is not None:
      idx = np.asarray(indices, np.int64)
      paths, labels = [paths[i] for i in idx], labels[idx]
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), labels))
    return ds.map(lambda p, y: {
        "image": tf.io.read_file(p), "label": y,
        "file_name": tf.strings.split(p, os.sep)[-1]},
                  num_parallel_calls=tf.data.AUTOTUNE)

  ds = source.builder().as_dataset(
      split=split, shuffle_files=False,
      decoders={"image": _tfds().decode.SkipDecoding()})
  if indices is not None:
    idx = np.asarray(indices, np.int64)
    if idx.size == 0:
      return ds.take(0)
    mask = np.zeros(int(idx.max()) + 1, bool)
    mask[idx] = True
    mask_t = tf.constant(mask)
    # take() stops reading after the last selected example.
    ds = ds.take(mask.size).enumerate().filter(
        lambda i, _: tf.gather(mask_t, i)).map(lambda i, ex: ex)

  # imagenet2012 calls it 'file_name'; other tfds sets have none.
  def fix(ex):
    fname = ex["file_name"] if "file_name" in ex else tf.constant("")
    return {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64),
            "file_name": fname}
  return ds.map(fix, num_parallel_calls=tf.data.AUTOTUNE)


def available_splits(source: Source,
                     wanted: tuple[str, ...] | None = None
                     ) -> tuple[str, ...]:
  """The train splits to subsample (`wanted`, default the dataset's).

  Raises:
    ValueError: a wanted split the source lacks (e.g. SVHN's "extra" in an
      image folder), naming the config field that drops it.
  """
  wanted = tuple(wanted or source.info.train_splits)
  if source.kind == "tfds":
    return wanted
  if source.kind == "pack":
    present = pack.meta(source.root)["splits"]
  elif source.kind == "release":
    present = cifar_release.RELEASES[source.info.name].splits
  else:
    present = source.tree().splits
  missing = [s for s in wanted if s not in present]
  if missing:
    raise ValueError(
        f"{source.root} has no {'/, '.join(missing)}/ folder, which the "
        f"{source.info.name} recipe trains on (splits "
        f"{'+'.join(wanted)}). Add it, or train on the splits it has with "
        f"--config.train_splits={','.join(s for s in wanted if s in present) or 'train'}.")
  return wanted


def decode_images(source: Source, split: str,
                  indices: np.ndarray | None = None) -> np.ndarray:
  """Decodes (a subset of) a split into one uint8 array.

  Args:
    source: from `check_data_dir`.
    split: source split name.
    indices: positions in the split's canonical order (None = all).

  Returns:
    `(n, H, W, C)` uint8, in the order of `indices`.
  """
  shape = source.info.image_shape
  index = split_index(source, split)
  canon = (np.arange(index.labels.size) if indices is None
           else np.asarray(indices, np.int64))
  if source.kind == "folder":
    paths = source.tree().paths(source.split_name(split))
    return folders.decode([paths[i] for i in canon], shape)
  if source.kind == "release":
    images, _ = cifar_release.read_split(source.info.name, source.root, split)
    return images[canon]
  if source.kind == "pack":
    return pack.images(source.root, split, canon)
  if canon.size == 0:
    return np.zeros((0,) + shape, np.uint8)
  stored = index.stored[canon]
  order = np.argsort(stored)
  tf = _tf()
  h, w, c = shape

  def decode(img):
    img = tf.io.decode_image(img, channels=c, expand_animations=False)
    return tf.ensure_shape(img, (h, w, c))

  ds = encoded_dataset(source, split, stored[order]).map(
      lambda ex: ex["image"]).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  try:
    parts = list(ds.batch(2048).as_numpy_iterator())
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(
        f"Images of {source.root} split {split!r} do not decode to "
        f"{shape} as {source.info.name!r} requires: {e.message}") from e
  out = np.empty((canon.size,) + shape, np.uint8)
  out[order] = np.concatenate(parts)
  return out


# ------------------------------------------- what the datasets share


def splits_key(train_splits) -> tuple[str, ...] | None:
  """None, a tuple or a comma string of split names -> a hashable key."""
  if not train_splits:
    return None
  if isinstance(train_splits, str):
    train_splits = train_splits.split(",")
  return tuple(s.strip() for s in train_splits if s.strip()) or None


def check_dataset_data(name: str, data_dir: str | None,
                       options: Mapping[str, Any]) -> None:
  """A dataset's `check_data` for the forms of this module: `check_data_dir`
  and, for an image folder or a CIFAR release, `check_source`'s listing
  and decoded sample.

  Raises:
    ValueError, FileNotFoundError: naming the problem and the fix.
  """
  source = check_data_dir(name, data_dir)
  check_source(source, splits_key(options.get("train_splits")))


def dataset_class_names(name: str, data_dir: str | None) -> tuple[str, ...]:
  """A dataset's `class_names` for the forms of this module."""
  return class_names(check_data_dir(name, data_dir))
