"""Long-tailed class counts and the seeded per-class selection.

Follows the reference code (MiSLAS' `IMBALANCECIFAR10`, reused by the
paper's repository for CIFAR-10/100, SVHN and STL-10):

- exponential profile: `n_c = int(n_max * r ** (c / (K - 1)))`;
- step profile: the first `K // 2` classes keep `n_max`, the rest get
  `int(n_max * r)`;
- selection: per class, in class order, shuffle that class's indices with a
  `RandomState` seeded once (the reference calls `np.random.seed(0)` and then
  `np.random.shuffle` per class, which is the same stream) and keep the first
  `n_c`.

Everything here is plain numpy on label arrays: no images, no TensorFlow, no
JAX, so it is cheap and identical on every process.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

PROFILES = ("exp", "step")


def check_imb_factor(imb_factor: float) -> float:
  """Returns `imb_factor` as a float, or raises if it is not in (0, 1]."""
  try:
    r = float(imb_factor)
  except (TypeError, ValueError):
    r = math.nan
  if not 0.0 < r <= 1.0:  # also False for nan
    raise ValueError(
        f"imb_factor={imb_factor!r} is outside (0, 1]: it is n_min / n_max "
        "(0.01 means a 100:1 imbalance, 1 means balanced). Pass e.g. "
        "imb=0.01 in the config argument.")
  return r


def long_tail_counts(num_per_class: float,
                     imb_factor: float,
                     *,
                     num_classes: int,
                     profile: str = "exp") -> list[int]:
  """Per-class image counts of a long-tailed subset (class 0 is the head).

  Args:
    num_per_class: n_max, the size of the balanced split divided by the
      number of classes (a float is allowed, as in the reference's
      `len(data) / K`, e.g. 7325.7 for SVHN's train split).
    imb_factor: r = n_min / n_max in (0, 1]; 1 gives the balanced counts.
    num_classes: K >= 1.
    profile: "exp" (exponential decay) or "step" (two levels).

  Returns:
    K integers, truncated towards zero like the reference's `int(...)`.
  """
  r = check_imb_factor(imb_factor)
  if profile not in PROFILES:
    raise ValueError(f"Unknown imbalance profile {profile!r}; valid profiles "
                     f"are {PROFILES}.")
  k = int(num_classes)
  if k < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
  n_max = float(num_per_class)
  if profile == "exp":
    if k == 1:
      return [int(n_max)]
    # Same operation order as the reference so the truncation agrees.
    return [int(n_max * (r ** (c / (k - 1.0)))) for c in range(k)]
  head = k // 2
  # The reference appends K // 2 tail classes, which loses one class for odd
  # K; here every class after the head half is a tail class.
  return [int(n_max)] * head + [int(n_max * r)] * (k - head)


def select_long_tail(labels: np.ndarray,
                     counts: Sequence[int],
                     *,
                     seed: int = 0) -> tuple[np.ndarray, list[int]]:
  """Seeded per-class subsample of a labelled split.

  Args:
    labels: `(N,)` integer labels of the split, in the source's fixed order.
    counts: K requested per-class counts (from `long_tail_counts`).
    seed: selection seed; the reference uses 0.

  Returns:
    `(indices, actual)`: `indices` `(sum(actual),)` int64 positions into
    `labels`, sorted ascending (the subset keeps the source order), and
    `actual` the K per-class counts kept, `min(requested, available)` (the
    reference silently keeps fewer when a class is short, as in SVHN, whose
    classes are not balanced).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
  k = len(counts)
  if labels.size and (labels.min() < 0 or labels.max() >= k):
    raise ValueError(f"labels must lie in [0, {k}); got range "
                     f"[{labels.min()}, {labels.max()}].")
  rng = np.random.RandomState(seed)
  chosen, actual = [], []
  for c in range(k):
    idx = np.flatnonzero(labels == c)
    # Shuffle even empty classes: it does not draw from the stream, exactly
    # like the reference, so later classes see the same random numbers.
    rng.shuffle(idx)
    keep = idx[:max(int(counts[c]), 0)]
    chosen.append(keep)
    actual.append(int(keep.size))
  indices = np.sort(np.concatenate(chosen)).astype(np.int64)
  return indices, actual


def class_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
  """Per-class counts of `labels` as a list of K ints."""
  return [int(x) for x in np.bincount(np.asarray(labels, np.int64),
                                      minlength=num_classes)[:num_classes]]


def groups_by_count(counts: Sequence[int],
                    *,
                    many: int = 100,
                    few: int = 20) -> dict[str, tuple[int, ...]]:
  """Head / medium / tail classes by training count (the ImageNet-LT rule).

  Args:
    counts: K per-class training counts.
    many: classes with more than `many` images are "head" ("many-shot").
    few: classes with fewer than `few` images are "tail" ("few-shot"); the
      rest (`few <= n <= many`) are "medium".

  Returns:
    dict head/medium/tail -> ascending tuple of class indices.
  """
  out: dict[str, list[int]] = {"head": [], "medium": [], "tail": []}
  for c, n in enumerate(counts):
    out["head" if n > many else "tail" if n < few else "medium"].append(c)
  return {k: tuple(v) for k, v in out.items()}


def groups_by_ranges(ranges: Mapping[str, tuple[int, int]]
                     ) -> dict[str, tuple[int, ...]]:
  """Group dict from inclusive index ranges, e.g. {"head": (0, 2), ...}."""
  return {k: tuple(range(lo, hi + 1)) for k, (lo, hi) in ranges.items()}
