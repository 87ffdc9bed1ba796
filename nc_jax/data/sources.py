"""Dataset registry and raw sources: tfds data directories or image folders.

A dataset is named by a key of `REGISTRY`; its `DatasetInfo` carries what
the rest of the system needs (classes, image shape, normalisation constants,
train augmentation, head/medium/tail groups). `data_dir` is one of

- an image-folder tree `data_dir/{train,test}/<class>/<image>` (read with
  `tfds.folder_dataset.ImageFolder`; class folders sorted by name give the
  labels), which is how the shared CIFAR-10 JPEG archive is used, or
- a tfds data directory holding the prepared dataset (`data_dir/cifar10/...`),
  read with `tfds.builder(tfds_name, data_dir=data_dir)`.

Small datasets are decoded once into uint8 numpy arrays (`load_train_lt`,
`load_split`): CIFAR-10-LT is 12,406 images, 38 MB. Labels are read first
without decoding images, the long-tailed selection is computed in numpy, and
only the selected images are decoded.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nc_jax.data import long_tail

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("crop_flip", "none", "imagenet")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a dataset.

  Attributes:
    name: registry key.
    num_classes: K.
    image_shape: `(H, W, C)` of the images the pipelines yield.
    mean, std: per-channel normalisation constants on the 0-1 scale (the
      train step normalises on device).
    train_augment: "crop_flip" (pad 4, random crop, horizontal flip),
      "none", or "imagenet" (random resized crop + flip).
    class_groups: head/medium/tail -> class indices (empty for ImageNet-LT
      until the train list is read; `TrainInput.info` fills it in).
    tfds_name: the tfds builder name.
    train_splits: source splits that are subsampled and concatenated.
    test_split: the source split used as the test set.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_augment: str
  class_groups: Mapping[str, tuple[int, ...]] = dataclasses.field(
      default_factory=dict, hash=False)
  tfds_name: str = ""
  train_splits: tuple[str, ...] = ("train",)
  test_split: str = "test"


_TEN = long_tail.groups_by_ranges({"head": (0, 2), "medium": (3, 6),
                                   "tail": (7, 9)})

REGISTRY: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", 10, (32, 32, 3), CIFAR_MEAN, CIFAR_STD, "crop_flip", _TEN,
        tfds_name="cifar10"),
    "cifar100": DatasetInfo(
        "cifar100", 100, (32, 32, 3), CIFAR_MEAN, CIFAR_STD, "crop_flip",
        long_tail.groups_by_ranges({"head": (0, 35), "medium": (36, 70),
                                    "tail": (71, 99)}),
        tfds_name="cifar100"),
    "svhn": DatasetInfo(
        "svhn", 10, (32, 32, 3), HALF, HALF, "none", _TEN,
        tfds_name="svhn_cropped", train_splits=("train", "extra")),
    "stl10": DatasetInfo(
        "stl10", 10, (96, 96, 3), HALF, HALF, "none", _TEN,
        tfds_name="stl10"),
    # Groups come from the train list (>100 / 20-100 / <20 images).
    "imagenet_lt": DatasetInfo(
        "imagenet_lt", 1000, (224, 224, 3), IMAGENET_MEAN, IMAGENET_STD,
        "imagenet", {}, tfds_name="imagenet2012", test_split="validation"),
}

# Datasets decoded into host memory (and eligible for the device pipeline).
IN_MEMORY = ("cifar10", "cifar100", "svhn", "stl10")


def dataset_info(name: str) -> DatasetInfo:
  """The registry entry for `name`; ValueError listing the valid names."""
  try:
    return REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"Unknown dataset {name!r}; valid names are "
                     f"{sorted(REGISTRY)}.") from None


# ------------------------------------------------------------------ sources


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a dataset's files are: kind "folder" or "tfds", and the root."""
  kind: str
  root: str
  info: DatasetInfo

  def builder(self) -> tfds.core.DatasetBuilder:
    if self.kind == "folder":
      return _image_folder(self.root)
    return tfds.builder(self.info.tfds_name, data_dir=self.root)

  def split_name(self, split: str) -> str:
    """Maps "test" to the source's test split (ImageNet: "validation")."""
    if split == "test" and self.kind == "tfds":
      return self.info.test_split
    return split


@functools.lru_cache(maxsize=8)
def _image_folder(root: str) -> tfds.folder_dataset.ImageFolder:
  # Listing a 60k-file tree takes a fraction of a second; cache it anyway
  # because train, eval and train_lt inputs all ask for it.
  return tfds.folder_dataset.ImageFolder(root)


def _has_class_folders(path: str) -> bool:
  return os.path.isdir(path) and any(
      os.path.isdir(os.path.join(path, f)) for f in os.listdir(path))


def _expected(info: DatasetInfo) -> str:
  if info.name == "cifar10":
    folder = ("extract ../shared/data/cifar10_jpeg.tar.gz and pass "
              "--config.data_dir=<dir>/cifar10_jpeg")
  else:
    folder = "pass an image-folder tree <dir> with <dir>/train/<class>/*.jpg"
  return (f"Expected either an image-folder tree (train/ and test/ holding "
          f"one folder per class; {folder}) or a tfds data_dir containing "
          f"{info.tfds_name}/ (prepared with tfds; this machine cannot "
          f"download).")


def check_data_dir(name: str, data_dir: str | os.PathLike | None) -> Source:
  """Finds out what `data_dir` holds for dataset `name`, or raises.

  Args:
    name: registry key.
    data_dir: an image-folder tree with train/ and test/ class folders, or a
      tfds data directory containing `<tfds_name>/`.

  Returns:
    The `Source`.

  Raises:
    ValueError: unknown name, `data_dir` not given, or it holds neither.
    FileNotFoundError: `data_dir` does not exist.
  """
  info = dataset_info(name)
  if data_dir is None or str(data_dir) == "":
    raise ValueError(f"data_dir is not set for dataset {name!r}. "
                     + _expected(info))
  root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data_dir {root} does not exist. "
                            + _expected(info))
  if all(_has_class_folders(os.path.join(root, s)) for s in ("train", "test")):
    return Source("folder", root, info)
  if os.path.isdir(os.path.join(root, info.tfds_name)):
    return Source("tfds", root, info)
  raise ValueError(f"data_dir {root} holds neither an image-folder tree nor "
                   f"a tfds dataset for {name!r}. " + _expected(info))


def _folder_examples(source: Source, split: str) -> tuple[list[str],
                                                          np.ndarray] | None:
  """(paths, labels) of an ImageFolder split without touching the images.

  ImageFolder's public `as_dataset` reads every file before any decoder
  runs, so a label pass over 50,000 JPEGs costs seconds; its (documented
  in the source, private by name) example list gives the same order and
  labels for free. Returns None if this tfds version lacks it, and the
  callers then take the public route.
  """
  builder = _image_folder(source.root)
  examples = getattr(builder, "_split_examples", None)
  if not isinstance(examples, Mapping) or split not in examples:
    return None
  str2int = builder.info.features["label"].str2int
  try:
    paths = [str(ex.image_path) for ex in examples[split]]
    labels = np.asarray([str2int(ex.label) for ex in examples[split]],
                        np.int64)
  except AttributeError:
    return None
  return paths, labels


def encoded_dataset(source: Source, split: str,
                    indices: np.ndarray | None = None) -> tf.data.Dataset:
  """Undecoded examples in the source's fixed order.

  Args:
    source: from `check_data_dir`.
    split: a source split name ("train", "extra", "test", "validation").
    indices: optional ascending positions to keep (None = all).

  Returns:
    tf.data.Dataset of dicts {'image': encoded bytes (scalar tf.string),
    'label': int64 scalar, 'file_name': base file name (tf.string)}.
  """
  split = source.split_name(split)
  listed = _folder_examples(source, split) if source.kind == "folder" else None
  if listed is not None:
    paths, labels = listed
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
      decoders={"image": tfds.decode.SkipDecoding()})
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

  # ImageFolder calls it 'image/filename' (full path), imagenet2012
  # 'file_name'; other tfds sets have none.
  def fix(ex):
    if "file_name" in ex:
      fname = ex["file_name"]
    elif "image/filename" in ex:
      fname = tf.strings.split(ex["image/filename"], os.sep)[-1]
    else:
      fname = tf.constant("")
    return {"image": ex["image"], "label": tf.cast(ex["label"], tf.int64),
            "file_name": fname}
  return ds.map(fix, num_parallel_calls=tf.data.AUTOTUNE)


def available_splits(source: Source) -> tuple[str, ...]:
  """Train splits of `source` (an image folder may lack SVHN's "extra")."""
  if source.kind == "tfds":
    return source.info.train_splits
  present = _image_folder(source.root).info.splits.keys()
  splits = tuple(s for s in source.info.train_splits if s in present)
  return splits or ("train",)


def read_labels(source: Source, split: str) -> np.ndarray:
  """`(N,)` int64 labels of a split, in order, without decoding images."""
  listed = (_folder_examples(source, source.split_name(split))
            if source.kind == "folder" else None)
  if listed is not None:
    labels = listed[1]
  else:
    ds = encoded_dataset(source, split).map(lambda ex: ex["label"])
    parts = list(ds.batch(8192).as_numpy_iterator())
    labels = (np.concatenate(parts) if parts else np.zeros((0,), np.int64))
  k = source.info.num_classes
  if labels.size and (labels.min() < 0 or labels.max() >= k):
    raise ValueError(
        f"{source.root} split {split!r} has labels outside [0, {k}) for "
        f"{source.info.name!r}: is it the right dataset?")
  if source.kind == "folder":
    names = _image_folder(source.root).info.features["label"].names
    if len(names) != k:
      raise ValueError(f"{source.root} has {len(names)} class folders; "
                       f"{source.info.name!r} needs {k}.")
  return labels.astype(np.int64)


def decode_images(source: Source, split: str,
                  indices: np.ndarray | None = None) -> np.ndarray:
  """Decodes (a subset of) a split into one uint8 array.

  Args:
    source: from `check_data_dir`.
    split: source split name.
    indices: ascending positions to keep (None = all).

  Returns:
    `(n, H, W, C)` uint8, in ascending position order.
  """
  h, w, c = source.info.image_shape
  if indices is not None and len(indices) == 0:
    return np.zeros((0, h, w, c), np.uint8)
  ds = encoded_dataset(source, split, indices).map(lambda ex: ex["image"])

  def decode(img):
    img = tf.io.decode_image(img, channels=c, expand_animations=False)
    return tf.ensure_shape(img, (h, w, c))

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(2048)
  try:
    parts = list(ds.as_numpy_iterator())
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(
        f"Images of {source.root} split {split!r} do not decode to "
        f"{(h, w, c)} as {source.info.name!r} requires: {e.message}") from e
  if not parts:
    return np.zeros((0, h, w, c), np.uint8)
  return np.concatenate(parts).astype(np.uint8, copy=False)


# ---------------------------------------------------------- cached arrays


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """Decoded images and labels held in host memory.

  Attributes:
    images: `(N, H, W, C)` uint8 (read-only).
    labels: `(N,)` int32 (read-only).
    counts: K per-class counts of `labels`.
    requested: K per-class counts asked for (equal to `counts` unless a
      class had fewer images than requested), or None for full splits.
  """
  images: np.ndarray
  labels: np.ndarray
  counts: tuple[int, ...]
  requested: tuple[int, ...] | None = None


def _freeze(x: np.ndarray) -> np.ndarray:
  x.setflags(write=False)
  return x


@functools.lru_cache(maxsize=4)
def load_train_lt(name: str, data_dir: str, imb_factor: float,
                  profile: str, selection_seed: int) -> ArraySplit:
  """The long-tailed training subset of a small dataset, decoded.

  Each train split (SVHN: train and extra) is subsampled on its own with
  `n_max = len(split) / K`, as the reference does, and the subsets are
  concatenated in split order. Cached: train input and the train_lt eval
  input share one copy.
  """
  info = dataset_info(name)
  source = check_data_dir(name, data_dir)
  k = info.num_classes
  images, labels, requested, counts = [], [], np.zeros(k, int), np.zeros(k, int)
  for split in available_splits(source):
    split_labels = read_labels(source, split)
    want = long_tail.long_tail_counts(split_labels.size / k, imb_factor,
                                      num_classes=k, profile=profile)
    idx, got = long_tail.select_long_tail(split_labels, want,
                                          seed=selection_seed)
    if got != want:
      logging.warning("%s/%s: some classes have fewer images than the "
                      "long-tail profile asks for; kept %s of %s.", name,
                      split, got, want)
    images.append(decode_images(source, split, idx))
    labels.append(split_labels[idx])
    requested += want
    counts += got
  out = ArraySplit(_freeze(np.concatenate(images)),
                   _freeze(np.concatenate(labels).astype(np.int32)),
                   tuple(int(x) for x in counts),
                   tuple(int(x) for x in requested))
  logging.info("%s-LT r=%s (%s, selection seed %d) from %s: %d images, per "
               "class %s", name, imb_factor, profile, selection_seed,
               source.root, out.labels.size, list(out.counts))
  return out


@functools.lru_cache(maxsize=4)
def load_split(name: str, data_dir: str, split: str) -> ArraySplit:
  """A whole split of a small dataset (e.g. "test"), decoded."""
  source = check_data_dir(name, data_dir)
  labels = read_labels(source, split)
  images = decode_images(source, split)
  if images.shape[0] != labels.size:
    raise RuntimeError(f"{name}/{split}: {images.shape[0]} images but "
                       f"{labels.size} labels.")
  k = dataset_info(name).num_classes
  return ArraySplit(_freeze(images), _freeze(labels.astype(np.int32)),
                    tuple(long_tail.class_histogram(labels, k)))
