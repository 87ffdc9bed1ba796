"""A run's config checked in one place, each check once, before any writing.

Two phases, because one part of the checks needs the run's length in
steps, which a config given as `steps=N` (or a warm-up in steps) knows only
once the data's size is:

- `validate_config(config)`, first thing: every number finite and in its
  range (the run's own fields here, the optimiser's by `nc_jax.optim`, the
  method's own options by the method), the layers the model will be given
  (`nc_jax.kernels.resolve`: where the CPU kernels are built, once), the
  model for the dataset's K (an ETF that does not fit the backbone), and
  the data (`nc_jax.data.check_inputs`: the pipeline's and the dataset's
  options, a listing and a decoded sample of an image folder, the md5s of
  a CIFAR release). It returns the resolved `kernels.Layers`.
- `validate_length(config, steps_per_epoch)`, once the training set's size
  is known and before anything is written: the run's length in steps, the
  recipe's schedule scaled to a shorter run (`schedule_fit.fit_schedule`), and
  what must fit in it (warm-up, decays, a method's epoch options such as
  LDAM-DRW's `drw_epoch`).

The first problem ends the run with one `ConfigError` naming the fix.
Nothing else checks a config: the builder builds what it is given.
"""

from __future__ import annotations

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

import math  # pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Callable

from ml_collections import ConfigDict

from nc_jax import builder as builder_lib
from nc_jax import data as data_lib
from nc_jax import etf as etf_lib
from nc_jax import evaluators as evaluators_lib
from nc_jax import kernels
from nc_jax import methods as methods_lib
from nc_jax import models
from nc_jax import optim
from nc_jax import schedule_fit
from nc_jax import sharding
from nc_jax import steps as steps_lib


class ConfigError(ValueError):
  """The config or its inputs cannot work; the message names the fix."""


def _as_config_error(fn: Callable[[], object]) -> object:
  try:
    return fn()
  except ConfigError:
    raise
  except (ValueError, FileNotFoundError, TypeError) as e:
    raise ConfigError(str(e)) from e


def validate_config(config: ConfigDict) -> kernels.Layers:
  """Stops a bad config before any work, with one message naming the fix.

  An unset `data_dir` (tfds's default data directory) is not checked here;
  `train_and_evaluate` prepares it before any work.

  Returns:
    The layers the run's model is given (`nc_jax.kernels.resolve`).

  Raises:
    ConfigError: wrapping the first problem found.
  """
  return _as_config_error(lambda: _validate(config))


def validate_length(config: ConfigDict, steps_per_epoch: int
                    ) -> tuple[ConfigDict, int, str | None]:
  """The checks that need the run's length, once its epoch is known.

  Args:
    config: the validated config (`validate_config`).
    steps_per_epoch: steps in one pass over the training set.

  Returns:
    `(config, total_steps, note)`: the config with the recipe's schedule
    scaled to a shorter run (`schedule_fit.fit_schedule`; the same config when
    there is nothing to scale), the run's length in steps, and the one line
    that says what was scaled (or None).

  Raises:
    ConfigError: a warm-up, decay or method epoch that does not fit.
  """
  def check():
    total = optim.duration_steps(config, "num", steps_per_epoch)
    epochs = total / max(steps_per_epoch, 1)
    method = methods_lib.get_method(config.method)
    fitted, note = schedule_fit.fit_schedule(config, epochs,
                                      epoch_options=method.epoch_options)
    optim.check_schedule(fitted.optim, total_epochs=epochs,
                         steps_per_epoch=steps_per_epoch,
                         scaled=note is not None)
    _check_epoch_options(fitted, method, epochs)
    return fitted, total, note
  return _as_config_error(check)


def _check_epoch_options(config: ConfigDict, method: methods_lib.Method,
                         total_epochs: float) -> None:
  """A method's loss options that are epochs lie within the run."""
  for name in method.epoch_options:
    value = config.loss[name]
    if value >= total_epochs:
      raise ValueError(
          f"loss.{name}={value} is past the end of training "
          f"({total_epochs:g} epochs): what it starts would never happen. "
          f"Set --config.loss.{name} below the training length (the recipe: "
          "160 of 200, where the learning rate first decays), or give the "
          "length in the config argument (epochs=N or steps=N), which "
          "scales it with the schedule.")


def check_model(config: ConfigDict, *, num_classes: int,
                layers: kernels.Layers) -> None:
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
  builder_lib.model_for(config, method, num_classes=num_classes,
                        layers=layers)


def _check_finite(config: ConfigDict, prefix: str = "") -> None:
  """Every number in the config is finite (NaN and inf train nothing)."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ConfigDict):
      _check_finite(value, f"{name}.")
      continue
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{name}={value} is not a finite number; pass a "
                         f"finite value (--config.{name}=...).")


def _positive_int(config: ConfigDict, name: str, what: str) -> None:
  v = config.get(name)
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ValueError(f"{name}={v!r} must be a positive integer ({what}); "
                     f"pass e.g. --config.{name}={_DEFAULTS.get(name, 1)}.")


_DEFAULTS = {"batch_size": 128, "eval_batch_size": 500, "log_every_steps": 20,
             "keep_checkpoints": 2, "ece_bins": 15}


def check_values(config: ConfigDict) -> methods_lib.Method:
  """The numbers and names that need nothing but the config (ranges, the
  method and its own options); returns the method.

  Raises:
    ValueError: naming the field and the fix.
  """
  _check_finite(config)
  method = methods_lib.get_method(config.method)
  epochs = config.get("num_epochs")
  if epochs is not None and not config.get("num_steps") and epochs < 0:
    raise ValueError(f"num_epochs must be > 0, got {epochs:g} (epochs=N or "
                     "steps=N in the config argument).")
  for name in ("num", "eval_every", "checkpoint_every"):
    optim.duration_steps(config, name, 1)  # both-set conflicts, signs
  if optim.duration_steps(config, "num", 1) is None:
    raise ValueError("No training length: set num_epochs or num_steps "
                     "(epochs=N or steps=N in the config argument).")
  optim.check_ranges(config.optim)
  if config.etf_rotation not in etf_lib.ROTATIONS:
    raise ValueError(f"etf_rotation must be one of {list(etf_lib.ROTATIONS)} "
                     f"(how the fixed ETF's rotation is drawn), got "
                     f"{config.etf_rotation!r}.")
  if not config.eval_logit_adjust_tau >= 0:
    raise ValueError(f"eval_logit_adjust_tau must be >= 0 (0 = off, 1 = the "
                     f"post-hoc adjustment of Menon et al.), got "
                     f"{config.eval_logit_adjust_tau}.")
  if not config.mixup_alpha >= 0:
    raise ValueError(f"mixup_alpha must be >= 0 (0 = off), got "
                     f"{config.mixup_alpha}.")
  if method.check is not None:
    method.check(config)
  return method


def _check_run_fields(config: ConfigDict) -> None:
  """The run's own fields: batches, logging, checkpoints, seeds, replicas."""
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
  if config.compute_dtype not in builder_lib.DTYPES:
    raise ValueError(f"compute_dtype must be one of "
                     f"{list(builder_lib.DTYPES)}, got "
                     f"{config.compute_dtype!r}.")
  if config.num_seeds < 1:
    raise ValueError(f"num_seeds must be >= 1, got {config.num_seeds}.")
  if config.seeds_mode not in steps_lib.REPLICA_MODES:
    raise ValueError(f"seeds_mode must be one of {steps_lib.REPLICA_MODES}, "
                     f"got {config.seeds_mode!r}.")
  evaluators_lib.check_names(config.get("evals", ("classification",)))
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh)


def _validate(config: ConfigDict) -> kernels.Layers:
  check_values(config)
  _check_run_fields(config)
  # An unknown backbone, an unknown layer request, or the CPU kernels asked
  # for where they cannot run stop here (this is also where they are
  # built, once, if they are chosen).
  layers = kernels.resolve(config)
  # The model for the dataset's K, before the data is read (a backbone too
  # narrow for the fixed ETF would otherwise stop only after loading it).
  check_model(config,
              num_classes=data_lib.dataset_info(config.dataset).num_classes,
              layers=layers)
  data_lib.check_inputs(config)
  return layers
