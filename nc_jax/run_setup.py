"""The set-up phase of a run: checked, loaded, claimed, built.

`set_up(config, workdir, layers, held)` is what
`nc_jax.train.train_and_evaluate` does between validating the config and
its loop: the mesh, the data (`load_data`), the checks that need the run's
length (`validation.validate_length`, which also scales the recipe's
schedule to a shorter run), the model (`builder.build`), then, with
everything known to be good, the workdir's lock, `config.json` and
`train_subset.json`. `check_workdir` is the read-only look at the workdir
before any of it. Every problem before the workdir is written raises
`validation.ConfigError` naming the fix.
"""

from __future__ import annotations

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import pathlib
import time
from typing import Any

from ml_collections import ConfigDict

from nc_jax import builder as builder_lib
from nc_jax import checkpoint as ckpt_lib
from nc_jax import data as data_lib
from nc_jax import optim
from nc_jax import preemption
from nc_jax import pretrained as pretrained_lib
from nc_jax import reporting
from nc_jax import run_config
from nc_jax import sharding
from nc_jax import validation
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
  layers: Any  # kernels.Layers, as validation resolved them
  built: builder_lib.Built
  started: float = 0.0  # perf_counter() when train_and_evaluate began


def finished_results(config: ConfigDict, workdir: pathlib.Path) -> dict:
  """The results.json of the finished run in `workdir`, if it ran `config`
  (a rerun of a finished command has nothing to do)."""
  path = workdir / "results.json"
  try:
    results = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError):
    raise ConfigError(
        f"{path} is not a results file of nc_jax (not valid JSON); the "
        "run's checkpoints are untouched. Restore it, or move it away to "
        "have the rerun write it again from the checkpoints.") from None
  try:
    run_config.check_finished(workdir, config, results)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  say(f"{workdir} already holds a finished run ({path}); nothing to do. "
      "Use another --workdir to train again.")
  return results


def check_workdir(config: ConfigDict, workdir: pathlib.Path,
                   layers: Any) -> None:
  """The workdir can take this run (read-only): not a file or a folder of
  something else, not a checkpointed run of another config or other
  layers, not held by a live run; and a fresh run has its pretrained file.
  """
  try:
    workdir_lib.check_target(workdir, lambda wd: run_config.check_resume(
        wd, config, layers.record(), why=layers.note, before_fit=True))
    workdir_lib.on_chief(lambda: workdir_lib.check_free(workdir),
                         "use the workdir")
    # A resume restores its checkpoint: only a fresh run needs the file.
    if not ckpt_lib.has_checkpoint(workdir):
      pretrained_lib.check_request(config)
  except (ValueError, workdir_lib.WorkdirLocked) as e:
    raise ConfigError(str(e)) from e


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


def set_up(config: ConfigDict, workdir: pathlib.Path, layers: Any,
            held: contextlib.ExitStack) -> Setup:
  """Loads the data, checks the run's length, builds the model, then claims
  the workdir and writes its config."""
  mesh = sharding.make_mesh()
  data_dir, train_input, eval_input = load_data(config, mesh)
  spe = train_input.steps_per_epoch
  # From here `config` is what the run trains: its recipe's schedule scaled
  # to a shorter run (what config.json and results.json record, and what a
  # resume compares).
  config, total, note = validation.validate_length(config, spe)
  if note:
    say(note)
  info = train_input.info
  built = builder_lib.build(
      config, num_classes=info.num_classes, image_shape=info.image_shape,
      mean=info.mean, std=info.std, class_counts=train_input.counts,
      steps_per_epoch=spe, total_steps=total, mesh=mesh, layers=layers)

  # Config, data and model are good: from here on the run writes into
  # workdir.
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.on_chief(
        lambda: held.enter_context(workdir_lib.hold(workdir)),
        "take the workdir's lock")
    fresh = not ckpt_lib.has_checkpoint(workdir)
    kernel_record = run_config.record(workdir, config, layers.record(),
                                      why=layers.note)
    if fresh and reporting.is_chief():
      # Starts from step 0: records of an attempt that never saved a
      # checkpoint are redone, as a resume redoes those past its checkpoint.
      (workdir / "metrics.jsonl").unlink(missing_ok=True)
    if train_input.subset is not None and reporting.is_chief():
      workdir_lib.write_json_atomic(workdir / "train_subset.json",
                                    train_input.subset)
  except (ValueError, OSError, workdir_lib.WorkdirLocked) as e:
    if preemption.is_no_space(e):
      raise preemption.no_space(
          "the run's first files", workdir, step=None, needed=None,
          kept="Nothing was trained yet.") from None
    raise ConfigError(str(e)) from e

  return Setup(
      config, workdir, mesh, data_dir, train_input, eval_input, spe, total,
      optim.duration_steps(config, "eval_every", spe, default=total),
      optim.duration_steps(config, "checkpoint_every", spe, default=total),
      kernel_record, layers, built)
