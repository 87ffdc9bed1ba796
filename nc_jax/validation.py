"""A run's config checked before any work, each part by its owner.

`validate_config` asks the builder (every number finite, the optimiser's
ranges and schedule, the method and its options, the pretrained-weights
file), the implementations' decider (through the builder), and the data
layer (the pipeline's options, the dataset's own, the data itself); the
run's own fields (batch sizes, logging, checkpoints, seeds, replicas,
durations) are checked here. The first problem ends the run with one
`ConfigError` naming the fix; nothing has been written by then.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from nc_jax import builder as builder_lib
from nc_jax import data as data_lib
from nc_jax import etf as etf_lib
from nc_jax import implementations as impl_lib
from nc_jax import methods as methods_lib
from nc_jax import models
from nc_jax import optim
from nc_jax import steps as steps_lib

DTYPES = builder_lib.DTYPES


class ConfigError(ValueError):
  """The config or its inputs cannot work; the message names the fix."""


def validate_config(config: ConfigDict) -> None:
  """Stops a bad config before any work, with one message naming the fix.

  Checks the values and the data: an image-folder `data_dir` is listed, its
  class folders counted and a sample of every class decoded. An unset
  `data_dir` (tfds's default data directory) is not checked here;
  `train_and_evaluate` prepares it before any work.

  Raises:
    ConfigError: wrapping the first problem found.
  """
  try:
    _validate(config)
  except ConfigError:
    raise
  except (ValueError, FileNotFoundError, TypeError) as e:
    raise ConfigError(str(e)) from e


def check_model(config: ConfigDict, *, num_classes: int,
                impls: impl_lib.Implementations) -> None:
  """The model can be made for K classes: its backbone and head options,
  and a fixed ETF that fits its features (before any data is read).

  Raises:
    ValueError: naming the fix (e.g. a backbone too narrow for K).
  """
  method = methods_lib.get_method(config.method)
  if method.fixed_classifier:
    width = lambda name: models.BACKBONES[name]().feature_dim  # no params
    try:
      etf_lib.check_fits(num_classes, width(config.backbone),
                         config.etf_rotation)
    except ValueError as e:
      need = num_classes - (config.etf_rotation == "gaussian")
      wide = [n for n in sorted(models.BACKBONES) if width(n) >= need]
      raise ValueError(f"{e} Backbones with d >= {need}: "
                       f"{', '.join(wide)} (--config.backbone=NAME).") from None
  builder_lib.create_model(config, method, num_classes=num_classes,
                           impls=impls)


def _positive_int(config: ConfigDict, name: str, what: str) -> None:
  v = config.get(name)
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ValueError(f"{name}={v!r} must be a positive integer ({what}); "
                     f"pass e.g. --config.{name}={_DEFAULTS.get(name, 1)}.")


_DEFAULTS = {"batch_size": 128, "eval_batch_size": 500, "log_every_steps": 20,
             "keep_checkpoints": 2, "ece_bins": 15}


def _validate(config: ConfigDict) -> None:
  # Each part by its owner: the numbers, optimiser and method (builder), the
  # implementations, the data; the run's own fields here.
  builder_lib.check_config(config)
  _positive_int(config, "batch_size", "the global batch, over all devices")
  _positive_int(config, "eval_batch_size", "the global evaluation batch")
  _positive_int(config, "log_every_steps", "steps between progress lines")
  _positive_int(config, "keep_checkpoints", "checkpoints kept on disk")
  _positive_int(config, "ece_bins", "calibration bins")
  if "steps_per_dispatch" in config:  # configs older than the field: 1
    _positive_int(config, "steps_per_dispatch", "train steps per compiled "
                  "call")
  if not config.preemption_grace_seconds > 0:
    raise ValueError(
        f"preemption_grace_seconds must be > 0 (25: inside a 30 s "
        f"pre-emption notice), got {config.preemption_grace_seconds}.")
  for name in ("seed", "selection_seed", "etf_seed"):
    v = config.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
      raise ValueError(f"{name}={v!r} must be an integer in [0, 2**31).")
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"compute_dtype must be one of {list(DTYPES)}, got "
                     f"{config.compute_dtype!r}.")
  if config.num_seeds < 1:
    raise ValueError(f"num_seeds must be >= 1, got {config.num_seeds}.")
  if config.seeds_mode not in steps_lib.REPLICA_MODES:
    raise ValueError(f"seeds_mode must be one of {steps_lib.REPLICA_MODES}, "
                     f"got {config.seeds_mode!r}.")
  for name in ("num", "eval_every", "checkpoint_every"):
    optim.duration_steps(config, name, 1)  # both-set conflicts
  if optim.duration_steps(config, "num", 1) is None:
    raise ValueError("No training length: set num_epochs or num_steps "
                     "(epochs=N or steps=N in the config argument).")
  # Raises here, before any work, for an unknown backbone, a bad conv_impl
  # or norm_impl, or oneDNN convolutions asked for where they cannot run
  # (this is also where they are built, once, if they are chosen).
  impls = builder_lib.resolve_implementations(config)
  # The model for the dataset's K, before the data is read (a backbone too
  # narrow for the fixed ETF would otherwise stop only after loading it).
  check_model(config,
              num_classes=data_lib.dataset_info(config.dataset).num_classes,
              impls=impls)
  data_lib.check_config(config)
