"""The set-up phase of a run: checked, loaded, claimed, built.

`set_up(config, workdir, held)` is what `nc_jax.train.train_and_evaluate`
does before its loop: the workdir's read-only checks, the mesh, the data
(`load_data`), the schedule fitted to the run, the model (`builder.build`),
then, with everything known to be good, the workdir's lock and
`config.json`. It returns a `Setup`; every problem before the workdir is
written raises `validation.ConfigError` naming the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time
from typing import Any

from ml_collections import ConfigDict

from nc_jax import builder as builder_lib
from nc_jax import checkpoint as ckpt_lib
from nc_jax import data as data_lib
from nc_jax import optim
from nc_jax import reporting
from nc_jax import sharding
from nc_jax import workdir as workdir_lib
from nc_jax.data.archive import resolve_data_dir
from nc_jax.reporting import say
from nc_jax.validation import ConfigError


@dataclasses.dataclass
class Setup:
  """What the set-up phase hands to the loop: checked, loaded, claimed."""
  config: ConfigDict
  workdir: pathlib.Path
  mesh: Any
  data_dir: str | None
  train_input: Any
  eval_input: Any
  steps_per_epoch: int
  total: int
  eval_every: int
  ckpt_every: int
  kernel_record: dict
  impls: Any  # builder.resolve_implementations's answer
  built: builder_lib.Built
  started: float = 0.0  # perf_counter() when train_and_evaluate began



def load_data(config: ConfigDict, mesh) -> tuple[str | None, Any, Any]:
  """(data_dir, train input, test input); ConfigError for data problems."""
  t0 = time.perf_counter()
  try:
    data_dir = resolve_data_dir(config.data_dir)
    if data_dir is None:
      data_lib.prepare_tfds(config.dataset, notify=say)
    train_input = data_lib.make_train_input(
        config.dataset, data_dir=data_dir, imb_factor=config.imb_factor,
        profile=config.imb_profile, selection_seed=config.selection_seed,
        batch_size=config.batch_size, seed=config.seed, mesh=mesh,
        pipeline=config.pipeline, sampler=config.sampler,
        options=data_lib.options_of(config.dataset, config))
    eval_input = data_lib.make_eval_input(
        config.dataset, data_dir=data_dir,
        batch_size=config.eval_batch_size, mesh=mesh,
        options=data_lib.options_of(config.dataset, config))
  except (ValueError, FileNotFoundError) as e:
    # Data problems (a file that does not decode, too few images for one
    # batch, a missing ImageNet-LT list): nothing has been written yet.
    raise ConfigError(str(e)) from e
  say(f"data: {config.dataset}-LT r={config.imb_factor} ({config.imb_profile}) "
      f"{train_input.num_examples} train images, per class "
      f"{list(train_input.counts)}; {eval_input.num_examples} test images "
      f"[{time.perf_counter() - t0:.1f}s, pipeline={config.pipeline}]")
  return data_dir, train_input, eval_input


def set_up(config: ConfigDict, workdir: pathlib.Path,
            held: contextlib.ExitStack) -> Setup:
  """Checks, loads the data, claims the workdir and builds the model."""
  # As validated, once more.
  impls = builder_lib.resolve_implementations(config)
  try:
    workdir_lib.check_target(workdir, lambda wd: ckpt_lib.check_config(
        wd, config, impls.record(), why=impls.note))
    if "://" not in str(workdir):
      workdir_lib.on_chief(lambda: workdir_lib.check_free(workdir),
                           "use the workdir")
    # A resume restores its checkpoint: only a fresh run needs the file.
    if not ckpt_lib.has_checkpoint(workdir):
      builder_lib.check_pretrained(config)
  except (ValueError, workdir_lib.WorkdirLocked) as e:
    raise ConfigError(str(e)) from e
  mesh = sharding.make_mesh()
  try:
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  data_dir, train_input, eval_input = load_data(config, mesh)
  spe = train_input.steps_per_epoch
  total = optim.duration_steps(config, "num", spe)
  try:  # what needs the real length (the schedule, a DRW epoch)
    method = builder_lib.check_config(config, total_epochs=total / spe,
                                      steps_per_epoch=spe)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  # `request` is what config.json records and a resume compares; `config`
  # the schedule this run trains (scaled to a run shorter than its recipe),
  # what results.json records.
  request = config
  config, note = optim.fit_schedule(request, total / spe,
                                    epoch_options=method.epoch_options)
  if note:
    say(note)

  # Building the model and its ETF can still refuse the config (an ETF that
  # does not fit the feature dimension); it writes nothing.
  info = train_input.info
  try:
    built = builder_lib.build(
        config, num_classes=info.num_classes, image_shape=info.image_shape,
        mean=info.mean, std=info.std, class_counts=train_input.counts,
        steps_per_epoch=spe, total_steps=total, mesh=mesh, impls=impls)
  except ValueError as e:
    raise ConfigError(str(e)) from e

  # Config, data and model are good: from here on the run writes into
  # workdir.
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if "://" not in str(workdir):
      workdir_lib.on_chief(
          lambda: held.enter_context(workdir_lib.hold(workdir)),
          "take the workdir's lock")
    fresh = not ckpt_lib.has_checkpoint(workdir)
    kernel_record = ckpt_lib.check_or_write_config(
        workdir, request, impls.record(), why=impls.note)
  except (ValueError, OSError, workdir_lib.WorkdirLocked) as e:
    if ckpt_lib.is_no_space(e):
      raise ckpt_lib.no_space(
          "the run's first files", workdir, step=None, needed=None,
          kept="Nothing was trained yet.") from None
    raise ConfigError(str(e)) from e
  if fresh and reporting.is_chief():
    # Starts from step 0: records of an attempt that never saved a
    # checkpoint are redone, as a resume redoes those past its checkpoint.
    (workdir / "metrics.jsonl").unlink(missing_ok=True)
  if train_input.subset is not None and reporting.is_chief():
    ckpt_lib.write_json_atomic(workdir / "train_subset.json",
                               train_input.subset)

  return Setup(
      config, workdir, mesh, data_dir, train_input, eval_input, spe, total,
      optim.duration_steps(config, "eval_every", spe, default=total),
      optim.duration_steps(config, "checkpoint_every", spe, default=total),
      kernel_record, impls, built)
