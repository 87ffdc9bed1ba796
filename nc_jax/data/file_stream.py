"""Batches of encoded images of any size, decoded and augmented per batch.

What the streamed datasets share (ImageNet-LT's image folders, CUB-200):
a table of N images, each a file path (read when its batch is built) or
its encoded bytes held in memory, with N labels. Training follows the same
plan as the in-memory datasets (`device.host_epoch_order`: the epoch's
order is a pure function of (seed, epoch), a permutation or class-balanced
draws), so a resumed run sees exactly the batches an uninterrupted one
saw; every process builds only its own rows. Augmentation is `augment.py`'s
(random resized crop, flip, colour jitter; resize and centre crop for
evaluation), seeded per (seed, step, row).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from nc_jax.data import augment
from nc_jax.data import device as device_lib

Batch = dict[str, Any]


def encoded(items: Sequence[str] | Sequence[bytes], labels: np.ndarray, *,
            read_files: bool) -> tf.data.Dataset:
  """`(encoded image, int64 label)` of every item, in table order.

  Args:
    items: N file paths (`read_files`) or N encoded images.
    labels: `(N,)` labels.
    read_files: whether `items` are paths to read.
  """
  ds = tf.data.Dataset.from_tensor_slices(
      (tf.constant(list(items), tf.string),
       tf.constant(np.asarray(labels, np.int64))))
  if read_files:
    ds = ds.map(lambda p, y: (tf.io.read_file(p), y),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds


def train_batches(items: Sequence[str] | Sequence[bytes], labels: np.ndarray,
                  *, read_files: bool, batch_size: int, seed: int,
                  rows: tuple[int, int], sampler: str = "random",
                  color_jitter: float = augment.COLOR_JITTER,
                  min_area: float = augment.MIN_AREA
                  ) -> Callable[[int], Iterator[Batch]]:
  """`start_step -> iterator` of this process's rows of every train batch.

  Args:
    items, labels, read_files: the table (see `encoded`).
    batch_size: global batch size B; an epoch is `N // B` steps.
    seed: order and augmentation seed.
    rows: `[start, stop)` rows of each global batch built here.
    sampler: "random" or "class_balanced" (`device.host_epoch_order`).
    color_jitter, min_area: `augment.train_preprocess`'s.

  Returns:
    A function whose iterator yields {'image': uint8 (R, 224, 224, 3),
    'label': int32 (R,)} from global step `start_step` on, endlessly.
  """
  labels = np.asarray(labels, np.int64)
  n, b = labels.size, batch_size
  spe = n // b
  r0, r1 = rows
  items_t, labels_t = tf.constant(list(items), tf.string), tf.constant(labels)
  epoch_order = device_lib.host_epoch_order(sampler, seed, labels)
  jitter, area = float(color_jitter), float(min_area)

  def image_of(j):
    item = tf.gather(items_t, j)
    return tf.io.read_file(item) if read_files else item

  def epoch_ds(epoch: int, first: int) -> tf.data.Dataset:
    order = epoch_order(epoch)[:spe * b].reshape(spe, b)[first:, r0:r1]
    steps = np.arange(epoch * spe + first, (epoch + 1) * spe)
    j, s, r = (x.reshape(-1) for x in np.broadcast_arrays(
        order, steps[:, None], np.arange(r0, r1)[None, :]))
    ds = tf.data.Dataset.from_tensor_slices((j, s, r))
    return ds.map(lambda j, s, r: {
        "image": augment.train_preprocess(
            image_of(j), augment.row_seed(seed, s, r), jitter, area),
        "label": tf.cast(tf.gather(labels_t, j), tf.int32)},
                  num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True).batch(r1 - r0).prefetch(2)

  def local(start_step: int) -> Iterator[Batch]:
    epoch, first = divmod(start_step, spe)
    while True:
      yield from epoch_ds(epoch, first).as_numpy_iterator()
      epoch, first = epoch + 1, 0
  return local


def eval_batches(ds: tf.data.Dataset, *, batch_size: int,
                 rows: tuple[int, int]) -> Callable[[], Iterator[Batch]]:
  """`() -> iterator` of this process's rows of padded eval batches.

  Args:
    ds: `(encoded image, label)` of every image once, in a fixed order.
    batch_size: global batch size B.
    rows: `[start, stop)` rows of each global batch built here.

  Returns:
    A function whose iterator yields {'image': uint8 (R, 224, 224, 3),
    'label': int32 (R,), 'mask': bool (R,)}: ceil(N / B) batches, the last
    padded (mask False).
  """
  r0, r1 = rows

  def local() -> Iterator[Batch]:
    # B - 1 padding rows then drop_remainder: exactly ceil(n / B) batches
    # without needing n, and the last one padded.
    pad = tf.data.Dataset.from_tensors(
        (tf.constant(b""), tf.constant(0, tf.int64), False)).repeat(
            batch_size - 1)
    d = ds.map(lambda img, y: (img, tf.cast(y, tf.int64), True)).concatenate(
        pad)
    d = d.batch(batch_size, drop_remainder=True).map(
        lambda img, y, m: (img[r0:r1], y[r0:r1], m[r0:r1])).unbatch()
    d = d.map(lambda img, y, m: {
        "image": tf.cond(
            m, lambda: augment.eval_preprocess(img),
            lambda: tf.zeros((augment.SIZE, augment.SIZE, 3), tf.uint8)),
        "label": tf.where(m, tf.cast(y, tf.int32), 0), "mask": m},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return d.batch(r1 - r0).prefetch(2).as_numpy_iterator()
  return local
