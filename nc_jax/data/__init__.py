"""Long-tailed input pipelines. Data knows nothing of models.

A dataset is one registry entry (`datasets.REGISTRY`) and one module behind
`datasets.Dataset` (`in_memory` for the small sets, `imagenet_lt` for the
streamed one); nothing outside this package names a dataset.

Public API:

- `long_tail_counts(num_per_class, imb_factor, *, num_classes, profile)`:
  the reference's per-class counts.
- `dataset_info(name) -> DatasetInfo`, `REGISTRY`, `check_data_dir`,
  `check_data` (cheap checks before any work), `prepare_tfds` (an unset
  data_dir: tfds downloads and prepares the dataset).
- `make_train_input(name, *, data_dir, imb_factor, profile, selection_seed,
  batch_size, seed, mesh, pipeline, sampler, options) -> TrainInput`
  (`.iterate(start_step)` yields global sharded uint8 batches).
- `make_eval_input(name, *, data_dir, batch_size, mesh, split, ...)
  -> EvalInput` (`.iterate()` covers every image once, with a mask).
- `options_of(name, config)`: the dataset's own config fields, for
  `options=`.
"""

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

from nc_jax.data.long_tail import PROFILES
from nc_jax.data.long_tail import check_imb_factor
from nc_jax.data.long_tail import long_tail_counts
from nc_jax.data.long_tail import select_long_tail
from nc_jax.data.pipeline import EVAL_SPLITS
from nc_jax.data.pipeline import EvalInput
from nc_jax.data.pipeline import PIPELINES
from nc_jax.data.pipeline import SAMPLERS
from nc_jax.data.pipeline import TrainInput
from nc_jax.data.pipeline import make_eval_input
from nc_jax.data.pipeline import make_train_input
from nc_jax.data.datasets import REGISTRY
from nc_jax.data.datasets import DatasetInfo
from nc_jax.data.datasets import dataset_info
from nc_jax.data.registry import get_dataset
from nc_jax.data.registry import options_of
from nc_jax.data.sources import check_data_dir
from nc_jax.data.tfds_prepare import prepare_tfds


def check_data(name: str, data_dir, *, train_splits=None) -> None:
  """`check_data_dir`, and for an image-folder tree of a small dataset: its
  listing, number of class folders and a decoded sample of every class.

  Raises:
    ValueError, FileNotFoundError: naming the problem and the fix.
  """
  get_dataset(name).check_data(None if data_dir is None else str(data_dir),
                               {"train_splits": train_splits})


def check_inputs(config) -> None:
  """The data part of a run's config, checked before any work: the train
  input's options (`pipeline.check_options`, the dataset's own included),
  and the data itself (`check_data`: for an image-folder tree or a CIFAR
  release, its listing and a decoded sample).

  Raises:
    ValueError, FileNotFoundError: naming the problem and the fix.
  """
  from nc_jax.data import archive, pipeline  # pylint: disable=g-import-not-at-top
  options = options_of(config.dataset, config)
  pipeline.check_options(config.dataset, pipeline=config.pipeline,
                         sampler=config.sampler,
                         imb_factor=config.imb_factor,
                         profile=config.imb_profile, options=options)
  root = archive.resolve_data_dir(config.data_dir)
  try:
    check_data(config.dataset, root,
               train_splits=options.get("train_splits") or None)
  except (ValueError, FileNotFoundError) as e:
    if root is None or root == config.data_dir or root not in str(e):
      raise
    # Name what the user passed: the archive, not nc_jax's extraction of it.
    kind = type(e) if type(e) in (ValueError, FileNotFoundError) else ValueError
    raise kind(str(e).replace(
        f"data_dir {root}", f"data_dir {config.data_dir}", 1)) from None


__all__ = [
    "PROFILES", "PIPELINES", "SAMPLERS", "EVAL_SPLITS", "REGISTRY",
    "DatasetInfo", "TrainInput", "EvalInput", "check_inputs", "check_data",
    "check_data_dir",
    "check_imb_factor", "prepare_tfds",
    "dataset_info", "long_tail_counts", "make_eval_input", "make_train_input",
    "options_of",
    "select_long_tail",
]
