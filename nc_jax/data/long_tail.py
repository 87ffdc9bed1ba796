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
Groups = dict[str, tuple[int, ...]]


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


# ------------------------------------------------------------- class groups

# The reference's head / medium / tail: half-open ranges of ranks by
# descending train count (`config/imagenet/Res50_imagenetLT*.yaml`
# head/med/tail_class_idx, used as `acc_classes[lo:hi]` in `train.py`).
REFERENCE_RANK_RANGES: tuple[tuple[str, int, int], ...] = (
    ("head", 0, 390), ("medium", 390, 835), ("tail", 835, 1000))
TIES = ("reference", "stable")


def _heapsort(v: list[int], t: list[int], lo: int, n: int) -> None:
  """numpy's `aheapsort_`: sorts `t[lo:lo + n]` in place by the keys `v`."""
  def sift(i: int, n: int, tmp: int) -> None:
    # 1-based heap: node i is t[lo + i - 1].
    j = 2 * i
    while j <= n:
      if j < n and v[t[lo + j - 1]] < v[t[lo + j]]:
        j += 1
      if v[tmp] < v[t[lo + j - 1]]:
        t[lo + i - 1] = t[lo + j - 1]
        i, j = j, 2 * j
      else:
        break
    t[lo + i - 1] = tmp
  for l in range(n >> 1, 0, -1):
    sift(l, n, t[lo + l - 1])
  while n > 1:
    tmp = t[lo + n - 1]
    t[lo + n - 1] = t[lo]
    n -= 1
    sift(1, n, tmp)


def _introsort_argsort(keys: Sequence[int]) -> list[int]:
  """numpy's classic `argsort(kind="quicksort")` (introsort), in Python.

  The reference ranks classes with `np.argsort(-counts)`, whose order among
  equal counts is whatever this unstable sort leaves. numpy < 1.25 ran it on
  every CPU; later numpy versions dispatch 64-bit argsorts to SIMD sorts
  (x86-simd-sort, Highway) whose tie order depends on the CPU, so the
  reference's own code no longer gives one answer. This is that classic
  algorithm (`npysort/quicksort.cpp` `aquicksort_`: median-of-three
  partitions while a range holds more than 16 items, insertion sort below,
  heapsort past a depth of 2 * floor(log2 n)), step for step, so the ranks
  are the same on every machine and equal numpy 1.24's.

  Args:
    keys: integers to sort ascending.

  Returns:
    The permutation as a list of indices.
  """
  v = [int(x) for x in keys]
  t = list(range(len(v)))
  if len(v) < 2:
    return t
  stack: list[tuple[int, int, int]] = []
  pl, pr = 0, len(v) - 1
  depth = 2 * (len(v).bit_length() - 1)
  while True:
    if depth < 0:
      _heapsort(v, t, pl, pr - pl + 1)
    else:
      while pr - pl > 15:
        pm = pl + ((pr - pl) >> 1)
        if v[t[pm]] < v[t[pl]]:
          t[pm], t[pl] = t[pl], t[pm]
        if v[t[pr]] < v[t[pm]]:
          t[pr], t[pm] = t[pm], t[pr]
        if v[t[pm]] < v[t[pl]]:
          t[pm], t[pl] = t[pl], t[pm]
        vp = v[t[pm]]
        pi, pj = pl, pr - 1
        t[pm], t[pj] = t[pj], t[pm]
        while True:
          pi += 1
          while v[t[pi]] < vp:
            pi += 1
          pj -= 1
          while vp < v[t[pj]]:
            pj -= 1
          if pi >= pj:
            break
          t[pi], t[pj] = t[pj], t[pi]
        t[pi], t[pr - 1] = t[pr - 1], t[pi]
        depth -= 1
        # Defer the larger side, continue with the smaller.
        if pi - pl < pr - pi:
          stack.append((pi + 1, pr, depth))
          pr = pi - 1
        else:
          stack.append((pl, pi - 1, depth))
          pl = pi + 1
      for i in range(pl + 1, pr + 1):
        ti, j = t[i], i
        while j > pl and v[ti] < v[t[j - 1]]:
          t[j] = t[j - 1]
          j -= 1
        t[j] = ti
    if not stack:
      return t
    pl, pr, depth = stack.pop()


def rank_by_count(counts: Sequence[int], *, ties: str = "reference"
                  ) -> np.ndarray:
  """Original class indices by descending train count.

  Args:
    counts: K per-class train counts.
    ties: order among equal counts: "reference" (the reference's
      `np.argsort(-counts)` as numpy < 1.25 computes it, see
      `_introsort_argsort`) or "stable" (ascending class index).

  Returns:
    `(K,)` int64 `order`: `order[r]` is the class of rank r (the reference
    relabels class `order[r]` as r).
  """
  neg = [-int(c) for c in counts]
  if ties == "reference":
    return np.asarray(_introsort_argsort(neg), np.int64)
  if ties == "stable":
    return np.argsort(np.asarray(neg, np.int64), kind="stable")
  raise ValueError(f"ties must be one of {TIES}, got {ties!r}.")


def groups_by_rank(counts: Sequence[int],
                   ranges: Sequence[tuple[str, int, int]] = (
                       REFERENCE_RANK_RANGES),
                   *, ties: str = "reference") -> Groups:
  """The reference's groups: rank ranges as sets of original labels.

  Args:
    counts: K per-class train counts.
    ranges: `(name, lo, hi)` half-open rank ranges that tile [0, K).
    ties: see `rank_by_count`.

  Returns:
    dict name -> ascending tuple of original class indices.
  """
  k = len(counts)
  edges = [0] + [hi for _, _, hi in ranges]
  if [lo for _, lo, _ in ranges] != edges[:-1] or edges[-1] != k or any(
      hi < lo for _, lo, hi in ranges):
    raise ValueError(f"Rank ranges {ranges} must tile [0, {k}) in order.")
  order = rank_by_count(counts, ties=ties)
  return {name: tuple(sorted(int(c) for c in order[lo:hi]))
          for name, lo, hi in ranges}


def class_groupings(counts: Sequence[int], *, ties: str = "reference",
                    many: int = 100, few: int = 20
                    ) -> dict[str, Groups]:
  """Both ImageNet-LT groupings from the per-class train counts.

  Args:
    counts: the 1000 per-class train counts (original labels).
    ties: order among equal counts for the rank split (`rank_by_count`).
    many, few: the count thresholds of the literature's split.

  Returns:
    {"by_rank": the reference's head/medium/tail (ranks [0, 390),
    [390, 835), [835, 1000) by descending count), "by_count": the
    literature's many/medium/few (> many, many..few, < few images), stored
    under head/medium/tail}; each group an ascending tuple of original class
    indices.
  """
  return {"by_rank": groups_by_rank(counts, ties=ties),
          "by_count": groups_by_count(counts, many=many, few=few)}
