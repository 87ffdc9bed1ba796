"""Data packs: the arrays a run of a small dataset reads, in one `.npz` file.

A pack carries a long-tailed run's data to a machine without the dataset
(a lent GPU that takes at most 64 MiB per call): every split's labels and
example ids in the dataset's canonical order (a few hundred kB), and the
images of only those examples that the packed long-tailed subsets select
(the reference's rule, `in_memory.subset_indices`) plus the whole test
split, as uint8. A pack is a `data_dir` like any other (`sources`: kind
"pack"): the run selects its subset from the packed labels exactly as from
the original, so it trains on the same images in the same order and
`train_subset.json` names the same ids. A selection the pack lacks images
for stops with an error naming the ratios to pack.

The subsets of one profile and selection seed are nested (each class is
shuffled once; a ratio keeps a prefix), so a pack of several ratios holds
the largest one's images. Images are stored with a lossless horizontal
delta filter (each byte minus its left neighbour, modulo 256, as PNG's
"Sub") under the zip's deflate: CIFAR's pixels shrink to about 0.76 of
their size this way, against 0.92 unfiltered (measured on 5,000 CIFAR-10
test images, docs/data.md).

Layout of the `.npz` (all arrays; no pickles):
  meta            uint8 JSON: format, version, dataset, image_shape,
                  class_names, splits {name: {num_examples, canonical}},
                  selections [{imb_factor, profile, selection_seed}]
  <split>.labels  int16 (N,) every label, canonical order
  <split>.ids     uint8 "\\n"-joined example ids, canonical order
  <split>.stored  int32 (n,) ascending canonical positions held
  <split>.images  uint8 (n, H, W, C), delta-filtered along W
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

FORMAT, VERSION = "nc_jax-pack", 1
SUFFIX = ".npz"


def is_pack(path: str | os.PathLike) -> bool:
  """Whether `path` names a file that may be a pack (an existing `.npz`)."""
  return str(path).endswith(SUFFIX) and os.path.isfile(path)


def delta_encode(images: np.ndarray) -> np.ndarray:
  """`(n, H, W, C)` uint8 -> each pixel minus its left neighbour (mod 256)."""
  out = np.array(images, np.uint8, copy=True)
  out[:, :, 1:] -= images[:, :, :-1]
  return out


def delta_decode(filtered: np.ndarray) -> np.ndarray:
  """Inverse of `delta_encode` (a running sum along W, modulo 256)."""
  return np.cumsum(filtered, axis=2, dtype=np.uint8)


def write(path: str | os.PathLike, *, dataset: str, image_shape: Sequence[int],
          class_names: Sequence[str], splits: dict[str, dict[str, Any]],
          selections: Sequence[dict[str, Any]]) -> pathlib.Path:
  """Writes a pack (to a temporary name, renamed into place).

  Args:
    path: the `.npz` file to write.
    dataset: the registry name (`cifar10`, `cifar100`, ...).
    image_shape: `(H, W, C)`.
    class_names: the K names in label order.
    splits: name -> {"labels": `(N,)` ints, "ids": N strings, "canonical":
      bool, "stored": `(n,)` ascending positions, "images": `(n, H, W, C)`
      uint8 (the images at `stored`)}.
    selections: the long-tailed subsets packed (for the record and the
      error message of a run that needs another).

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  if not path.name.endswith(SUFFIX):
    raise ValueError(f"A pack's file name ends in {SUFFIX}, not {path.name}.")
  meta = {"format": FORMAT, "version": VERSION, "dataset": dataset,
          "image_shape": [int(x) for x in image_shape],
          "class_names": list(class_names), "selections": list(selections),
          "splits": {s: {"num_examples": int(len(v["labels"])),
                         "canonical": bool(v.get("canonical", True))}
                     for s, v in splits.items()}}
  arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
  for s, v in splits.items():
    stored = np.asarray(v["stored"], np.int64)
    images = np.asarray(v["images"], np.uint8)
    if images.shape != (stored.size, *image_shape):
      raise ValueError(f"split {s}: {images.shape[0]} images of shape "
                       f"{images.shape[1:]} for {stored.size} positions.")
    if stored.size and (np.any(np.diff(stored) <= 0) or stored[0] < 0
                        or stored[-1] >= len(v["labels"])):
      raise ValueError(f"split {s}: stored positions must ascend within "
                       f"[0, {len(v['labels'])}).")
    arrays[f"{s}.labels"] = np.asarray(v["labels"], np.int16)
    arrays[f"{s}.ids"] = np.frombuffer("\n".join(v["ids"]).encode(),
                                       np.uint8)
    arrays[f"{s}.stored"] = stored.astype(np.int32)
    arrays[f"{s}.images"] = delta_encode(images)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
  try:
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def _key(path: str) -> tuple[str, int, int]:
  st = os.stat(path)
  return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _problem(path: str, what: str) -> ValueError:
  return ValueError(f"data_dir {path} is not a readable nc_jax data pack "
                    f"({what}). Write it again with benchmarks/pack_data.py, "
                    "or pass the dataset itself.")


@functools.lru_cache(maxsize=8)
def _meta(key: tuple[str, int, int]) -> dict[str, Any]:
  path = key[0]
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(z["meta"].tobytes().decode())
  except (OSError, ValueError, KeyError) as e:
    raise _problem(path, f"{type(e).__name__}: {e}") from None
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise _problem(path, f"format {meta.get('format')!r} version "
                   f"{meta.get('version')!r}, not {FORMAT!r} {VERSION}")
  return meta


def meta(path: str) -> dict[str, Any]:
  """The pack's JSON header (cached per file version)."""
  return _meta(_key(path))


def check_pack(path: str, dataset: str) -> dict[str, Any]:
  """The pack's header, after checking it is a pack of `dataset`.

  Raises:
    ValueError: not a pack, or one of another dataset (naming the fix).
  """
  m = meta(path)
  if m["dataset"] != dataset:
    raise ValueError(
        f"data_dir {path} is a pack of {m['dataset']!r}, not {dataset!r}: "
        f"train a {m['dataset']} config on it, or pack {dataset}.")
  return m


@functools.lru_cache(maxsize=16)
def _index(key: tuple[str, int, int], split: str
           ) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
  path = key[0]
  if split not in _meta(key)["splits"]:
    raise ValueError(f"data_dir {path} (a pack) has no {split!r} split; it "
                     f"holds {sorted(_meta(key)['splits'])}.")
  with np.load(path, allow_pickle=False) as z:
    labels = z[f"{split}.labels"].astype(np.int64)
    ids = tuple(z[f"{split}.ids"].tobytes().decode().split("\n"))
    stored = z[f"{split}.stored"].astype(np.int64)
  if len(ids) != labels.size:
    raise _problem(path, f"{split}: {len(ids)} ids for {labels.size} labels")
  return labels, ids, stored


def read_split_index(path: str, split: str
                ) -> tuple[np.ndarray, tuple[str, ...], bool]:
  """`(labels (N,) int64, ids, canonical)` of a packed split, canonical
  order."""
  labels, ids, _ = _index(_key(path), split)
  return labels, ids, bool(meta(path)["splits"][split]["canonical"])


def images(path: str, split: str, indices: np.ndarray | None = None
           ) -> np.ndarray:
  """The images at canonical positions `indices` (None: all), in that
  order, `(n, H, W, C)` uint8.

  Raises:
    ValueError: the pack does not hold some of them (naming the ratios it
      was packed for and how to pack the ones needed).
  """
  labels, _, stored = _index(_key(path), split)
  want = (np.arange(labels.size) if indices is None
          else np.asarray(indices, np.int64))
  pos = np.searchsorted(stored, want)
  held = (pos < stored.size) & (stored[np.minimum(pos, stored.size - 1)]
                                == want) if stored.size else np.zeros(
                                    want.shape, bool)
  if not np.all(held):
    packed = ", ".join(f"imb_factor={s['imb_factor']:g} ({s['profile']}, "
                       f"selection seed {s['selection_seed']})"
                       for s in meta(path)["selections"]) or "none"
    raise ValueError(
        f"data_dir {path} (a pack) lacks {int(np.sum(~held))} of the "
        f"{want.size} {split} images this run reads: it holds the subsets "
        f"{packed}. Pack the run's imb_factor, imb_profile and "
        "selection_seed (benchmarks/pack_data.py --imb_factors ...), or "
        "pass the dataset itself.")
  with np.load(path, allow_pickle=False) as z:
    filtered = z[f"{split}.images"]
  return delta_decode(filtered[pos])
