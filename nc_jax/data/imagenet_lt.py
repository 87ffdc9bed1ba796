"""ImageNet-LT: the standard train list over ImageNet, streamed from disk.

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

Augmentation (train): random resized crop to 224 (area 8%-100%, aspect
3/4-4/3) and a horizontal flip, from stateless ops seeded by
(seed, step, row); eval: resize the shorter side to 256, centre crop 224.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

from absl import logging
import numpy as np
import tensorflow as tf

from nc_jax.data import device as device_lib
from nc_jax.data import long_tail
from nc_jax.data import sources

SIZE, RESIZE = 224, 256
Batch = dict[str, np.ndarray]


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


# ------------------------------------------------------------ preprocessing


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def train_preprocess(encoded: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Random resized crop + flip of one encoded image.

  Args:
    encoded: scalar tf.string (JPEG or PNG).
    seed: `(2,)` int stateless seed.

  Returns:
    `(224, 224, 3)` uint8.
  """
  image = _decode(encoded)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seeds[0], min_object_covered=0.0, aspect_ratio_range=(0.75, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, size)
  image = tf.image.resize(image, (SIZE, SIZE), method="bilinear")
  flip = tf.random.stateless_uniform((), seeds[1]) < 0.5
  image = tf.cond(flip, lambda: tf.image.flip_left_right(image),
                  lambda: image)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def eval_preprocess(encoded: tf.Tensor) -> tf.Tensor:
  """Shorter side to 256, centre 224 crop: `(224, 224, 3)` uint8."""
  image = _decode(encoded)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = RESIZE / tf.reduce_min(shape)
  hw = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, hw, method="bilinear")
  top, left = (hw[0] - SIZE) // 2, (hw[1] - SIZE) // 2
  image = tf.slice(image, [top, left, 0], [SIZE, SIZE, 3])
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _row_seed(seed: int, step: tf.Tensor, row: tf.Tensor) -> tf.Tensor:
  base = tf.constant([seed, 1], tf.int64)
  s = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
  return tf.random.experimental.stateless_fold_in(s, tf.cast(row, tf.int64))


# -------------------------------------------------------------------- train


@dataclasses.dataclass
class Stream:
  """A host stream: sizes and `iterate_local` (train: `start_step ->`)."""
  info: sources.DatasetInfo
  counts: list[int]
  num_examples: int
  iterate_local: Callable[..., Iterator[Batch]]


def _selection(source: sources.Source, train_list: str | None
               ) -> tuple[list[str], np.ndarray]:
  if train_list is None and source.kind == "folder":
    listed = sources._folder_examples(source, "train")  # pylint: disable=protected-access
    if listed is not None:
      logging.info("No ImageNet-LT list: using every image under %s/train.",
                   source.root)
      return listed[0], listed[1]
  paths, labels = read_split_list(train_list)
  if source.kind == "folder":
    paths = [os.path.join(source.root, p) for p in paths]
  return paths, labels


def make_train_stream(info: sources.DatasetInfo, *, data_dir: str | None,
                      train_list: str | None, batch_size: int, seed: int,
                      rows: tuple[int, int], block: int = 4096,
                      sampler: str = "random") -> Stream:
  """The ImageNet-LT train stream of this process's rows.

  Args:
    info: the registry entry.
    data_dir: image-folder tree or tfds data directory.
    train_list: the ImageNet-LT split file.
    batch_size: global batch size B.
    seed: order/augmentation seed.
    rows: `[start, stop)` rows of each global batch built here.
    block: shuffle block of the tfds stream.
    sampler: "random" or "class_balanced" (the shared plan of `device.py`;
      image folders only, since tfds records allow no random access).

  Returns:
    A `Stream`; `iterate_local(start_step)` yields {'image': uint8
    (R, 224, 224, 3), 'label': int32 (R,)}.
  """
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
  info = dataclasses.replace(info,
                             class_groups=long_tail.groups_by_count(counts))
  n, b = labels.size, batch_size
  if n < b:
    raise ValueError(f"The ImageNet-LT list has {n} images, fewer than one "
                     f"batch of {b}.")
  spe = n // b
  r0, r1 = rows
  logging.info("ImageNet-LT (%s): %d train images, %d classes present",
               source.kind, n, sum(c > 0 for c in counts))

  def finish(ds: tf.data.Dataset, start_step: int) -> Iterator[Batch]:
    # ds: per-example (encoded, label, step, row), in batch order.
    ds = ds.map(lambda img, y, s, r: {
        "image": train_preprocess(img, _row_seed(seed, s, r)),
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

  if source.kind == "folder":
    paths_t, labels_t = tf.constant(paths), tf.constant(labels)
    perm_fn = device_lib.host_epoch_order(sampler, seed, labels)

    def epoch_ds(epoch: int, first: int) -> tf.data.Dataset:
      order = perm_fn(epoch)[:spe * b].reshape(spe, b)[first:, r0:r1]
      steps = np.arange(epoch * spe + first, (epoch + 1) * spe)
      j, s, r = (x.reshape(-1) for x in np.broadcast_arrays(
          order, steps[:, None], np.arange(r0, r1)[None, :]))
      return tf.data.Dataset.from_tensor_slices((j, s, r)).map(
          lambda j, s, r: (tf.io.read_file(tf.gather(paths_t, j)),
                           tf.gather(labels_t, j), s, r))

    def local(start_step: int) -> Iterator[Batch]:
      epoch, first = divmod(start_step, spe)
      while True:
        yield from finish(epoch_ds(epoch, first), epoch * spe + first)
        epoch, first = epoch + 1, 0
    return Stream(info, counts, n, local)

  names = [os.path.basename(p) for p in paths]
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(names),
                                          tf.constant(labels, tf.int64)), -1)
  base = sources.encoded_dataset(source, "train").map(
      lambda ex: (ex["image"], table.lookup(ex["file_name"]))).filter(
          lambda img, y: y >= 0)

  def epoch_ds(epoch):
    def shuffle_block(i, block):
      imgs, ys = block
      order = tf.random.experimental.stateless_shuffle(
          tf.range(tf.shape(ys)[0]),
          seed=tf.stack([tf.cast(seed, tf.int64), epoch * 1_000_003 + i]))
      return tf.data.Dataset.from_tensor_slices(
          (tf.gather(imgs, order), tf.gather(ys, order)))
    ds = base.batch(block).enumerate().flat_map(shuffle_block)
    ds = ds.batch(b, drop_remainder=True).take(spe).enumerate()
    return ds.map(lambda i, ex: (epoch * spe + i, ex[0][r0:r1], ex[1][r0:r1]))

  def local(start_step: int) -> Iterator[Batch]:
    epoch, first = divmod(start_step, spe)
    ds = tf.data.Dataset.range(epoch, 2**40).flat_map(epoch_ds).skip(first)
    ds = ds.flat_map(lambda s, imgs, ys: tf.data.Dataset.from_tensor_slices(
        (imgs, ys, tf.fill([r1 - r0], s), tf.range(r0, r1, dtype=tf.int64))))
    return finish(ds, start_step)
  return Stream(info, counts, n, local)


# --------------------------------------------------------------------- eval


def make_eval_stream(info: sources.DatasetInfo, *, data_dir: str | None,
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
  r0, r1 = rows

  def local() -> Iterator[Batch]:
    # B - 1 padding rows then drop_remainder: exactly ceil(n / B) batches
    # without needing n, and the last one padded.
    pad = tf.data.Dataset.from_tensors(
        (tf.constant(b""), tf.constant(0, tf.int64), False)).repeat(
            batch_size - 1)
    d = ds.map(lambda img, y: (img, y, True)).concatenate(pad)
    d = d.batch(batch_size, drop_remainder=True).map(
        lambda img, y, m: (img[r0:r1], y[r0:r1], m[r0:r1])).unbatch()
    d = d.map(lambda img, y, m: {
        "image": tf.cond(m, lambda: eval_preprocess(img),
                         lambda: tf.zeros((SIZE, SIZE, 3), tf.uint8)),
        "label": tf.where(m, tf.cast(y, tf.int32), 0), "mask": m},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return d.batch(r1 - r0).prefetch(2).as_numpy_iterator()
  return Stream(info, counts, n, local)
