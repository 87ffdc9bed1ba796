"""ImageNet-LT: the standard train list over ImageNet, streamed from disk.

The dataset module of registry entry "imagenet_lt" (`make(info)` returns
its `datasets.Dataset`); its own config fields are `imagenet_lt_train_list`,
`color_jitter` and `crop_min_area`.

The subset is given by the standard split file (ImageNet_LT_train.txt,
115,846 lines "train/n01440764/n01440764_10026.JPEG 0"); the test set is the
50,000-image ImageNet validation set. Two sources (see `sources.py`):

- an image-folder tree (`train/<wnid>/*.JPEG`, `test/<wnid>/*.JPEG`): the
  list's paths are read relative to `data_dir`, so only the subset is read
  and every epoch's order comes from the shared plan (`device.py`: a full
  random permutation, or class-balanced draws), exactly as for the small
  datasets;
- tfds `imagenet2012` (manual download): examples are matched on their
  `file_name` feature against the list; each epoch streams the whole split
  (tfrecords allow no random access), keeps the listed images and shuffles
  them within blocks of `block` images with stateless, (seed, epoch,
  block)-seeded shuffles. tfds stores ImageNet in a random order already, so
  the block shuffle is enough mixing. Every process reads every record but
  decodes only its own rows.

Augmentation: `augment.py` (the reference's torchvision recipe: random
resized crop, flip, colour jitter; resize and centre crop for evaluation).

Class groups (`long_tail.class_groupings`): the reference relabels the
classes by descending train count and reports head / medium / tail accuracy
over the rank ranges [0, 390) / [390, 835) / [835, 1000)
(`config/imagenet/*.yaml`, `train.py`); the literature's many / medium / few
split is by count (> 100, 20-100, < 20 images). Both are expressed here as
sets of ORIGINAL labels; the data is never relabelled. For the metrics this
is the same thing: the reference's per-class accuracy of rank r is that of
the original class `order[r]`, and a group's accuracy is the mean over its
classes. For training the relabelling only decides which column of the fixed
ETF each class gets, and the ETF is a random rotation of a column-symmetric
simplex, so another assignment is just another draw of the same random
classifier (a learnable linear classifier is initialised i.i.d. per class:
no effect at all).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Mapping

from absl import logging
import numpy as np
import tensorflow as tf

from nc_jax.data import augment
from nc_jax.data import device as device_lib
from nc_jax.data import file_stream
from nc_jax.data import datasets
from nc_jax.data import long_tail
from nc_jax.data import sources

Batch = dict[str, np.ndarray]
Groups = dict[str, tuple[int, ...]]


def read_split_list(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
  """Parses an ImageNet-LT split file.

  Args:
    path: text file of lines "relative/path/name.JPEG label".

  Returns:
    `(paths, labels)`: relative paths and `(N,)` int64 labels.
  """
  if path is None or not os.path.isfile(os.fspath(path)):
    raise FileNotFoundError(
        f"ImageNet-LT needs its train list (ImageNet_LT_train.txt, lines "
        f"'train/n01440764/n01440764_10026.JPEG 0'); got {path!r}. Pass "
        "--config.imagenet_lt_train_list=/path/to/ImageNet_LT_train.txt.")
  paths, labels = [], []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      # rsplit: the label is the last field; keep any spaces in the path.
      parts = line.strip().rsplit(maxsplit=1)
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"{path}:{lineno}: expected 'path label', got "
                         f"{line.strip()!r}.")
      paths.append(parts[0])
      labels.append(int(parts[1]))
  return paths, np.asarray(labels, np.int64)


# -------------------------------------------------------------------- train


@dataclasses.dataclass
class Stream:
  """A host stream: sizes and `iterate_local` (train: `start_step ->`).

  Attributes:
    info: the registry entry; with the train list read, `info.class_groups`
      is the reference's rank grouping (`class_groupings(...)["by_rank"]`).
    counts: per-class train counts (empty for the test split).
    num_examples: images in the stream's epoch.
    iterate_local: the batch iterator of this process's rows.
    class_groups_by_count: the literature's many/medium/few grouping
      (`class_groupings(...)["by_count"]`), empty when `counts` is.
  """
  info: datasets.DatasetInfo
  counts: list[int]
  num_examples: int
  iterate_local: Callable[..., Iterator[Batch]]
  class_groups_by_count: Mapping[str, tuple[int, ...]] = dataclasses.field(
      default_factory=dict)


def _selection(source: sources.Source, train_list: str | None
               ) -> tuple[list[str], np.ndarray]:
  if train_list is None and source.kind == "folder":
    listed = sources.folder_examples(source, "train")
    if listed is not None:
      logging.info("No ImageNet-LT list: using every image under %s/train.",
                   source.root)
      return listed[0], listed[1]
  paths, labels = read_split_list(train_list)
  if source.kind == "folder":
    paths = [os.path.join(source.root, p) for p in paths]
  return paths, labels


def make_train_stream(info: datasets.DatasetInfo, *, data_dir: str | None,
                      train_list: str | None, batch_size: int, seed: int,
                      rows: tuple[int, int], block: int = 4096,
                      color_jitter: float = augment.COLOR_JITTER,
                      sampler: str = "random",
                      min_area: float = augment.MIN_AREA) -> Stream:
  """The ImageNet-LT train stream of this process's rows.

  Args:
    info: the registry entry.
    data_dir: image-folder tree or tfds data directory.
    train_list: the ImageNet-LT split file.
    batch_size: global batch size B.
    seed: order/augmentation seed.
    rows: `[start, stop)` rows of each global batch built here.
    block: shuffle block of the tfds stream.
    color_jitter: brightness/contrast/saturation jitter strength (the
      reference's 0.4); 0 turns the jitter off.
    sampler: "random" or "class_balanced" (the shared plan of `device.py`;
      image folders only, since tfds records allow no random access).
    min_area: the random resized crop's smallest area (`crop_min_area`).

  Returns:
    A `Stream`; `iterate_local(start_step)` yields {'image': uint8
    (R, 224, 224, 3), 'label': int32 (R,)}.
  """
  color_jitter = float(color_jitter)
  if not color_jitter >= 0:
    raise ValueError(f"color_jitter must be >= 0, got {color_jitter}.")
  source = sources.check_data_dir(info.name, data_dir)
  device_lib.check_sampler(sampler)
  if sampler != "random" and source.kind != "folder":
    raise ValueError(
        f"sampler={sampler!r} draws images in any order, which the tfds "
        "ImageNet stream (sequential tfrecords) cannot; use an image-folder "
        "data_dir or sampler='random'.")
  paths, labels = _selection(source, train_list)
  k = info.num_classes
  counts = long_tail.class_histogram(labels, k)
  groups = long_tail.class_groupings(counts)
  info = dataclasses.replace(info, class_groups=groups["by_rank"])
  n, b = labels.size, batch_size
  if n < b:
    raise ValueError(f"The ImageNet-LT list has {n} images, fewer than one "
                     f"batch of {b}.")
  logging.info("ImageNet-LT (%s): %d train images, %d classes present",
               source.kind, n, sum(c > 0 for c in counts))

  if source.kind == "folder":
    local = file_stream.train_batches(
        paths, labels, read_files=True, batch_size=b, seed=seed, rows=rows,
        sampler=sampler, color_jitter=color_jitter, min_area=min_area)
  else:
    local = _tfds_train_batches(
        source, paths, labels, batch_size=b, seed=seed, rows=rows,
        block=block, color_jitter=color_jitter, min_area=min_area)
  return Stream(info, counts, n, local, groups["by_count"])


def _tfds_train_batches(source: sources.Source, paths: list[str],
                        labels: np.ndarray, *, batch_size: int, seed: int,
                        rows: tuple[int, int], block: int, color_jitter: float,
                        min_area: float) -> Callable[[int], Iterator[Batch]]:
  """`start_step -> iterator` of this process's rows of the train batches
  from tfds's ImageNet records: the listed images, in shuffled blocks of
  `block` (seeded per epoch), `batch_size` to a step."""
  n, b = labels.size, batch_size
  spe = n // b
  r0, r1 = rows
  names = [os.path.basename(p) for p in paths]
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(names),
                                          tf.constant(labels, tf.int64)), -1)
  base = sources.encoded_dataset(source, "train").map(
      lambda ex: (ex["image"], table.lookup(ex["file_name"]))).filter(
          lambda img, y: y >= 0)

  def epoch_ds(epoch):
    def shuffle_block(i, block_data):
      imgs, ys = block_data
      order = tf.random.experimental.stateless_shuffle(
          tf.range(tf.shape(ys)[0]),
          seed=tf.stack([tf.cast(seed, tf.int64), epoch * 1_000_003 + i]))
      return tf.data.Dataset.from_tensor_slices(
          (tf.gather(imgs, order), tf.gather(ys, order)))
    ds = base.batch(block).enumerate().flat_map(shuffle_block)
    ds = ds.batch(b, drop_remainder=True).take(spe).enumerate()
    return ds.map(lambda i, ex: (epoch * spe + i, ex[0][r0:r1], ex[1][r0:r1]))

  def finish(ds: tf.data.Dataset, start_step: int) -> Iterator[Batch]:
    # ds: per-example (encoded, label, step, row), in batch order.
    ds = ds.map(lambda img, y, s, r: {
        "image": augment.train_preprocess(img, augment.row_seed(seed, s, r),
                                          color_jitter, min_area),
        "label": tf.cast(y, tf.int32), "step": s},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(r1 - r0, drop_remainder=True).prefetch(2)
    expected = start_step
    for batch in ds.as_numpy_iterator():
      step = int(batch.pop("step")[0])
      if step != expected:
        # A short epoch would silently shift every later step.
        raise RuntimeError(
            f"ImageNet-LT stream: expected step {expected}, got {step}: "
            f"fewer than the {n} listed images were found in {source.root} "
            "(is the list for this copy of ImageNet?).")
      expected += 1
      yield batch

  def local(start_step: int) -> Iterator[Batch]:
    epoch, first = divmod(start_step, spe)
    ds = tf.data.Dataset.range(epoch, 2**40).flat_map(epoch_ds).skip(first)
    ds = ds.flat_map(lambda s, imgs, ys: tf.data.Dataset.from_tensor_slices(
        (imgs, ys, tf.fill([r1 - r0], s), tf.range(r0, r1, dtype=tf.int64))))
    return finish(ds, start_step)
  return local


# --------------------------------------------------------------------- eval


def make_eval_stream(info: datasets.DatasetInfo, *, data_dir: str | None,
                     split: str, batch_size: int, rows: tuple[int, int],
                     train_list: str | None = None) -> Stream:
  """ImageNet(-LT) evaluation stream, every image once, padded last batch.

  Args:
    info: the registry entry.
    data_dir: image-folder tree or tfds data directory.
    split: "test" (ImageNet val), "train_lt" (the list, unaugmented) or
      "train".
    batch_size: global batch size B.
    rows: `[start, stop)` rows of each global batch built here.
    train_list: the ImageNet-LT split file for "train_lt".

  Returns:
    A `Stream`; `iterate_local()` yields {'image': uint8 (R, 224, 224, 3),
    'label': int32 (R,), 'mask': bool (R,)}.
  """
  source = sources.check_data_dir(info.name, data_dir)
  if split == "train_lt":
    paths, labels = _selection(source, train_list)
    if source.kind == "folder":
      ds = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
          lambda p, y: (tf.io.read_file(p), y))
    else:
      names = [os.path.basename(p) for p in paths]
      table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
          tf.constant(names), tf.constant(labels, tf.int64)), -1)
      ds = sources.encoded_dataset(source, "train").map(
          lambda ex: (ex["image"], table.lookup(ex["file_name"]))).filter(
              lambda img, y: y >= 0)
    n = labels.size
  else:
    ds = sources.encoded_dataset(source, split).map(
        lambda ex: (ex["image"], ex["label"]))
    n = int(ds.cardinality())
    if n < 0:
      n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
  counts = list(long_tail.class_histogram(labels, info.num_classes)
                if split == "train_lt" else [])
  by_count = {}
  if counts:
    groups = long_tail.class_groupings(counts)
    info = dataclasses.replace(info, class_groups=groups["by_rank"])
    by_count = groups["by_count"]
  local = file_stream.eval_batches(ds, batch_size=batch_size, rows=rows)
  return Stream(info, counts, n, local, by_count)


# ------------------------------------------------------------ the dataset

_GROUPS_NOTE = (
    "head/medium/tail: the reference's ranks 0-390 / 390-835 / 835-1000 of "
    "the classes sorted by descending train count; many_shot/medium_shot/"
    "few_shot: > 100, 20-100, < 20 train images (the literature's split)")


class ImageNetLT(datasets.Dataset):
  """ImageNet-LT behind `datasets.Dataset`: streamed, its subset a list."""

  options = ("imagenet_lt_train_list", "color_jitter", "crop_min_area")

  def check_data(self, data_dir, options) -> None:
    sources.check_dataset_data(self.info.name, data_dir, options)

  def class_names(self, data_dir) -> tuple[str, ...]:
    return sources.dataset_class_names(self.info.name, data_dir)

  def check_options(self, *, pipeline, imb_factor, options) -> None:
    del imb_factor  # the list is the subset
    if pipeline == "device":
      raise ValueError(
          f"{self.info.name!r} is streamed from disk; pipeline='device' "
          "holds the train set on the accelerator, which only datasets "
          "decoded into memory allow. Pass --config.pipeline=tfdata.")
    jitter = options.get("color_jitter")
    if jitter is not None and not jitter >= 0:
      raise ValueError(f"color_jitter must be >= 0 (0.4 in the ImageNet-LT "
                       f"recipe; 0 = off), got {jitter}.")
    area = options.get("crop_min_area")
    if area is not None and not 0 < area <= 1:
      raise ValueError(f"crop_min_area must lie in (0, 1] (0.08 in the "
                       f"ImageNet-LT recipe), got {area}.")
    train_list = options.get("imagenet_lt_train_list")
    if train_list and not os.path.isfile(os.path.expanduser(train_list)):
      raise ValueError(f"imagenet_lt_train_list {train_list} is not a file. "
                       "Pass the path of ImageNet_LT_train.txt.")

  def train_input(self, *, data_dir, imb_factor, profile, selection_seed,
                  batch_size, seed, mesh, pipeline, sampler, rows, options
                  ) -> datasets.TrainInput:
    del imb_factor, profile, selection_seed  # the list is the subset
    jitter = options.get("color_jitter")
    stream = make_train_stream(
        self.info, data_dir=data_dir,
        train_list=options.get("imagenet_lt_train_list"),
        batch_size=batch_size, seed=seed, rows=rows,
        color_jitter=augment.COLOR_JITTER if jitter is None else jitter,
        sampler=sampler,
        min_area=options.get("crop_min_area") or augment.MIN_AREA)
    by_count = stream.class_groups_by_count
    return datasets.TrainInput(
        stream.info, stream.counts, stream.num_examples, batch_size,
        stream.num_examples // batch_size, pipeline, mesh, None,
        stream.iterate_local,
        extra_groups={"many_shot": by_count["head"],
                      "medium_shot": by_count["medium"],
                      "few_shot": by_count["tail"]},
        groups_note=_GROUPS_NOTE)

  def eval_input(self, *, data_dir, split, batch_size, mesh, rows,
                 imb_factor, profile, selection_seed, options
                 ) -> datasets.EvalInput:
    del imb_factor, profile, selection_seed
    stream = make_eval_stream(
        self.info, data_dir=data_dir, split=split, batch_size=batch_size,
        rows=rows, train_list=options.get("imagenet_lt_train_list"))
    return datasets.EvalInput(
        self.info, stream.num_examples, batch_size,
        -(-stream.num_examples // batch_size), mesh, stream.iterate_local)


def make(info: datasets.DatasetInfo) -> ImageNetLT:
  """The registry's constructor for this module."""
  return ImageNetLT(info)
