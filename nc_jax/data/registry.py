"""Datasets by name: the one place that loads a dataset's module.

`get_dataset(name)` returns the `datasets.Dataset` of registry entry `name`
(`datasets.REGISTRY`), importing the module the entry names on first use
(`in_memory`, `imagenet_lt`, `cub`), so that a dataset that needs
TensorFlow costs nothing to the others; `options_of` hands a dataset its
own config fields. The interface, `datasets`, stays free of its
implementations.
"""

from __future__ import annotations

import importlib
from typing import Any

from nc_jax.data import datasets


def get_dataset(name: str) -> datasets.Dataset:
  """The `Dataset` of registry entry `name` (its module loaded on first
  use); ValueError listing the valid names."""
  info = datasets.dataset_info(name)
  return importlib.import_module(info.module).make(info)


def options_of(name: str, config: Any) -> dict[str, Any]:
  """The values of dataset `name`'s own config fields in `config` (a
  ConfigDict or a mapping), None where unset."""
  return {f: config.get(f) for f in get_dataset(name).options}
