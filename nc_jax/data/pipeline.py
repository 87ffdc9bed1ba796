"""Train and eval inputs: what the training loop calls.

`make_train_input` returns a `TrainInput` whose `iterate(start_step)` yields
global, mesh-sharded batches {'image': uint8 (B, H, W, C) augmented,
'label': int32 (B,)}. The batch at global step `s` is a pure function of
(seed, s) (see `device.py` for the plan), so a resumed run calling
`iterate(k)` sees exactly the batches an uninterrupted run saw from step k,
whatever the number of processes. Two ways to build the batches:

- "tfdata": each process builds only its own rows of every global batch with
  tf.data (the in-memory datasets: gather from the uint8 subset, crop,
  flip; streamed ones: read, decode, augment), prefetched on host threads,
  then `sharding.to_global` stitches the processes' rows;
- "device": the subset lives on the accelerators and a jitted gather builds
  each batch there (`device.py`); same batches, no host work per step.

Both functions check what is common to every dataset and hand the rest to
the dataset's module (`registry.get_dataset(name)`); a dataset's own settings come
in `options` (`registry.options_of(name, config)`).

`make_eval_input` returns an `EvalInput` whose `iterate()` covers every
image once in fixed order, in global batches with a 'mask' (False on the
padding rows of the last batch).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from jax.sharding import Mesh

from nc_jax import sharding
from nc_jax.data import device as device_lib
from nc_jax.data import long_tail
from nc_jax.data import datasets
from nc_jax.data import registry

PIPELINES = ("tfdata", "device")
SAMPLERS = device_lib.SAMPLERS
EVAL_SPLITS = ("test", "train_lt", "train")
TrainInput = datasets.TrainInput
EvalInput = datasets.EvalInput

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


def check_options(name: str, *, pipeline: str, sampler: str,
                  imb_factor: float, profile: str,
                  options: Mapping[str, Any] | None = None) -> None:
  """The train input's options, checked once for every caller (the config
  validation before any work, and `make_train_input`).

  Raises:
    ValueError: an unknown dataset, pipeline, sampler or profile, or an
      option the dataset cannot honour (an imbalance ratio outside (0, 1],
      the device pipeline for a dataset streamed from disk), naming the
      config field that fixes it.
  """
  dataset = registry.get_dataset(name)  # raises for unknown datasets
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline must be one of {PIPELINES}, got "
                     f"{pipeline!r} (--config.pipeline=...).")
  device_lib.check_sampler(sampler)
  if profile not in long_tail.PROFILES:
    raise ValueError(f"imb_profile must be one of {long_tail.PROFILES}, got "
                     f"{profile!r} (profile= in the config argument).")
  dataset.check_options(pipeline=pipeline, imb_factor=imb_factor,
                        options=dict(options or {}))


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
                     options: Mapping[str, Any] | None = None,
                     _process: tuple[int, int] | None = None) -> TrainInput:
  """The long-tailed training input of dataset `name`.

  Args:
    name: a registry key (`datasets.REGISTRY`).
    data_dir: image-folder tree, tfds data directory, or None for tfds's
      default one (see `sources`; `tfds_prepare.prepare_tfds` downloads there).
    imb_factor: r in (0, 1] (ignored where the dataset's own list is the
      subset: ImageNet-LT).
    profile: "exp" or "step".
    selection_seed: seed of the per-class subsample (reference: 0).
    batch_size: global batch size B, divisible by the mesh size.
    seed: data-order and augmentation seed.
    mesh: the data-parallel mesh.
    pipeline: "tfdata" or "device".
    sampler: "random" (each image once per epoch) or "class_balanced"
      (N draws with replacement, every class equally likely; see
      `device.py`); both pipelines yield the same batches either way.
    options: the dataset's own settings by config field name
      (`registry.options_of`): `train_splits` for the in-memory sets (None:
      the dataset's, e.g. SVHN's train + extra), `imagenet_lt_train_list`
      and `color_jitter` for ImageNet-LT; unset ones take their defaults.
    _process: `(index, count)` to simulate a process (tests only).

  Returns:
    A `TrainInput`.
  """
  options = dict(options or {})
  check_options(name, pipeline=pipeline, sampler=sampler,
                imb_factor=imb_factor, profile=profile, options=options)
  if not 0 <= int(seed) < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
  return registry.get_dataset(name).train_input(
      data_dir=os.fspath(data_dir) if data_dir is not None else None,
      imb_factor=imb_factor, profile=profile, selection_seed=selection_seed,
      batch_size=batch_size, seed=seed, mesh=mesh, pipeline=pipeline,
      sampler=sampler, rows=local_rows(batch_size, mesh, _process),
      options=options)


def make_eval_input(name: str, *,
                    data_dir: str | os.PathLike | None,
                    batch_size: int,
                    mesh: Mesh,
                    split: str = "test",
                    imb_factor: float | None = None,
                    profile: str = "exp",
                    selection_seed: int = 0,
                    options: Mapping[str, Any] | None = None,
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
    imb_factor, profile, selection_seed: the subset for "train_lt".
    options: the dataset's own settings, as for `make_train_input`.
    _process: `(index, count)` to simulate a process (tests only).

  Returns:
    An `EvalInput`.
  """
  dataset = registry.get_dataset(name)
  if split not in EVAL_SPLITS:
    raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}.")
  rows = local_rows(batch_size, mesh, _process)
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  return dataset.eval_input(
      data_dir=data_dir, split=split, batch_size=batch_size, mesh=mesh,
      rows=rows, imb_factor=imb_factor, profile=profile,
      selection_seed=selection_seed, options=dict(options or {}))
