"""The dataset registry and the one interface every dataset implements.

A dataset is one registry entry (`REGISTRY`: its static `DatasetInfo`, and
the module that implements it) and one module whose `make(info)` returns a
`Dataset`. The rest of the system asks `registry.get_dataset(name)` and
never names a dataset:

    dataset = get_dataset("cifar10")
    train = dataset.train_input(data_dir=..., imb_factor=0.01, ...,
                                options={"train_splits": None})
    test = dataset.eval_input(data_dir=..., split="test", ...)

Two kinds implement it today: `in_memory` (CIFAR-10/100, SVHN, STL-10:
decoded once into uint8 arrays, augmented by tf.data or on the devices) and
`imagenet_lt` (streamed from disk, its subset given by a list). A dataset's
own settings (ImageNet-LT's list and colour jitter, SVHN's extra split) are
config fields that the dataset names in `Dataset.options`; the data layer
hands it those fields and nothing else reads them.

This module imports neither TensorFlow nor any implementation, not even
by name: `registry.get_dataset` loads a dataset's module on first use, so
the small datasets run on a host without TensorFlow (image folders with
the device pipeline) and asking for a dataset's `DatasetInfo` costs
nothing. What the implementations share
(the `data_dir` forms, their checks and class names) is `sources`, which
imports this module, never the other way round.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from nc_jax import sharding
from nc_jax.data import long_tail

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a dataset (its registry entry).

  Attributes:
    name: registry key.
    num_classes: K.
    image_shape: `(H, W, C)` of the images the pipelines yield.
    mean, std: per-channel normalisation constants on the 0-1 scale (the
      train step normalises on device).
    train_augment: "crop_flip" (pad 4, random crop, horizontal flip),
      "none", or "imagenet" (random resized crop + flip).
    class_groups: head/medium/tail -> class indices (empty where they come
      from the data: ImageNet-LT fills them in from its train list).
    tfds_name: the tfds builder name.
    train_splits: source splits that are subsampled and concatenated.
    test_split: the source split used as the test set.
    module: the module implementing the dataset (its `make(info)` returns
      the `Dataset`).
    streamed: read from disk batch by batch (images of any size) rather
      than decoded into memory once; such a dataset has no device pipeline.
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
  module: str = "nc_jax.data.in_memory"
  streamed: bool = False


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
        "imagenet", {}, tfds_name="imagenet2012", test_split="validation",
        module="nc_jax.data.imagenet_lt", streamed=True),
    # Groups only for the long-tailed variant (imb_factor < 1).
    "cub200": DatasetInfo(
        "cub200", 200, (224, 224, 3), IMAGENET_MEAN, IMAGENET_STD,
        "imagenet", {}, tfds_name="caltech_birds2011",
        module="nc_jax.data.cub", streamed=True),
}


def dataset_info(name: str) -> DatasetInfo:
  """The registry entry for `name`; ValueError listing the valid names."""
  try:
    return REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"Unknown dataset {name!r}; valid names are "
                     f"{sorted(REGISTRY)}.") from None


# ------------------------------------------------------------ the inputs


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
  info: DatasetInfo
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
  _chunks: Callable[[Iterable[tuple[int, int]]], Iterator[Batch]] | None = (
      None)

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

  def iterate_chunks(self, chunks: Iterable[tuple[int, int]]
                     ) -> Iterator[dict[str, jax.Array]]:
    """k consecutive global batches at a time, stacked, for a training loop
    that runs several steps per dispatch (`nc_jax.dispatch`).

    Args:
      chunks: consecutive `(first step, length)` pairs, e.g.
        `dispatch.plan(...)`; each chunk starts where the one before ended.

    Yields:
      {'image': uint8 `(length, B, H, W, C)`, 'label': int32
      `(length, B)`}: the batches `iterate(first)` yields next, stacked,
      split over the mesh's data axis along B. The device pipeline builds
      each stack in one jitted call; tf.data's batches are stacked on the
      host (`length` batches of host memory at a time).
    """
    chunks = list(chunks)
    if self._chunks is not None:
      yield from self._chunks(chunks)
      return
    if not chunks:
      return
    local = self.iterate_local(chunks[0][0])
    expected = chunks[0][0]
    for first, length in chunks:
      if first != expected:
        raise ValueError(f"Chunks must be consecutive: one starts at step "
                         f"{first}, after one that ended at {expected}.")
      rows = [next(local) for _ in range(length)]
      expected = first + length
      yield sharding.to_global_stacked(
          {k: np.stack([r[k] for r in rows]) for k in rows[0]}, self.mesh)

  def iterate_local(self, start_step: int = 0) -> Iterator[Batch]:
    """This process's rows of each global batch, as numpy (tf.data only)."""
    if self._local is None:
      raise ValueError("iterate_local needs pipeline='tfdata'; the device "
                       "pipeline builds whole global batches on device.")
    return self._local(int(start_step))


@dataclasses.dataclass
class EvalInput:
  """Every image of a split once, in fixed order, in padded global batches.

  Attributes:
    info: the dataset's `DatasetInfo`.
    num_examples: images in the split.
    batch_size: global batch size B.
    num_batches: ceil(num_examples / B).
  """
  info: DatasetInfo
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


# ------------------------------------------------------------ interface


class Dataset(abc.ABC):
  """What a dataset module provides (`make(info)` returns one).

  `rows` is the `[start, stop)` slice of every global batch that this
  process builds (`pipeline.local_rows`); `options` holds the values of the
  config fields named in `options` (None where unset).
  """

  #: The config fields this dataset reads beyond the common ones.
  options: tuple[str, ...] = ()

  def __init__(self, info: DatasetInfo):
    self.info = info

  @abc.abstractmethod
  def check_options(self, *, pipeline: str, imb_factor: float,
                    options: Mapping[str, Any]) -> None:
    """Raises ValueError for options this dataset cannot honour, naming the
    config field that fixes it (cheap: reads no data)."""

  @abc.abstractmethod
  def check_data(self, data_dir: str | None,
                 options: Mapping[str, Any]) -> None:
    """Cheap checks of what `data_dir` holds, before any work (for a
    `data_dir` in one of `sources`' forms, `sources.check_dataset_data`).

    Raises:
      ValueError, FileNotFoundError: naming the problem and the fix.
    """

  @abc.abstractmethod
  def class_names(self, data_dir: str | None) -> tuple[str, ...]:
    """The K class names, in label order (`sources.dataset_class_names`
    for `sources`' forms)."""

  @abc.abstractmethod
  def train_input(self, *, data_dir: str | None, imb_factor: float,
                  profile: str, selection_seed: int, batch_size: int,
                  seed: int, mesh: Mesh, pipeline: str, sampler: str,
                  rows: tuple[int, int], options: Mapping[str, Any]
                  ) -> TrainInput:
    """The long-tailed training input (see `pipeline.make_train_input`)."""

  @abc.abstractmethod
  def eval_input(self, *, data_dir: str | None, split: str, batch_size: int,
                 mesh: Mesh, rows: tuple[int, int], imb_factor: float | None,
                 profile: str, selection_seed: int,
                 options: Mapping[str, Any]) -> EvalInput:
    """Every image of `split` once (see `pipeline.make_eval_input`)."""


def padded_eval_batches(images: np.ndarray, labels: np.ndarray, *,
                        batch_size: int, rows: tuple[int, int]
                        ) -> Callable[[], Iterator[Batch]]:
  """`() -> iterator` of this process's rows of padded global eval batches
  over in-memory arrays (mask False on the padding)."""
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
