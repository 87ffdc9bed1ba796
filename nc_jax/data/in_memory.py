"""The small labelled-image datasets, decoded into host memory.

The dataset module of registry entries "cifar10", "cifar100", "svhn" and
"stl10" (they differ only in their `DatasetInfo`): `make(info)` returns an
`InMemory` `datasets.Dataset`. Its one own config field is `train_splits`
(SVHN trains on train + extra unless it says otherwise).

The long-tailed subset is selected as the reference does (`load_train_lt`)
from the labels alone, and only the selected images are decoded, once, into
a uint8 array (CIFAR-10-LT: 12,406 images, 38 MB), cached for the train
input and the train_lt eval input to share. Batches come from the shared
plan (`device.py`: the epoch's order and the crop/flip draws are pure
functions of (seed, step)), built either on the devices ("device") or per
process by tf.data ("tfdata", `tf_crop_flip_gather`); both give the same
batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterator

from absl import logging
import numpy as np

from nc_jax.data import datasets
from nc_jax.data import device as device_lib
from nc_jax.data import long_tail
from nc_jax.data import sources

Batch = dict[str, Any]

_RANGE_NOTE = ("head/medium/tail: fixed class-index ranges of the reference "
               "configs (10 classes: 0-2 / 3-6 / 7-9; CIFAR-100: 0-35 / "
               "36-70 / 71-99)")


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """Decoded images and labels held in host memory.

  Attributes:
    images: `(N, H, W, C)` uint8 (read-only).
    labels: `(N,)` int32 (read-only).
    counts: K per-class counts of `labels`.
    requested: K per-class counts asked for (equal to `counts` unless a
      class had fewer images than requested), or None for full splits.
    ids: N example ids (see `SplitIndex`), prefixed by the split for
      subsets of several splits (SVHN's "extra/...").
    class_names: the K class names.
    canonical: whether every split was walked in its original order.
  """
  images: np.ndarray
  labels: np.ndarray
  counts: tuple[int, ...]
  requested: tuple[int, ...] | None = None
  ids: tuple[str, ...] = ()
  class_names: tuple[str, ...] = ()
  canonical: bool = True

  def subset_record(self) -> dict:
    """`{"classes": [names], "images": [[ids of class 0], ...]}`: which
    images were selected, ids in canonical order within each class."""
    per = [[] for _ in self.class_names]
    for i, y in zip(self.ids, self.labels):
      per[int(y)].append(i)
    return {"classes": list(self.class_names), "images": per}


def _freeze(x: np.ndarray) -> np.ndarray:
  x.setflags(write=False)
  return x


def load_train_lt(name: str, data_dir: str, imb_factor: float,
                  profile: str, selection_seed: int,
                  train_splits: tuple[str, ...] | None = None) -> ArraySplit:
  """The long-tailed training subset of a small dataset, decoded (cached;
  see `_load_train_lt`)."""
  return _load_train_lt(name, data_dir, float(imb_factor), profile,
                        int(selection_seed),
                        tuple(train_splits) if train_splits else None)


def subset_indices(labels: np.ndarray, num_classes: int, imb_factor: float,
                   profile: str, selection_seed: int
                   ) -> tuple[np.ndarray, list[int], list[int]]:
  """The reference's long-tailed selection from one train split.

  Args:
    labels: `(N,)` the split's labels in canonical order.
    num_classes: K (the profile's n_max is N / K).
    imb_factor, profile, selection_seed: the subset.

  Returns:
    `(indices, got, wanted)`: ascending canonical positions, and the K
    per-class counts kept and asked for.
  """
  want = long_tail.long_tail_counts(labels.size / num_classes, imb_factor,
                                    num_classes=num_classes, profile=profile)
  idx, got = long_tail.select_long_tail(labels, want, seed=selection_seed)
  return idx, got, want


@functools.lru_cache(maxsize=4)
def _load_train_lt(name: str, data_dir: str, imb_factor: float,
                   profile: str, selection_seed: int,
                   train_splits: tuple[str, ...] | None) -> ArraySplit:
  """The long-tailed training subset of a small dataset, decoded.

  The reference's selection: per split, one `RandomState(selection_seed)`
  shuffles each class's positions in the split's canonical order, classes
  in label order, and the first n_c are kept. Each train split (SVHN: train
  and extra, unless `train_splits` says otherwise) is subsampled on its own
  with `n_max = len(split) / K` and the subsets are concatenated in split
  order. The subset is held in canonical order. Cached: the train input and
  the train_lt eval input share one copy.
  """
  info = datasets.dataset_info(name)
  source = sources.check_data_dir(name, data_dir)
  k = info.num_classes
  splits = sources.available_splits(source, train_splits)
  images, labels, ids = [], [], []
  requested, counts = np.zeros(k, int), np.zeros(k, int)
  canonical = True
  for split in splits:
    index = sources.split_index(source, split)
    idx, got, want = subset_indices(index.labels, k, imb_factor, profile,
                                    selection_seed)
    if got != want:
      logging.warning("%s/%s: some classes have fewer images than the "
                      "long-tail profile asks for; kept %s of %s.", name,
                      split, got, want)
    images.append(sources.decode_images(source, split, idx))
    labels.append(index.labels[idx])
    prefix = f"{split}/" if len(splits) > 1 else ""
    ids += [prefix + index.ids[i] for i in idx]
    requested += want
    counts += got
    canonical &= index.canonical
  empty = [c for c in range(k) if counts[c] == 0]
  if empty:
    raise ValueError(
        f"The long-tailed subset of {name} (imb_factor={imb_factor}, "
        f"{profile}) has no image of class(es) "
        f"{[sources.class_names(source)[c] for c in empty]} (asked for "
        f"{[int(requested[c]) for c in empty]}): the run would report "
        "classes it never saw. Raise imb_factor, or add images.")
  out = ArraySplit(_freeze(np.concatenate(images)),
                   _freeze(np.concatenate(labels).astype(np.int32)),
                   tuple(int(x) for x in counts),
                   tuple(int(x) for x in requested), tuple(ids),
                   sources.class_names(source), canonical)
  logging.info("%s-LT r=%s (%s, selection seed %d) from %s: %d images, per "
               "class %s", name, imb_factor, profile, selection_seed,
               source.root, out.labels.size, list(out.counts))
  return out


@functools.lru_cache(maxsize=4)
def load_split(name: str, data_dir: str, split: str) -> ArraySplit:
  """A whole split of a small dataset (e.g. "test"), decoded."""
  source = sources.check_data_dir(name, data_dir)
  index = sources.split_index(source, split)
  images = sources.decode_images(source, split)
  if images.shape[0] != index.labels.size:
    raise RuntimeError(f"{name}/{split}: {images.shape[0]} images but "
                       f"{index.labels.size} labels.")
  k = datasets.dataset_info(name).num_classes
  return ArraySplit(_freeze(images), _freeze(index.labels.astype(np.int32)),
                    tuple(long_tail.class_histogram(index.labels, k)),
                    None, index.ids, sources.class_names(source),
                    index.canonical)


# ------------------------------------------------------------ batches


def _host_plan(seed: int, labels: np.ndarray, rows: np.ndarray, augment: str,
               sampler: str = "random"
               ) -> Callable[[int, int, int], tuple[np.ndarray, ...]]:
  """Per-epoch plan computed with JAX on the host CPU (see device.py).

  Returns a function `(epoch, spe, B, first, stop) -> (idx, dy, dx, flip,
  steps)` for the in-epoch steps `first <= i < stop` of `epoch` (spe steps
  of B per epoch), each `(S, R)` int32 (steps: the global steps, `(S,)`),
  R = len(rows); the epoch's order comes from `sampler`.
  """
  rows_j = np.asarray(rows, np.int32)
  seed_u = np.uint32(seed)
  epoch_order = device_lib.host_epoch_order(sampler, seed, labels)

  def plan(epoch: int, spe: int, b: int, first: int, stop: int):
    perm = epoch_order(epoch)
    with device_lib.host_context():
      steps = np.arange(epoch * spe + first, epoch * spe + stop,
                        dtype=np.int32)
      idx = perm[:spe * b].reshape(spe, b)[first:stop][:, rows_j]
      if augment == "crop_flip":
        dy, dx, flip = (np.asarray(a) for a in device_lib.host_augment_draws(
            seed_u, steps, rows_j))
      else:
        dy = dx = flip = np.zeros_like(idx)
    return idx, dy, dx, flip, steps
  return plan


def tf_crop_flip_gather(images: tf.Tensor, idx: tf.Tensor, dy: tf.Tensor,
                        dx: tf.Tensor, flip: tf.Tensor, *,
                        pad: int = device_lib.PAD) -> tf.Tensor:
  """TensorFlow twin of `device.crop_flip_gather` (bit-identical output).

  Pads the R gathered images and picks rows, then columns, with batched
  gathers: twice as fast on CPU as one gather_nd over every pixel.

  Args:
    images: `(N, H, W, C)` uint8; idx, dy, dx, flip: `(R,)` int32.

  Returns:
    `(R, H, W, C)` uint8: row b is `padded[idx_b, dy_b + i, dx_b + j']`,
    `j' = W - 1 - j` when flipped.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  h, w = images.shape[1], images.shape[2]
  x = tf.pad(tf.gather(images, idx), [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  rows = dy[:, None] + tf.range(h)[None, :]                       # (R, H)
  j = tf.range(w)[None, :]
  cols = dx[:, None] + tf.where(flip[:, None] == 1, w - 1 - j, j)  # (R, W)
  x = tf.gather(x, rows, axis=1, batch_dims=1)                    # (R,H,W+2p,C)
  return tf.gather(x, cols, axis=2, batch_dims=1)                 # (R,H,W,C)


def _array_tfdata(split: ArraySplit, *, batch_size: int, seed: int,
                  augment: str, rows: tuple[int, int], sampler: str = "random"
                  ) -> Callable[[int], Iterator[Batch]]:
  """tf.data over an in-memory subset; returns `start_step -> iterator`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = split.labels.size
  b = batch_size
  spe = n // b
  plan = _host_plan(seed, split.labels, np.arange(*rows), augment, sampler)
  # Captured once; tf.data passes it to the map function by reference.
  images_t = tf.constant(split.images)
  labels_t = tf.constant(split.labels)

  def build(idx, dy, dx, flip):
    if augment == "crop_flip":
      image = tf_crop_flip_gather(images_t, idx, dy, dx, flip)
    else:
      image = tf.gather(images_t, idx)
    return {"image": image, "label": tf.gather(labels_t, idx)}

  def local(start_step: int) -> Iterator[Batch]:
    # One small dataset per epoch from that epoch's plan: no Python on the
    # per-step path, and the plan is never more than an epoch ahead.
    epoch, first = divmod(start_step, spe)
    while True:
      idx, dy, dx, flip, _ = plan(epoch, spe, b, first, spe)
      ds = tf.data.Dataset.from_tensor_slices((idx, dy, dx, flip))
      ds = ds.map(build, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True).prefetch(4)
      yield from ds.as_numpy_iterator()
      epoch, first = epoch + 1, 0
  return local


def _abspath(data_dir: str | None) -> str | None:
  """An absolute data_dir; None (tfds's default data directory) stays."""
  return None if data_dir is None else os.path.abspath(data_dir)


class InMemory(datasets.Dataset):
  """A small dataset behind `datasets.Dataset`, decoded into memory."""

  options = ("train_splits",)

  def check_options(self, *, pipeline, imb_factor, options) -> None:
    del pipeline, options  # both pipelines serve it; splits: at load time
    long_tail.check_imb_factor(imb_factor)

  def check_data(self, data_dir, options) -> None:
    sources.check_dataset_data(self.info.name, data_dir, options)

  def class_names(self, data_dir) -> tuple[str, ...]:
    return sources.dataset_class_names(self.info.name, data_dir)

  def train_input(self, *, data_dir, imb_factor, profile, selection_seed,
                  batch_size, seed, mesh, pipeline, sampler, rows, options
                  ) -> datasets.TrainInput:
    name, info = self.info.name, self.info
    r = long_tail.check_imb_factor(imb_factor)
    sources.check_data_dir(name, data_dir)
    split = load_train_lt(name, _abspath(data_dir), r, profile,
                          int(selection_seed),
                          sources.splits_key(options.get("train_splits")))
    n = split.labels.size
    if n < batch_size:
      raise ValueError(
          f"{name}-LT r={r} has {n} images, fewer than one batch of "
          f"{batch_size}. Lower --config.batch_size (to at most {n}) or "
          "raise imb_factor.")
    counts = list(split.counts)
    logging.info("train input %s-LT r=%s (%s): %d images, per class %s; %d "
                 "steps/epoch of %d, pipeline %s, rows [%d, %d) on this "
                 "process", name, r, profile, n, counts, n // batch_size,
                 batch_size, pipeline, *rows)
    if pipeline == "device":
      dev = device_lib.DeviceTrainPipeline(
          split.images, split.labels, batch_size=batch_size, seed=seed,
          mesh=mesh, augment=info.train_augment, sampler=sampler)
      return datasets.TrainInput(
          info, counts, n, batch_size, n // batch_size, pipeline, mesh,
          dev.iterate, None, split.subset_record(), groups_note=_RANGE_NOTE,
          _chunks=dev.iterate_chunks)
    local = _array_tfdata(split, batch_size=batch_size, seed=seed,
                          augment=info.train_augment, rows=rows,
                          sampler=sampler)
    return datasets.TrainInput(
        info, counts, n, batch_size, n // batch_size, pipeline, mesh, None,
        local, split.subset_record(), groups_note=_RANGE_NOTE)

  def eval_input(self, *, data_dir, split, batch_size, mesh, rows,
                 imb_factor, profile, selection_seed, options
                 ) -> datasets.EvalInput:
    name, root = self.info.name, _abspath(data_dir)
    if split == "train_lt":
      if imb_factor is None:
        raise ValueError("split='train_lt' needs imb_factor (and the "
                         "profile and selection_seed of the train input).")
      arrays = load_train_lt(name, root,
                             long_tail.check_imb_factor(imb_factor), profile,
                             int(selection_seed),
                             sources.splits_key(options.get("train_splits")))
    else:
      arrays = load_split(name, root, split)
    n = arrays.labels.size
    return datasets.EvalInput(
        self.info, n, batch_size, math.ceil(n / batch_size), mesh,
        datasets.padded_eval_batches(arrays.images, arrays.labels,
                                     batch_size=batch_size, rows=rows))


def make(info: datasets.DatasetInfo) -> InMemory:
  """The registry's constructor for this module."""
  return InMemory(info)
