"""Packing a dataset: the arrays its runs read, from its `data_dir`.

`pack_dataset` reads any `data_dir` form of a small dataset (`sources`),
selects the long-tailed subsets of the given ratios by the reference's rule
(`in_memory.subset_indices`) and writes a data pack (`pack.write`, the file
format and its reader). Apart from `pack`, which `sources` reads packs
with, so that neither imports the other's users.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from nc_jax.data import archive
from nc_jax.data import datasets
from nc_jax.data import in_memory
from nc_jax.data import long_tail
from nc_jax.data import pack
from nc_jax.data import sources


def pack_dataset(path: str | os.PathLike, name: str, data_dir: str, *,
                 imb_factors: Sequence[float], profile: str = "exp",
                 selection_seed: int = 0,
                 train_splits: Sequence[str] | None = None) -> dict[str, Any]:
  """Packs what runs of dataset `name` at `imb_factors` read from
  `data_dir` (any form `sources` reads; an archive is extracted first):
  the train splits' labels and ids with the images of the union of the
  subsets, and the whole test split.

  Returns:
    A summary: the file's bytes, each split's images held and total, and
    each ratio's subset size and largest and smallest class.
  """
  info = datasets.dataset_info(name)
  source = sources.check_data_dir(name, archive.resolve_data_dir(data_dir))
  if source.kind == "pack":
    raise ValueError(f"data_dir {data_dir} is a pack already; pass the "
                     "dataset it was packed from.")
  k = info.num_classes
  splits, counts, selections = {}, {}, []
  for r in imb_factors:
    long_tail.check_imb_factor(r)
    selections.append({"imb_factor": float(r), "profile": profile,
                       "selection_seed": int(selection_seed)})
  train = sources.available_splits(source, tuple(train_splits or ()) or None)
  for split in train + ("test",):
    index = sources.split_index(source, split)
    if split == "test":
      keep = np.arange(index.labels.size)
    else:
      chosen = []
      for r in imb_factors:
        idx, got, _ = in_memory.subset_indices(index.labels, k, r, profile,
                                               selection_seed)
        chosen.append(idx)
        counts.setdefault(f"{r:g}", []).append(got)
      keep = np.unique(np.concatenate(chosen))
    splits[split] = {"labels": index.labels, "ids": index.ids,
                     "canonical": index.canonical, "stored": keep,
                     "images": sources.decode_images(source, split, keep)}
  out = pack.write(path, dataset=name, image_shape=info.image_shape,
              class_names=sources.class_names(source), splits=splits,
              selections=selections)
  per_ratio = {r: np.sum(c, axis=0) for r, c in counts.items()}
  return {"path": str(out), "bytes": out.stat().st_size,
          "splits": {s: {"held": int(v["stored"].size),
                         "total": int(len(v["labels"]))}
                     for s, v in splits.items()},
          "subsets": {r: {"images": int(c.sum()), "largest_class": int(
              c.max()), "smallest_class": int(c.min())}
                      for r, c in per_ratio.items()}}
