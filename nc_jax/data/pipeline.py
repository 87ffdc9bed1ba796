"""Train and eval inputs: what the training loop calls.

`make_train_input` returns a `TrainInput` whose `iterate(start_step)` yields
global, mesh-sharded batches {'image': uint8 (B, H, W, C) augmented,
'label': int32 (B,)}. The batch at global step `s` is a pure function of
(seed, s) (see `device.py` for the plan), so a resumed run calling
`iterate(k)` sees exactly the batches an uninterrupted run saw from step k,
whatever the number of processes. Two ways to build the batches:

- "tfdata": each process builds only its own rows of every global batch with
  tf.data (gather from the in-memory uint8 subset, crop, flip), prefetched on
  host threads, then `sharding.to_global` stitches the processes' rows;
  ImageNet-LT streams from disk instead (`imagenet_lt.py`).
- "device": the subset lives on the accelerators and a jitted gather builds
  each batch there (`device.py`); same batches, no host work per step.

`make_eval_input` returns an `EvalInput` whose `iterate()` covers every
image once in fixed order, in global batches with a 'mask' (False on the
padding rows of the last batch).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh

from nc_jax import sharding
from nc_jax.data import device as device_lib
from nc_jax.data import long_tail
from nc_jax.data import sources

PIPELINES = ("tfdata", "device")
SAMPLERS = device_lib.SAMPLERS
EVAL_SPLITS = ("test", "train_lt", "train")

Batch = dict[str, Any]


def local_rows(batch_size: int, mesh: Mesh,
               process: tuple[int, int] | None = None) -> tuple[int, int]:
  """`[start, stop)` rows of a global batch that this process supplies.

  Args:
    batch_size: global batch size B (divisible by the mesh size).
    mesh: the data-parallel mesh; its device order decides which rows live
      on this process's devices.
    process: `(index, count)` to simulate one of several processes (tests);
      rows are then the index-th of `count` equal slices.

  Returns:
    `(start, stop)` with `stop - start == B / process_count`.
  """
  sharding.check_batch_size(batch_size, mesh)
  if process is not None:
    index, count = process
    if batch_size % count:
      raise ValueError(f"batch_size={batch_size} does not split over "
                       f"{count} processes.")
    per = batch_size // count
    return index * per, (index + 1) * per
  spans = sorted(
      (s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
      for s in sharding.batch_sharding(mesh).addressable_devices_indices_map(
          (batch_size,)).values())
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in set(spans)) != stop - start:
    raise ValueError("This process's devices do not hold one contiguous "
                     "slice of the batch; order the mesh by process.")
  return start, stop


# ---------------------------------------------------------------- train


@dataclasses.dataclass
class TrainInput:
  """Long-tailed training input.

  Attributes:
    info: the dataset's `DatasetInfo` (ImageNet-LT: groups from the list).
    counts: K per-class image counts of the selected subset.
    num_examples: sum(counts).
    batch_size: global batch size B.
    steps_per_epoch: num_examples // B (the remainder is dropped).
    pipeline: "tfdata" or "device".
    subset: which images were selected, `{"classes": [...], "images":
      [[ids of class 0], ...]}` (what `train_subset.json` holds), or None
      for streamed sets (ImageNet-LT: its list is the subset).
    extra_groups: further class groups reported beside `info.class_groups`
      (ImageNet-LT: the literature's many_shot / medium_shot / few_shot).
    groups_note: how the groups were formed, for results.json.
  """
  info: sources.DatasetInfo
  counts: list[int]
  num_examples: int
  batch_size: int
  steps_per_epoch: int
  pipeline: str
  mesh: Mesh
  _global: Callable[[int], Iterator[Batch]] | None = None
  _local: Callable[[int], Iterator[Batch]] | None = None
  subset: dict | None = None
  extra_groups: dict[str, tuple[int, ...]] = dataclasses.field(
      default_factory=dict)
  groups_note: str = ""

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Endless global batches from global step `start_step` on.

    Yields:
      {'image': uint8 `(B, H, W, C)`, 'label': int32 `(B,)`} as jax.Arrays
      sharded over the mesh's data axis.
    """
    if self._global is not None:
      yield from self._global(int(start_step))
      return
    for batch in self._local(int(start_step)):
      yield sharding.to_global(batch, self.mesh)

  def iterate_local(self, start_step: int = 0) -> Iterator[Batch]:
    """This process's rows of each global batch, as numpy (tf.data only)."""
    if self._local is None:
      raise ValueError("iterate_local needs pipeline='tfdata'; the device "
                       "pipeline builds whole global batches on device.")
    return self._local(int(start_step))


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


def _array_tfdata(split: sources.ArraySplit, *, batch_size: int, seed: int,
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


def check_options(name: str, *, pipeline: str, sampler: str,
                  imb_factor: float, profile: str) -> None:
  """The train input's options, checked once for every caller (the config
  validation before any work, and `make_train_input`).

  Raises:
    ValueError: an unknown dataset, pipeline, sampler or profile, an
      imbalance ratio outside (0, 1], or the device pipeline for a dataset
      streamed from disk; naming the config field that fixes it.
  """
  sources.dataset_info(name)  # raises for unknown datasets
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline must be one of {PIPELINES}, got "
                     f"{pipeline!r} (--config.pipeline=...).")
  device_lib.check_sampler(sampler)
  if profile not in long_tail.PROFILES:
    raise ValueError(f"imb_profile must be one of {long_tail.PROFILES}, got "
                     f"{profile!r} (profile= in the config argument).")
  if name not in sources.IN_MEMORY:
    if pipeline == "device":
      raise ValueError(
          f"{name!r} is streamed from disk; pipeline='device' holds the "
          f"train set on the accelerator and supports only "
          f"{sources.IN_MEMORY}. Pass --config.pipeline=tfdata.")
    return
  long_tail.check_imb_factor(imb_factor)


def make_train_input(name: str, *,
                     data_dir: str | os.PathLike | None,
                     imb_factor: float,
                     profile: str = "exp",
                     selection_seed: int = 0,
                     batch_size: int,
                     seed: int,
                     mesh: Mesh,
                     pipeline: str = "tfdata",
                     sampler: str = "random",
                     imagenet_lt_train_list: str | None = None,
                     train_splits: tuple[str, ...] | None = None,
                     color_jitter: float = 0.4,
                     _process: tuple[int, int] | None = None) -> TrainInput:
  """The long-tailed training input of dataset `name`.

  Args:
    name: a registry key (`sources.REGISTRY`).
    data_dir: image-folder tree, tfds data directory, or None for tfds's
      default one (see `sources`; `sources.prepare_tfds` downloads there).
    imb_factor: r in (0, 1] (ignored for ImageNet-LT: its list is the
      subset).
    profile: "exp" or "step".
    selection_seed: seed of the per-class subsample (reference: 0).
    batch_size: global batch size B, divisible by the mesh size.
    seed: data-order and augmentation seed.
    mesh: the data-parallel mesh.
    pipeline: "tfdata" or "device".
    sampler: "random" (each image once per epoch) or "class_balanced"
      (N draws with replacement, every class equally likely; see
      `device.py`); both pipelines yield the same batches either way.
    imagenet_lt_train_list: path of ImageNet_LT_train.txt (ImageNet-LT).
    train_splits: source splits to subsample (None: the dataset's, e.g.
      SVHN's train + extra).
    color_jitter: ImageNet-LT's ColorJitter strength (brightness, contrast,
      saturation; 0 = off).
    _process: `(index, count)` to simulate a process (tests only).

  Returns:
    A `TrainInput`.
  """
  info = sources.dataset_info(name)
  check_options(name, pipeline=pipeline, sampler=sampler,
                imb_factor=imb_factor, profile=profile)
  if not 0 <= int(seed) < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
  rows = local_rows(batch_size, mesh, _process)
  data_dir = os.fspath(data_dir) if data_dir is not None else None

  if name not in sources.IN_MEMORY:
    from nc_jax.data import imagenet_lt  # pylint: disable=g-import-not-at-top
    stream = imagenet_lt.make_train_stream(
        info, data_dir=data_dir, train_list=imagenet_lt_train_list,
        batch_size=batch_size, seed=seed, rows=rows,
        color_jitter=color_jitter, sampler=sampler)
    by_count = stream.class_groups_by_count
    return TrainInput(
        stream.info, stream.counts, stream.num_examples, batch_size,
        stream.num_examples // batch_size, pipeline, mesh, None,
        stream.iterate_local,
        extra_groups={"many_shot": by_count["head"],
                      "medium_shot": by_count["medium"],
                      "few_shot": by_count["tail"]},
        groups_note=(
            "head/medium/tail: the reference's ranks 0-390 / 390-835 / "
            "835-1000 of the classes sorted by descending train count; "
            "many_shot/medium_shot/few_shot: > 100, 20-100, < 20 train "
            "images (the literature's split)"))

  r = long_tail.check_imb_factor(imb_factor)
  sources.check_data_dir(name, data_dir)
  split = sources.load_train_lt(name, _abspath(data_dir), r, profile,
                                int(selection_seed),
                                _splits_key(train_splits))
  n = split.labels.size
  if n < batch_size:
    raise ValueError(f"{name}-LT r={r} has {n} images, fewer than one batch "
                     f"of {batch_size}. Lower --config.batch_size (to at most "
                     f"{n}) or raise imb_factor.")
  counts = list(split.counts)
  logging.info("train input %s-LT r=%s (%s): %d images, per class %s; %d "
               "steps/epoch of %d, pipeline %s, rows [%d, %d) on this "
               "process", name, r, profile, n, counts, n // batch_size,
               batch_size, pipeline, *rows)
  if pipeline == "device":
    dev = device_lib.DeviceTrainPipeline(
        split.images, split.labels, batch_size=batch_size, seed=seed,
        mesh=mesh, augment=info.train_augment, sampler=sampler)
    return TrainInput(info, counts, n, batch_size, n // batch_size, pipeline,
                      mesh, dev.iterate, None, split.subset_record(),
                      groups_note=_RANGE_NOTE)
  local = _array_tfdata(split, batch_size=batch_size, seed=seed,
                        augment=info.train_augment, rows=rows,
                        sampler=sampler)
  return TrainInput(info, counts, n, batch_size, n // batch_size, pipeline,
                    mesh, None, local, split.subset_record(),
                    groups_note=_RANGE_NOTE)


_RANGE_NOTE = ("head/medium/tail: fixed class-index ranges of the reference "
               "configs (10 classes: 0-2 / 3-6 / 7-9; CIFAR-100: 0-35 / "
               "36-70 / 71-99)")


def _abspath(data_dir: str | None) -> str | None:
  """An absolute data_dir; None (tfds's default data directory) stays."""
  return None if data_dir is None else os.path.abspath(data_dir)


def _splits_key(train_splits) -> tuple[str, ...] | None:
  """None, a tuple or a comma string of split names -> a hashable key."""
  if not train_splits:
    return None
  if isinstance(train_splits, str):
    train_splits = train_splits.split(",")
  return tuple(s.strip() for s in train_splits if s.strip()) or None


# ----------------------------------------------------------------- eval


@dataclasses.dataclass
class EvalInput:
  """Every image of a split once, in fixed order, in padded global batches.

  Attributes:
    info: the dataset's `DatasetInfo`.
    num_examples: images in the split.
    batch_size: global batch size B.
    num_batches: ceil(num_examples / B).
  """
  info: sources.DatasetInfo
  num_examples: int
  batch_size: int
  num_batches: int
  mesh: Mesh
  _local: Callable[[], Iterator[Batch]]

  def iterate(self) -> Iterator[dict[str, jax.Array]]:
    """Global batches {'image': uint8 (B,H,W,C), 'label': int32 (B,),
    'mask': bool (B,)}; mask is False on the padding of the last batch."""
    for batch in self._local():
      yield sharding.to_global(batch, self.mesh)

  def iterate_local(self) -> Iterator[Batch]:
    """This process's rows of each global batch, as numpy."""
    return self._local()


def _array_eval(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                rows: tuple[int, int]) -> Callable[[], Iterator[Batch]]:
  n = labels.size

  def local() -> Iterator[Batch]:
    for start in range(0, n, batch_size):
      pos = np.arange(start + rows[0], start + rows[1])
      mask = pos < n
      src = np.where(mask, pos, 0)
      image = images[src]
      image[~mask] = 0
      yield {"image": image, "label": np.where(mask, labels[src], 0).astype(
          np.int32), "mask": mask}
  return local


def make_eval_input(name: str, *,
                    data_dir: str | os.PathLike | None,
                    batch_size: int,
                    mesh: Mesh,
                    split: str = "test",
                    imb_factor: float | None = None,
                    profile: str = "exp",
                    selection_seed: int = 0,
                    imagenet_lt_train_list: str | None = None,
                    train_splits: tuple[str, ...] | None = None,
                    _process: tuple[int, int] | None = None) -> EvalInput:
  """Evaluation input over a whole split.

  Args:
    name: a registry key.
    data_dir: image-folder tree, tfds data directory, or None (tfds's).
    batch_size: global batch size, divisible by the mesh size.
    mesh: the data-parallel mesh.
    split: "test" (the official test set), "train_lt" (the long-tailed
      train subset, unaugmented, for neural-collapse metrics; needs
      `imb_factor`), or "train" (the whole train split).
    imb_factor, profile, selection_seed, train_splits: the subset for
      "train_lt".
    imagenet_lt_train_list: ImageNet-LT's list for "train_lt".
    _process: `(index, count)` to simulate a process (tests only).

  Returns:
    An `EvalInput`.
  """
  info = sources.dataset_info(name)
  if split not in EVAL_SPLITS:
    raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}.")
  rows = local_rows(batch_size, mesh, _process)
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  sources.check_data_dir(name, data_dir)

  if name not in sources.IN_MEMORY:
    from nc_jax.data import imagenet_lt  # pylint: disable=g-import-not-at-top
    stream = imagenet_lt.make_eval_stream(
        info, data_dir=data_dir, split=split, batch_size=batch_size,
        rows=rows, train_list=imagenet_lt_train_list)
    return EvalInput(info, stream.num_examples, batch_size,
                     math.ceil(stream.num_examples / batch_size), mesh,
                     stream.iterate_local)

  root = _abspath(data_dir)
  if split == "train_lt":
    if imb_factor is None:
      raise ValueError("split='train_lt' needs imb_factor (and the profile "
                       "and selection_seed of the train input).")
    arrays = sources.load_train_lt(name, root,
                                   long_tail.check_imb_factor(imb_factor),
                                   profile, int(selection_seed),
                                   _splits_key(train_splits))
  else:
    arrays = sources.load_split(name, root, split)
  n = arrays.labels.size
  return EvalInput(info, n, batch_size, math.ceil(n / batch_size), mesh,
                   _array_eval(arrays.images, arrays.labels,
                               batch_size=batch_size, rows=rows))
