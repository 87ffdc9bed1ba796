"""CUB-200-2011: 200 bird species, the official train/test split, streamed.

The dataset module of registry entry "cub200" (`make(info)` returns its
`datasets.Dataset`). Two sources:

- the official release (Wah et al. 2011), as a folder or as the
  `CUB_200_2011.tgz` archive: `CUB_200_2011/images/<class>/<image>.jpg`
  with `images.txt` ("<id> <path under images/>"), `image_class_labels.txt`
  ("<id> <class 1..200>"), `train_test_split.txt` ("<id> <1 train, 0
  test>") and `classes.txt` ("<class> <name>"). `data_dir` may name the
  `CUB_200_2011/` folder, its parent, or the archive. Images are read from
  disk batch by batch.
- tfds `caltech_birds2011` (a tfds data directory holding it, or unset:
  tfds's default one, downloaded there). tfrecords allow no random access,
  so each split's encoded images are read into host memory once (the train
  split is about 5,994 JPEGs, a few hundred MB).

Both sources give the images in one canonical order, by their path under
`images/` (class folder, then file name; tfds's `image/filename` is read as
that path), so the long-tailed subset and every batch are the same whichever
source a run reads, and a run may resume from the other one.

Images vary in size, so they stream as ImageNet-LT's do (`file_stream.py`):
random resized crop (`crop_min_area`) and flip for training, resize to 256
and centre crop 224 for evaluation. The whole official train split is
used (5,994 images, 29-30 per class) unless `imb_factor < 1`, which
subsamples it with the long-tail profile and the reference's seeded
selection, in the canonical order, as for CIFAR: the long-tailed
fine-grained variant. Its head / medium / tail are the class ranges 0-69 /
70-139 / 140-199 (the exponential profile makes class counts decrease with
the label, as CIFAR-100's 0-35 / 36-70 / 71-99); the balanced split has no
groups. Own config fields: `color_jitter`, `crop_min_area`.
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import logging
import numpy as np

from nc_jax.data import datasets
from nc_jax.data import file_stream
from nc_jax.data import long_tail

FOLDER = "CUB_200_2011"
FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt",
         "classes.txt")
GROUP_RANGES = {"head": (0, 69), "medium": (70, 139), "tail": (140, 199)}
_FORMS = (
    "Pass --config.data_dir= the official CUB-200-2011 release: its "
    f"{FOLDER}/ folder (with images/ and {', '.join(FILES)}), the folder "
    f"holding it, or {FOLDER}.tgz; or a tfds data directory holding "
    "caltech_birds2011/; or leave it unset to have tfds download it (needs "
    "internet).")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in canonical order: N items (file paths, or encoded images
  when `read_files` is False), `(N,)` int64 labels 0..199 and N ids."""
  items: tuple
  labels: np.ndarray
  ids: tuple[str, ...]
  read_files: bool


def find_release(data_dir: str | os.PathLike) -> str | None:
  """The official release's `CUB_200_2011/` folder at or under `data_dir`."""
  root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  for cand in (root, os.path.join(root, FOLDER)):
    if os.path.isfile(os.path.join(cand, "images.txt")):
      return cand
  return None


def _table(root: str, name: str) -> dict[int, str]:
  """`<id> <value>` lines of one of the release's files, by id."""
  path = os.path.join(root, name)
  if not os.path.isfile(path):
    raise ValueError(f"{path} is missing: {root} is an incomplete CUB-200-"
                     f"2011 release (it needs {', '.join(FILES)} and "
                     "images/). Extract CUB_200_2011.tgz again.")
  out = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      parts = line.split(maxsplit=1)
      if not parts:
        continue
      try:
        out[int(parts[0])] = parts[1].strip()
      except (ValueError, IndexError):
        raise ValueError(f"{path} line {n} is not '<id> <value>': "
                         f"{line.strip()!r}.") from None
  return out


def read_release(root: str, *, check_files: bool = True
                 ) -> tuple[dict[str, Split], tuple[str, ...]]:
  """`({"train": Split, "test": Split}, class names)` of the release at
  `root` (a `CUB_200_2011/` folder).

  Raises:
    ValueError: a missing or malformed file, ids that the files do not
      share, a label outside 1..200, or (with `check_files`) listed images
      that are not on disk; naming the file.
  """
  images, labels, is_train, classes = (_table(root, f) for f in FILES)
  if not images:
    raise ValueError(f"{os.path.join(root, 'images.txt')} lists no image.")
  for name, table in (("image_class_labels.txt", labels),
                      ("train_test_split.txt", is_train)):
    if set(table) != set(images):
      missing = sorted(set(images) - set(table))[:5]
      raise ValueError(
          f"{os.path.join(root, name)} does not cover the ids of images.txt "
          f"(e.g. missing {missing}): a damaged release; extract it again.")
  # Path order (class folder, then file name): the order both sources share
  # (tfds keeps no image id).
  ids = sorted(images, key=lambda i: images[i])
  y = np.asarray([int(labels[i]) - 1 for i in ids], np.int64)
  if y.min() < 0 or y.max() >= 200:
    raise ValueError(f"{os.path.join(root, 'image_class_labels.txt')} has "
                     "labels outside 1..200.")
  paths = [os.path.join(root, "images", images[i]) for i in ids]
  if check_files:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise ValueError(
          f"{len(missing)} image(s) listed in images.txt are not on disk, "
          f"e.g. {missing[0]}: an incomplete copy of {root}; extract "
          "CUB_200_2011.tgz again.")
  train = np.asarray([is_train[i].strip() == "1" for i in ids])
  names = tuple(classes.get(c + 1, f"class_{c + 1:03d}") for c in range(200))
  out = {}
  for split, keep in (("train", train), ("test", ~train)):
    idx = np.flatnonzero(keep)
    out[split] = Split(tuple(paths[j] for j in idx), y[idx],
                       tuple(images[ids[j]] for j in idx), True)
  return out, names


def _relative(name: str) -> str:
  """A tfds file name as the path under `images/` (the release's ids)."""
  return name.split("images/", 1)[-1] if "images/" in name else name


def read_tfds(data_dir: str | None, split: str) -> tuple[Split, tuple]:
  """A split of tfds `caltech_birds2011` in memory, ordered by file name."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("caltech_birds2011", data_dir=data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  rows = sorted((_relative(ex["image/filename"].decode()), ex["image"],
                 int(ex["label"])) for ex in tfds.as_numpy(ds))
  names = tuple(str(n) for n in builder.info.features["label"].names)
  return Split(tuple(r[1] for r in rows),
               np.asarray([r[2] for r in rows], np.int64),
               tuple(r[0] for r in rows), False), names


class CUB(datasets.Dataset):
  """CUB-200-2011 behind `datasets.Dataset` (see the module doc)."""

  options = ("color_jitter", "crop_min_area")

  def check_options(self, *, pipeline, imb_factor, options) -> None:
    if pipeline == "device":
      raise ValueError(
          "'cub200' is streamed from disk (its images vary in size); "
          "pipeline='device' holds the train set on the accelerator, which "
          "only datasets decoded into memory allow. Pass "
          "--config.pipeline=tfdata.")
    long_tail.check_imb_factor(imb_factor)
    jitter = options.get("color_jitter")
    if jitter is not None and not jitter >= 0:
      raise ValueError(f"color_jitter must be >= 0 (0 = off), got {jitter}.")
    area = options.get("crop_min_area")
    if area is not None and not 0 < area <= 1:
      raise ValueError(f"crop_min_area must lie in (0, 1] (the random "
                       f"resized crop's smallest area; 0.2 in the CUB "
                       f"recipe), got {area}.")

  def check_data(self, data_dir, options) -> None:
    del options
    self._source(data_dir, check_files=True)

  def _source(self, data_dir, *, check_files: bool = False):
    """("release", splits, names) or ("tfds", data_dir, None)."""
    if data_dir is None:
      return "tfds", None, None
    root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"data_dir {root} does not exist. {_FORMS}")
    release = find_release(root)
    if release is not None:
      splits, names = read_release(release, check_files=check_files)
      return "release", splits, names
    if os.path.isdir(os.path.join(root, "caltech_birds2011")):
      if check_files:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        if not tfds.builder("caltech_birds2011", data_dir=root).is_prepared():
          raise ValueError(
              f"{root}/caltech_birds2011/ holds no prepared copy of the "
              "version this tfds reads. Prepare it there (tfds build "
              f"caltech_birds2011 --data_dir={root}), or pass the release. "
              + _FORMS)
      return "tfds", root, None
    raise ValueError(f"data_dir {root} holds neither the CUB-200-2011 "
                     f"release nor tfds's caltech_birds2011. {_FORMS}")

  def _split(self, data_dir, split: str) -> tuple[Split, tuple[str, ...]]:
    kind, found, names = self._source(data_dir)
    if kind == "release":
      return found[split], names
    return read_tfds(found, split)

  def class_names(self, data_dir) -> tuple[str, ...]:
    kind, found, names = self._source(data_dir)
    if kind == "release":
      return names
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tuple(str(n) for n in tfds.builder(
        "caltech_birds2011", data_dir=found).info.features["label"].names)

  def _train_subset(self, data_dir, imb_factor, profile, selection_seed):
    """(the training Split, names, requested counts or None)."""
    split, names = self._split(data_dir, "train")
    r = long_tail.check_imb_factor(imb_factor)
    if r == 1.0:
      return split, names, None
    k = self.info.num_classes
    want = long_tail.long_tail_counts(split.labels.size / k, r,
                                      num_classes=k, profile=profile)
    idx, _ = long_tail.select_long_tail(split.labels, want,
                                        seed=selection_seed)
    sub = Split(tuple(split.items[j] for j in idx), split.labels[idx],
                tuple(split.ids[j] for j in idx), split.read_files)
    return sub, names, want

  def train_input(self, *, data_dir, imb_factor, profile, selection_seed,
                  batch_size, seed, mesh, pipeline, sampler, rows, options
                  ) -> datasets.TrainInput:
    split, names, want = self._train_subset(data_dir, imb_factor, profile,
                                            selection_seed)
    k = self.info.num_classes
    counts = [int(c) for c in long_tail.class_histogram(split.labels, k)]
    empty = [names[c] for c in range(k) if counts[c] == 0]
    if empty:
      raise ValueError(
          f"The long-tailed subset of cub200 (imb_factor={imb_factor}) has "
          f"no image of {len(empty)} class(es), e.g. {empty[:3]}: raise "
          "imb_factor.")
    n = split.labels.size
    if n < batch_size:
      raise ValueError(f"cub200 r={imb_factor} has {n} training images, "
                       f"fewer than one batch of {batch_size}. Lower "
                       "--config.batch_size or raise imb_factor.")
    info, note = self.info, "no groups: the balanced official split"
    if want is not None:
      info = dataclasses.replace(
          info, class_groups=long_tail.groups_by_ranges(GROUP_RANGES))
      note = ("head/medium/tail: class ranges 0-69 / 70-139 / 140-199 "
              "(counts decrease with the label)")
    jitter = options.get("color_jitter")
    area = options.get("crop_min_area")
    local = file_stream.train_batches(
        split.items, split.labels, read_files=split.read_files,
        batch_size=batch_size, seed=seed, rows=rows, sampler=sampler,
        color_jitter=0.0 if jitter is None else jitter,
        min_area=0.2 if area is None else area)
    per_class = [[] for _ in range(k)]
    for i, y in zip(split.ids, split.labels):
      per_class[int(y)].append(i)
    logging.info("cub200 r=%s: %d train images over %d classes", imb_factor,
                 n, sum(c > 0 for c in counts))
    return datasets.TrainInput(
        info, counts, n, batch_size, n // batch_size, pipeline, mesh, None,
        local, {"classes": list(names), "images": per_class},
        groups_note=note)

  def eval_input(self, *, data_dir, split, batch_size, mesh, rows,
                 imb_factor, profile, selection_seed, options
                 ) -> datasets.EvalInput:
    if split == "train_lt":
      table, _, _ = self._train_subset(
          data_dir, 1.0 if imb_factor is None else imb_factor, profile,
          selection_seed)
    else:
      table, _ = self._split(data_dir, split)
    n = table.labels.size
    ds = file_stream.encoded(table.items, table.labels,
                             read_files=table.read_files)
    return datasets.EvalInput(
        self.info, n, batch_size, math.ceil(n / batch_size), mesh,
        file_stream.eval_batches(ds, batch_size=batch_size, rows=rows))


def make(info: datasets.DatasetInfo) -> CUB:
  """The registry's constructor for this module."""
  return CUB(info)

