"""Image-folder trees: `root/<split>/<class>/<image>`, listed in canonical order.

The canonical order is what the reference's long-tailed selection walks
through: class folders sorted by name give the labels (as torchvision's and
tfds's ImageFolder do), and inside a class the files are in *natural* order
(`2.jpg` before `10.jpg`). The shared CIFAR-10 JPEGs are numbered `NNNN.jpg`
per class in the dataset's original order, so this order is CIFAR-10's own.
(tfds's `ImageFolder` lists the files in a seeded random order instead,
which would pick other images for the same seed.)

Listing touches no image; decoding uses TensorFlow when it is installed and
Pillow otherwise, with the same integer (ISLOW) JPEG transform in both, so
a GPU host without TensorFlow reads the same pixels.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import re

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def natural_key(name: str) -> tuple:
  """Sort key that orders the digit runs of `name` by value: a2 < a10."""
  parts = re.split(r"(\d+)", name)
  # Odd positions are digit runs; the pairs keep equal-valued runs with
  # different zero padding ordered, so the key is total.
  return tuple((int(p), p) if i % 2 else (0, p) for i, p in enumerate(parts))


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """One split of an image-folder tree.

  Attributes:
    ids: relative paths `<class>/<file>` in canonical order.
    labels: `(N,)` int64 labels, index into `FolderTree.classes`.
  """
  ids: tuple[str, ...]
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class FolderTree:
  """An image-folder tree: the class names and its splits' file lists."""
  root: str
  classes: tuple[str, ...]
  splits: dict[str, FolderSplit] = dataclasses.field(hash=False)

  def paths(self, split: str) -> list[str]:
    base = os.path.join(self.root, split)
    return [os.path.join(base, i) for i in self.splits[split].ids]


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir())


def has_class_folders(path: str) -> bool:
  return os.path.isdir(path) and bool(_subdirs(path))


@functools.lru_cache(maxsize=8)
def list_tree(root: str) -> FolderTree:
  """Lists every split folder of `root` (a few hundred ms for 60k files).

  The classes are the sorted class-folder names of `train/` (of the first
  split when there is no `train/`); every other split must use only those
  names.

  Raises:
    ValueError: a split without images, a train class folder without
      images, or a class folder that the train split lacks.
  """
  split_names = [s for s in _subdirs(root) if has_class_folders(
      os.path.join(root, s))]
  first = "train" if "train" in split_names else split_names[0]
  classes = tuple(_subdirs(os.path.join(root, first)))
  index = {c: i for i, c in enumerate(classes)}
  splits = {}
  for split in split_names:
    ids, labels = [], []
    for cls in _subdirs(os.path.join(root, split)):
      if cls not in index:
        raise ValueError(
            f"{root}/{split} has a class folder {cls!r} that {root}/{first} "
            f"lacks; every split must use the same class folders "
            f"({len(classes)} in {first}/).")
      names = sorted((e.name for e in os.scandir(os.path.join(root, split,
                                                              cls))
                      if e.is_file() and e.name.lower().endswith(
                          IMAGE_SUFFIXES)), key=natural_key)
      if not names and split == first:
        raise ValueError(
            f"{os.path.join(root, split, cls)}/ holds no images (names ending "
            f"in {', '.join(IMAGE_SUFFIXES)}): the run would report a class "
            "it never saw. Put the class's images there, or pass the tree "
            "of a dataset that has them.")
      ids += [f"{cls}/{n}" for n in names]
      labels += [index[cls]] * len(names)
    if not ids:
      raise ValueError(
          f"{root}/{split} holds class folders but no image files (expected "
          f"names ending in {', '.join(IMAGE_SUFFIXES)}).")
    splits[split] = FolderSplit(tuple(ids), np.asarray(labels, np.int64))
  return FolderTree(root, classes, splits)


def _have_tf() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _decode_tf(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  h, w, c = shape

  def decode(path):
    data = tf.io.read_file(path)
    # INTEGER_ACCURATE is libjpeg's ISLOW, Pillow's (and so torchvision's)
    # transform; TF's default is the faster, less exact IFAST.
    img = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=c,
                                  dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=c,
                                   expand_animations=False))
    return tf.ensure_shape(img, (h, w, c))

  ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(2048)
  return np.concatenate(list(ds.as_numpy_iterator())).astype(np.uint8,
                                                             copy=False)


def _decode_pil(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  mode = {1: "L", 3: "RGB", 4: "RGBA"}[shape[2]]
  out = np.empty((len(paths),) + tuple(shape), np.uint8)

  def one(i):
    with Image.open(paths[i]) as img:
      arr = np.asarray(img.convert(mode)).reshape(
          img.size[1], img.size[0], shape[2])
    if arr.shape != tuple(shape):
      raise ValueError(f"{paths[i]} decodes to {arr.shape}, not {shape}")
    out[i] = arr
  # Pillow releases the GIL while decoding.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    list(pool.map(one, range(len(paths))))
  return out


def decode(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
  """Decodes image files into one `(N, H, W, C)` uint8 array, in order.

  Raises:
    ValueError: a file that does not decode to `shape`, naming the problem.
  """
  if not paths:
    return np.zeros((0,) + tuple(shape), np.uint8)
  try:
    if _have_tf():
      return _decode_tf(paths, shape)
    return _decode_pil(paths, shape)
  except Exception as e:  # tf.errors.*, PIL errors, OSError, ValueError
    raise _decode_error(paths, shape) from e


def check_decodes(paths: list[str], shape: tuple[int, int, int]) -> None:
  """Decodes `paths` with Pillow (no TensorFlow): a quick check of a sample
  before any work.

  Raises:
    ValueError: as `decode`, naming the first bad file.
  """
  try:
    _decode_pil(paths, shape)
  except Exception as e:  # PIL errors, OSError, ValueError
    raise _decode_error(paths, shape) from e


def _decode_error(paths: list[str], shape: tuple[int, int, int]
                  ) -> ValueError:
  return ValueError(
      f"Images under {os.path.dirname(os.path.dirname(paths[0]))} do not "
      f"all decode to {tuple(shape)}: {_first_bad(paths, shape)}. Remove "
      "or replace the file(s), or pass the tree of the dataset whose image "
      "size they have.")


def _first_bad(paths: list[str], shape: tuple[int, int, int]) -> str:
  """Names the first file that does not decode to `shape` (error path)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for p in paths:
    try:
      with Image.open(p) as img:
        got = (img.size[1], img.size[0], len(img.getbands()))
        img.load()
    except Exception as e:  # pylint: disable=broad-except
      return f"{p} is not a readable image ({type(e).__name__})"
    if got[:2] != tuple(shape[:2]):
      return f"{p} is {got[0]}x{got[1]}, not {shape[0]}x{shape[1]}"
  return "a file failed to decode"
