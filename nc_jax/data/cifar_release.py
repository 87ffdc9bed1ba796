"""The CIFAR "python version" releases, read as torchvision keeps them.

Krizhevsky's CIFAR-10 and CIFAR-100 releases are folders of pickles:

    cifar-10-batches-py/  data_batch_1 ... data_batch_5, test_batch,
                          batches.meta
    cifar-100-python/     train, test, meta

Each data file is a dict whose `data` is `(N, 3072)` uint8 (the R, G and B
planes of a 32x32 image, row-major) and whose `labels` (CIFAR-10) or
`fine_labels` (CIFAR-100) give the classes. These are the original,
lossless pixels. The examples are read in the release's order (the batches
in order, rows in order), which is the order torchvision yields and the
reference implementation subsamples from; example ids are `train_00017`
style positions in that order (the same convention as tfds's CIFAR ids).

`data_dir` may name the release folder, its parent, or the release archive
(`cifar-10-python.tar.gz`, extracted once by `nc_jax.data.archive`). Every
file is checked against the md5 of torchvision's integrity list before it
is used, so a damaged copy stops with an error naming the file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle

import numpy as np


@dataclasses.dataclass(frozen=True)
class Release:
  """One release's layout.

  Attributes:
    dataset: the nc_jax dataset name.
    folder: the release folder's name.
    archive: the archive's file name as published.
    splits: split -> data files, in the release's order.
    meta: the file holding the class names.
    label_key: the labels' key in a data file.
    names_key: the class names' key in the meta file.
    md5: file -> md5 (torchvision's `train_list`, `test_list` and `meta`).
  """
  dataset: str
  folder: str
  archive: str
  splits: dict[str, tuple[str, ...]]
  meta: str
  label_key: str
  names_key: str
  md5: dict[str, str]

  @property
  def files(self) -> tuple[str, ...]:
    return sum(self.splits.values(), ()) + (self.meta,)


RELEASES: dict[str, Release] = {
    "cifar10": Release(
        "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
         "test": ("test_batch",)},
        "batches.meta", "labels", "label_names",
        {"data_batch_1": "c99cafc152244af753f735de768cd75f",
         "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
         "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
         "test_batch": "40351d587109b95175f43aff81a1287e",
         "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}),
    "cifar100": Release(
        "cifar100", "cifar-100-python", "cifar-100-python.tar.gz",
        {"train": ("train",), "test": ("test",)},
        "meta", "fine_labels", "fine_label_names",
        {"train": "16019d7e3df5f24257cddd939b257f8d",
         "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
         "meta": "7973b15100ade9c7d40fb424638fde48"}),
}


def _is_release_folder(path: str, release: Release) -> bool:
  if not os.path.isdir(path):
    return False
  if os.path.basename(os.path.normpath(path)) == release.folder:
    return True
  # A renamed copy: recognised by two or more of its files, so that one
  # missing file (the meta file included) is reported by name. Not an
  # image-folder tree that keeps a stray meta file beside its train/ (and
  # CIFAR-100's names are generic: one file alone proves nothing).
  if os.path.isdir(os.path.join(path, "train")):
    return False
  return sum(os.path.isfile(os.path.join(path, f)) for f in release.files) >= 2


def find(root: str, dataset: str | None = None
         ) -> tuple[Release, str] | None:
  """The release held by `root` (the folder itself or its parent), or None.

  Args:
    root: a folder.
    dataset: the release looked for first (a parent folder may hold both
      CIFAR releases, as torchvision's `root` often does); others are
      still found, so that a mismatch can be reported.

  Returns:
    `(release, folder)`: which release, and the folder holding its files.
  """
  order = sorted(RELEASES.values(), key=lambda r: r.dataset != dataset)
  for path_of in (lambda r: os.path.join(root, r.folder), lambda r: root):
    for release in order:
      if _is_release_folder(path_of(release), release):
        return release, os.path.abspath(path_of(release))
  return None


def describe_forms(release: Release) -> str:
  """One phrase naming the forms in which `data_dir` may give `release`."""
  return (f"the CIFAR python release: its {release.folder}/ folder, the "
          f"folder above it, or the {release.archive} archive")


@functools.lru_cache(maxsize=32)
def _md5(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # part of the cache key: a changed file is re-read
  h = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _problem(release: Release, folder: str, name: str, shown: str
             ) -> str | None:
  """What is wrong with one release file (missing, or not the released
  bytes by md5), as a phrase starting with `shown`; None when it is fine."""
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    return f"{shown} is missing"
  want = release.md5.get(name)
  if want is None:
    return None
  st = os.stat(path)
  got = _md5(path, st.st_size, st.st_mtime_ns)
  if got != want:
    return (f"{shown} is not the released file (md5 {got}, the release's is "
            f"{want}; {st.st_size} bytes)")
  return None


def problems(release: Release, folder: str) -> list[str]:
  """Every missing or altered file of the release in `folder` (by md5, no
  unpickling), each a phrase naming the file by its path inside the
  release; empty when the folder holds the release intact."""
  found = (_problem(release, folder, f, f"{release.folder}/{f}")
           for f in release.files)
  return [p for p in found if p]


def _unpickle(release: Release, folder: str, name: str) -> dict:
  """The checked, unpickled contents of one release file.

  Raises:
    ValueError: the file is missing, differs from the released one (md5),
      or does not unpickle; the message names the file.
  """
  path = os.path.join(folder, name)
  problem = _problem(release, folder, name, path)
  if problem and not os.path.isfile(path):
    raise ValueError(
        f"{problem}: the {release.folder}/ release holds "
        f"{', '.join(release.files)}. Extract the whole release again (or "
        "pass the complete archive).")
  if problem:
    raise ValueError(f"{problem}: a damaged, truncated or modified copy. "
                     "Copy or extract the release again.")
  try:
    with open(path, "rb") as f:
      obj = pickle.load(f, encoding="latin1")
      trailing = f.read(1)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"{path} cannot be read as a CIFAR release pickle "
        f"({type(e).__name__}: {str(e)[:200]}): a truncated or damaged "
        "file? Copy or extract the release again.") from None
  if not isinstance(obj, dict) or trailing:
    raise ValueError(
        f"{path} is not a CIFAR release pickle ("
        f"{'bytes after the pickle' if trailing else type(obj).__name__}). "
        "Copy or extract the release again.")
  return obj


@functools.lru_cache(maxsize=8)
def read_class_names(release_name: str, folder: str) -> tuple[str, ...]:
  """The class names from the release's meta file, in label order."""
  release = RELEASES[release_name]
  meta = _unpickle(release, folder, release.meta)
  names = meta.get(release.names_key)
  if not isinstance(names, (list, tuple)) or not names:
    raise ValueError(
        f"{os.path.join(folder, release.meta)} has no {release.names_key!r} "
        "list of class names. Copy or extract the release again.")
  return tuple(str(n) for n in names)


@functools.lru_cache(maxsize=8)
def read_split(release_name: str, folder: str, split: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """A split's images and labels in the release's order.

  Args:
    release_name: a key of `RELEASES`.
    folder: the release folder (from `find`).
    split: "train" or "test".

  Returns:
    `(images, labels)`: `(N, 32, 32, 3)` uint8 NHWC and `(N,)` int64, both
    read-only (cached).

  Raises:
    ValueError: a missing or damaged file, or contents that are not the
      release's layout; the message names the file.
  """
  release = RELEASES[release_name]
  if split not in release.splits:
    raise ValueError(f"The {release.folder}/ release has splits "
                     f"{sorted(release.splits)}, not {split!r}.")
  k = len(read_class_names(release_name, folder))
  images, labels = [], []
  for name in release.splits[split]:
    obj = _unpickle(release, folder, name)
    path = os.path.join(folder, name)
    data = obj.get("data")
    y = obj.get(release.label_key)
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8
        or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or y is None
        or len(y) != data.shape[0]):
      raise ValueError(
          f"{path} is not in the release's layout (a uint8 'data' array of "
          f"shape (N, 3072) and N {release.label_key!r}). Copy or extract the "
          "release again.")
    y = np.asarray(y, np.int64)
    if y.size and (y.min() < 0 or y.max() >= k):
      raise ValueError(f"{path} has labels outside [0, {k}). Copy or extract "
                       "the release again.")
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(y)
  x = np.ascontiguousarray(np.concatenate(images))
  y = np.concatenate(labels)
  x.setflags(write=False)
  y.setflags(write=False)
  return x, y


def check_release(release_name: str, folder: str) -> None:
  """Reads (and so checks) every file of the release; raises ValueError."""
  for split in RELEASES[release_name].splits:
    read_split(release_name, folder, split)
