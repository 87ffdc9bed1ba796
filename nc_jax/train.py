"""The training loop: `train_and_evaluate(config, workdir)`.

One call builds the long-tailed data, the model and the compiled steps,
resumes from the newest checkpoint in `workdir` if there is one, trains,
evaluates every `eval_every` and at the end, and writes `results.json`.
Everything it computes is a pure function of the config (data order, mixup
draws and initialisation all derive from `config.seed`; the ETF from
`config.etf_seed`), so a run killed at any moment and started again with the
same command ends with the same numbers as one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from nc_jax import builder as builder_lib
from nc_jax import checkpoint as ckpt_lib
from nc_jax import data as data_lib
from nc_jax import kernels as kernels_lib
from nc_jax.data.archive import resolve_data_dir
from nc_jax.data.sources import IN_MEMORY
from nc_jax import metrics as metrics_lib
from nc_jax import nc_metrics
from nc_jax import optim
from nc_jax import preemption
from nc_jax import provenance
from nc_jax import reporting
from nc_jax import sharding
from nc_jax import steps as steps_lib
from nc_jax import workdir as workdir_lib
from nc_jax.reporting import say

DTYPES = builder_lib.DTYPES
SCALAR_KEYS = ("top1", "top5", "head", "medium", "tail", "ece", "loss")


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


def _positive_int(config: ConfigDict, name: str, what: str) -> None:
  v = config.get(name)
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ValueError(f"{name}={v!r} must be a positive integer ({what}); "
                     f"pass e.g. --config.{name}={_DEFAULTS.get(name, 1)}.")


_DEFAULTS = {"batch_size": 128, "eval_batch_size": 500, "log_every_steps": 20,
             "keep_checkpoints": 2, "ece_bins": 15}


def _validate(config: ConfigDict) -> None:
  # The method registry checks the name, its options and combinations.
  builder_lib.check_config(config)
  if config.sampler not in data_lib.SAMPLERS:
    raise ValueError(f"sampler must be one of {data_lib.SAMPLERS}, got "
                     f"{config.sampler!r} (--config.sampler=...).")
  data_lib.dataset_info(config.dataset)  # raises for unknown datasets
  r = config.imb_factor
  if not (isinstance(r, (int, float)) and 0 < r <= 1) or math.isnan(r):
    raise ValueError(
        f"imb_factor={r} is outside (0, 1]: it is n_min / n_max (0.01 means "
        "a 100:1 imbalance, 1 means balanced). Pass e.g. imb=0.01.")
  if config.imb_profile not in data_lib.PROFILES:
    raise ValueError(f"imb_profile must be one of {data_lib.PROFILES}, got "
                     f"{config.imb_profile!r} (profile= in the config "
                     "argument).")
  _positive_int(config, "batch_size", "the global batch, over all devices")
  _positive_int(config, "eval_batch_size", "the global evaluation batch")
  _positive_int(config, "log_every_steps", "steps between progress lines")
  _positive_int(config, "keep_checkpoints", "checkpoints kept on disk")
  _positive_int(config, "ece_bins", "calibration bins")
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
  # Raises here, before any work, for an unknown backbone, a bad conv_impl
  # or norm_impl, or oneDNN convolutions asked for where they cannot run
  # (this is also where they are built, once, if they are chosen).
  kernels_lib.resolve_kernels(config)
  if config.num_seeds < 1:
    raise ValueError(f"num_seeds must be >= 1, got {config.num_seeds}.")
  if config.seeds_mode not in steps_lib.REPLICA_MODES:
    raise ValueError(f"seeds_mode must be one of {steps_lib.REPLICA_MODES}, "
                     f"got {config.seeds_mode!r}.")
  if config.pipeline not in data_lib.PIPELINES:
    raise ValueError(f"pipeline must be one of {data_lib.PIPELINES}, got "
                     f"{config.pipeline!r}.")
  if config.pipeline == "device" and config.dataset not in IN_MEMORY:
    raise ValueError(f"{config.dataset!r} is streamed from disk; "
                     "pipeline='device' holds the train set on the "
                     f"accelerator and supports only {IN_MEMORY}. Pass "
                     "--config.pipeline=tfdata.")
  train_list = config.get("imagenet_lt_train_list")
  if train_list and not os.path.isfile(os.path.expanduser(train_list)):
    raise ValueError(f"imagenet_lt_train_list {train_list} is not a file. "
                     "Pass the path of ImageNet_LT_train.txt.")
  for name in ("num", "eval_every", "checkpoint_every"):
    optim.duration_steps(config, name, 1)  # both-set conflicts
  if optim.duration_steps(config, "num", 1) is None:
    raise ValueError("No training length: set num_epochs or num_steps "
                     "(epochs=N or steps=N in the config argument).")
  data_lib.check_data(config.dataset, resolve_data_dir(config.data_dir),
                      train_splits=config.train_splits or None)


# Files and folders a run writes into its workdir.
_RUN_FILES = frozenset({
    "config.json", "checkpoints", "metrics.jsonl", "tensorboard",
    "results.json", "train_subset.json", "best", workdir_lib.LOCK_NAME})


def _workdir_path(workdir: str | os.PathLike) -> pathlib.Path:
  # Orbax needs absolute paths; keep URLs (gs://...) as they are.
  return (pathlib.Path(workdir) if "://" in str(workdir)
          else pathlib.Path(workdir).expanduser().resolve())


def _check_workdir(workdir: pathlib.Path, config: ConfigDict,
                   kernels: kernels_lib.Kernels) -> None:
  """Read-only checks that `workdir` can take this run (nothing written).

  Raises:
    ConfigError: `workdir` is a file, cannot be created or written, holds
      files of something else, or a checkpointed run of another config or
      of other kernels (unless `allow_kernel_change`).
  """
  if "://" in str(workdir):
    return
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(
        f"--workdir {workdir} is an existing file, not a directory. Pass a "
        "new folder (it is created) or the folder of a run to resume.")
  if not workdir.exists():
    parent = workdir.parent
    while not parent.exists():
      parent = parent.parent
    if not parent.is_dir():
      raise ConfigError(f"--workdir {workdir} cannot be created: {parent} is "
                        "a file. Pass a path under a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise ConfigError(f"--workdir {workdir} cannot be created: {parent} is "
                        "not writable. Pass a folder you can write to.")
    return
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir} is not writable. Pass a folder "
                      "you can write to.")
  names = {p.name for p in workdir.iterdir()}
  others = sorted(n for n in names - _RUN_FILES if not n.startswith("."))
  if others and "config.json" not in names:
    shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
    raise ConfigError(
        f"--workdir {workdir} already holds other files ({shown}) and is not "
        "a run directory (no config.json). Pass a new or empty folder.")
  try:
    ckpt_lib.check_config(workdir, config, kernels.record(), why=kernels.note)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _on_chief(fn, what: str):
  """Runs `fn` on process 0; every process raises if it failed there.

  Process 0 alone checks and holds the workdir lock of a multi-host run.
  Returns `fn()` on process 0, None elsewhere.
  """
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except workdir_lib.WorkdirLocked as e:
      error = ConfigError(str(e))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = int(multihost_utils.broadcast_one_to_all(
        np.int32(error is not None)))
    if failed and error is None:
      raise ConfigError(f"process 0 could not {what}; its error says why.")
  if error is not None:
    raise error
  return result


def _summaries(per_replica_totals: list[dict], groups) -> list[dict]:
  return [metrics_lib.summarize(t, groups) for t in per_replica_totals]


def _aggregate(per_seed: list[dict]) -> tuple[dict, dict]:
  """Mean and std over seeds of each metric (per-class lists elementwise)."""
  mean, std = {}, {}
  for key in per_seed[0]:
    vals = [m[key] for m in per_seed]
    if key == "per_class":
      arr = np.array([[np.nan if v is None else v for v in row] for row in vals])
      mean[key] = [None if np.isnan(v) else float(v) for v in arr.mean(0)]
      std[key] = [None if np.isnan(v) else float(v) for v in arr.std(0)]
    elif all(isinstance(v, dict) for v in vals):  # e.g. the "nc" block
      mean[key], std[key] = _aggregate(vals)
    elif all(isinstance(v, (int, float)) for v in vals):
      mean[key] = float(np.mean(vals))
      std[key] = float(np.std(vals))
    else:
      mean[key] = vals[0]
  return mean, std


class _Evaluator:
  """Runs the eval step over an `EvalInput`, per replica."""

  def __init__(self, eval_fn, eval_input, *, num_replicas, num_classes,
               groups, classifier_fn, with_nc: bool, calibrated: bool = True,
               should_stop=lambda: False):
    self.calibrated = calibrated
    self.should_stop = should_stop
    self.fn, self.input = eval_fn, eval_input
    self.s, self.k, self.groups = num_replicas, num_classes, groups
    self.classifier_fn, self.with_nc = classifier_fn, with_nc
    self._nc_update = jax.jit(nc_metrics.update_stats)

  def __call__(self, state, etf) -> list[dict]:
    accs = [metrics_lib.EvalAccumulator() for _ in range(self.s)]
    nc_stats = None
    for batch in self.input.iterate():
      if self.should_stop():
        raise preemption.EvalInterrupted()
      out = self.fn(state, batch, etf)
      feats = out.pop("features", None)
      for r in range(self.s):
        accs[r].add({k: (v if self.s == 1 else v[r]) for k, v in out.items()})
      if self.with_nc:
        if nc_stats is None:
          d = feats.shape[-1]
          nc_stats = [nc_metrics.init_stats(self.k, d) for _ in range(self.s)]
        for r in range(self.s):
          f = feats if self.s == 1 else feats[r]
          nc_stats[r] = self._nc_update(nc_stats[r], f, batch["label"],
                                        batch["mask"])
    results = _summaries([a.totals for a in accs], self.groups)
    if not self.calibrated:
      for r in results:  # see methods.Method.calibrated
        r["ece"] = None
    if self.with_nc:
      classifiers = self.classifier_fn(state, etf)
      tail = tuple(self.groups.get("tail", ())) or None
      for r in range(self.s):
        w = classifiers if self.s == 1 else classifiers[r]
        nc = nc_metrics.finalize(nc_stats[r], np.asarray(w), tail_classes=tail)
        results[r]["nc"] = {k: float(v) for k, v in nc.items()}
    return results


def train_and_evaluate(config: ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, Any]:
  """Trains and evaluates per `config` in `workdir`; returns results.json.

  Nothing is written into `workdir` before the config and the data are
  known to be good (checked, then loaded). The run holds the workdir's lock
  (`nc_jax.workdir`) until it returns or raises.

  Raises:
    ConfigError: the config, the data or the workdir cannot work (the
      message names the fix).
    checkpoint.CheckpointError: a checkpoint exists but cannot be restored.
  """
  with contextlib.ExitStack() as held:
    stop = held.enter_context(preemption.StopSignals(
        grace_seconds=config.get("preemption_grace_seconds", 25.0),
        multi_process=jax.process_count() > 1, say=say))
    return _train_and_evaluate(config, workdir, held, stop)


_all_finite = jax.jit(lambda tree: jnp.all(jnp.stack(
    [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
     if jnp.issubdtype(x.dtype, jnp.inexact)])))


def _diverged(step: int, what: str, config: ConfigDict,
              saved: int | None) -> preemption.Diverged:
  last = ("no checkpoint was saved" if saved is None
          else f"the last good checkpoint is at step {saved}")
  return preemption.Diverged(
      f"training diverged at step {step}: {what} not finite. No checkpoint "
      f"holds a non-finite state ({last}), but resuming would replay the same "
      "steps into the same divergence: start again in a new --workdir (or "
      f"empty this one) with a lower --config.optim.lr (now "
      f"{config.optim.lr}), or check the data.")


def _train_and_evaluate(config: ConfigDict, workdir: str | pathlib.Path,
                        held: contextlib.ExitStack,
                        stop: preemption.StopSignals) -> dict[str, Any]:
  validate_config(config)
  workdir = _workdir_path(workdir)
  results_path = workdir / "results.json"
  if results_path.is_file():
    say(f"{workdir} already holds a finished run ({results_path}); nothing to "
        "do. Use another --workdir to train again.")
    return json.loads(results_path.read_text())
  kernels = kernels_lib.resolve_kernels(config)  # as validated, once more
  _check_workdir(workdir, config, kernels)
  if "://" not in str(workdir):
    _on_chief(lambda: workdir_lib.check_free(workdir), "use the workdir")
  mesh = sharding.make_mesh()
  try:
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  s = int(config.num_seeds)

  # ---------------------------------------------------------------- data
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
        imagenet_lt_train_list=config.imagenet_lt_train_list,
        train_splits=config.train_splits or None,
        color_jitter=config.color_jitter)
    eval_input = data_lib.make_eval_input(
        config.dataset, data_dir=data_dir,
        batch_size=config.eval_batch_size, mesh=mesh)
  except (ValueError, FileNotFoundError) as e:
    # Data problems (a file that does not decode, too few images for one
    # batch, a missing ImageNet-LT list): nothing has been written yet.
    raise ConfigError(str(e)) from e
  info = train_input.info
  groups = {**info.class_groups, **train_input.extra_groups}
  say(f"data: {config.dataset}-LT r={config.imb_factor} ({config.imb_profile}) "
      f"{train_input.num_examples} train images, per class "
      f"{list(train_input.counts)}; {eval_input.num_examples} test images "
      f"[{time.perf_counter() - t0:.1f}s, pipeline={config.pipeline}]")

  spe = train_input.steps_per_epoch
  total = optim.duration_steps(config, "num", spe)
  eval_every = optim.duration_steps(config, "eval_every", spe, default=total)
  ckpt_every = optim.duration_steps(config, "checkpoint_every", spe,
                                    default=total)
  try:  # what needs the real length (the schedule, a DRW epoch)
    builder_lib.check_config(config, total_epochs=total / spe,
                             steps_per_epoch=spe)
  except ValueError as e:
    raise ConfigError(str(e)) from e

  # ------------------------------------------------------------- workdir
  # Config and data are good: from here on the run writes into workdir.
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if "://" not in str(workdir):
      _on_chief(lambda: held.enter_context(workdir_lib.hold(workdir)),
                "take the workdir's lock")
    fresh = not ckpt_lib.has_checkpoint(workdir)
    kernel_record = ckpt_lib.check_or_write_config(
        workdir, config, kernels.record(), why=kernels.note)
  except (ValueError, OSError) as e:
    raise ConfigError(str(e)) from e
  if fresh and reporting.is_chief():
    # Starts from step 0: records of an attempt that never saved a
    # checkpoint are redone, as a resume redoes those past its checkpoint.
    (workdir / "metrics.jsonl").unlink(missing_ok=True)
  if train_input.subset is not None and reporting.is_chief():
    ckpt_lib.write_json_atomic(workdir / "train_subset.json",
                               train_input.subset)


  # --------------------------------------------------------------- model
  try:
    built = builder_lib.build(
        config, num_classes=info.num_classes, image_shape=info.image_shape,
        mean=info.mean, std=info.std, class_counts=train_input.counts,
        steps_per_epoch=spe, total_steps=total, mesh=mesh, kernels=kernels)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  method, model, etf = built.method, built.model, built.etf
  train_step, eval_step = built.train_step, built.eval_step
  state = built.init_state()
  n_params = sum(x.size for x in jax.tree.leaves(state.params)) // s
  replicas = f"{s} replica(s)"
  if s > 1:
    replicas += f" ({steps_lib.resolve_replica_mode(config.seeds_mode)})"
  say(f"model: {config.backbone} + {method.head} head ({config.method}), "
      f"{n_params:,} trainable parameters, feature dim {model.feature_dim}; "
      f"{kernels.describe()}; {replicas}; mesh {mesh.devices.size} "
      f"device(s) over {jax.process_count()} process(es), backend "
      f"{jax.default_backend()}")

  # ---------------------------------------------------------- resume
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints",
                                       keep=config.keep_checkpoints)
  writer = reporting.MetricWriter(workdir)
  history: list[dict] = []
  # Wall time and restarts accumulate over the run's processes.
  t_start, wall_before, resumes = time.perf_counter(), 0.0, 0
  start = checkpointer.latest_step()
  if start is not None:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        state)
    state, record = checkpointer.restore(start, abstract)
    history = record.get("history", [])
    wall_before = float(record.get("wall_s", 0.0))
    resumes = int(record.get("resumes", 0)) + 1
    writer.truncate_after(start)
    say(f"resumed from the checkpoint at step {start} "
        f"(epoch {start / spe:.2f}) in {checkpointer.directory}")
    stop.mark_saved(start)
  start = int(start or 0)

  classifier_fn = lambda state, etf: built.classifiers(state)  # noqa: E731
  evaluator = _Evaluator(eval_step, eval_input, num_replicas=s,
                         num_classes=info.num_classes, groups=groups,
                         classifier_fn=classifier_fn,
                         with_nc=bool(config.nc_metrics),
                         calibrated=method.calibrated,
                         should_stop=stop.pending)
  train_evaluator = None
  if config.nc_metrics and config.nc_train_metrics:
    train_eval_input = data_lib.make_eval_input(
        config.dataset, data_dir=data_dir,
        batch_size=config.eval_batch_size, mesh=mesh, split="train_lt",
        imb_factor=config.imb_factor, profile=config.imb_profile,
        selection_seed=config.selection_seed,
        train_splits=config.train_splits or None)
    train_evaluator = _Evaluator(eval_step, train_eval_input, num_replicas=s,
                                 num_classes=info.num_classes, groups=groups,
                                 classifier_fn=classifier_fn, with_nc=True,
                                 calibrated=method.calibrated,
                                 should_stop=stop.pending)

  def run_eval(step: int) -> None:
    epoch = step / spe
    t_eval = time.perf_counter()
    per_seed = evaluator(state, etf)
    entry = {"step": step, "epoch": epoch, "test": per_seed}
    if train_evaluator is not None:
      entry["train"] = train_evaluator(state, etf)
    history.append(entry)
    mean, _ = _aggregate(per_seed)
    seconds = time.perf_counter() - t_eval
    say(reporting.eval_line(round(epoch, 2), "test", mean)
        + f" [{seconds:.1f}s]")
    scalars = {k: mean[k] for k in SCALAR_KEYS if mean.get(k) is not None}
    scalars["eval_seconds"] = seconds
    for split in ("test", "train"):
      if split in entry and "nc" in entry[split][0]:
        nc_mean, _ = _aggregate([m["nc"] for m in entry[split]])
        scalars.update({f"nc_{split}/{k}": v for k, v in nc_mean.items()})
        say(f"  nc {split}: " + " ".join(
            f"{k} {v:.4f}" for k, v in nc_mean.items()
            if k in ("nc1", "cos_mean_h", "self_duality", "minority_cos_w",
                     "minority_cos_h")))
    writer.write(step, "eval", scalars)

  # The state of the best evaluation (mean test top-1), in workdir/best.
  best = ckpt_lib.BestCheckpoint(workdir / "best", history=history,
                                 start_step=start)

  # ------------------------------------------------------------ train
  say(f"training {total} steps ({total / spe:g} epochs of {spe} steps, batch "
      f"{config.batch_size}) from step {start}; workdir {workdir}")
  progress = reporting.Progress(total_steps=total, steps_per_epoch=spe,
                                batch_size=config.batch_size, start_step=start,
                                eval_every=eval_every)
  def save(step: int) -> None:
    """A checkpoint at `step`, never of a non-finite state."""
    jax.block_until_ready(state)
    t = time.perf_counter()
    if not bool(_all_finite(state)):
      raise _diverged(step, "the parameters or optimiser state are", config,
                      checkpointer.latest_step())
    checkpointer.save(step, state, {
        "history": history, "resumes": resumes,
        "wall_s": wall_before + time.perf_counter() - t_start})
    stop.mark_saved(step)
    progress.exclude(time.perf_counter() - t)

  def evaluate(step: int) -> None:
    """The evaluation at `step`, and the best checkpoint; a stop request
    during it saves the checkpoint at `step` (the rerun evaluates it)."""
    # Dispatch is asynchronous: wait for the queued steps first, or their
    # compute would be timed (and excluded) as evaluation.
    jax.block_until_ready(state)
    t = time.perf_counter()
    try:
      run_eval(step)
    except preemption.EvalInterrupted:
      save(step)
      raise stop.stopped(step, str(checkpointer.directory)) from None
    if not bool(_all_finite(state)):
      raise _diverged(step, "the parameters or optimiser state are", config,
                      checkpointer.latest_step())
    best.update(step, state, history[-1])
    progress.exclude(time.perf_counter() - t, evaluation=True)

  step = start
  if (0 < start and (start % eval_every == 0 or start == total)
      and not any(h["step"] == start for h in history)):
    evaluate(start)  # a stop interrupted it before the checkpoint
  batches = train_input.iterate(start)
  # Per-step metrics summed on device over the log interval (no host sync
  # per step); the logged values are interval means, not the last batch's.
  sums, n_sum = None, 0
  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  try:
    while step < total:
      batch = next(batches)
      state, out = train_step(state, batch, etf)
      step += 1
      stop.mark_trained()
      sums = out if sums is None else add(sums, out)
      n_sum += 1
      progress.step()
      if step % config.log_every_steps == 0 or step == total:
        scalars = {k: float(np.mean(jax.device_get(v))) / n_sum
                   for k, v in sums.items()}
        scalars["lr"] = float(np.mean(jax.device_get(out["lr"])))  # current
        sums, n_sum = None, 0
        if not all(np.isfinite(v) for v in scalars.values()):
          bad = ", ".join(k for k, v in scalars.items() if not np.isfinite(v))
          raise _diverged(step, f"the training metrics ({bad}) are", config,
                          checkpointer.latest_step())
        line, ips = progress.line(step, {k: scalars[k] for k in
                                         ("loss", "lr", "train_acc")})
        say(line)
        writer.write(step, "train", dict(scalars, images_per_sec=ips))
      if step % eval_every == 0 or step == total:
        evaluate(step)
      if step % ckpt_every == 0 or step == total:
        save(step)
      if stop.requested(step) and step < total:
        save(step)
        raise stop.stopped(step, str(checkpointer.directory))
  finally:
    progress.close()

  # ----------------------------------------------------------- results
  if start == total and not history:
    run_eval(step)
  results = _results(config, train_input, history, s)
  # The kernels that ran (and, after an accepted change, those before).
  results.update(kernel_record)
  results["provenance"] = dict(
      provenance.describe(jax.devices()),
      wall_s=round(wall_before + time.perf_counter() - t_start, 1),
      resumes=resumes)
  if reporting.is_chief():
    ckpt_lib.write_json_atomic(results_path, results)
  f = results["final"]
  say(f"done: final top1 {f['top1']:.2f} (head {f['head']:.2f} / medium "
      f"{f['medium']:.2f} / tail {f['tail']:.2f}), best top1 "
      f"{results['best']['top1']:.2f} at epoch {results['best']['epoch']:g}; "
      f"{results_path}")
  writer.close()
  checkpointer.close()
  best.close()
  return results


def _results(config, train_input, history, num_replicas) -> dict[str, Any]:
  """The `results.json` record: final and best blocks (mean over seeds)."""
  per_seed = []
  for r in range(num_replicas):
    evals = [(h["epoch"], h["test"][r]) for h in history]
    final_epoch, final = evals[-1]
    best_epoch, best = max(evals, key=lambda e: e[1]["top1"])
    per_seed.append({"final": dict(final, epoch=final_epoch),
                     "best": dict(best, epoch=best_epoch)})
  final, final_std = _aggregate([p["final"] for p in per_seed])
  best, best_std = _aggregate([p["best"] for p in per_seed])
  out = {
      "config": ckpt_lib.config_to_dict(config),
      "train_counts": [int(c) for c in train_input.counts],
      "num_train_examples": int(train_input.num_examples),
      "num_seeds": num_replicas,
      "class_groups": {"note": train_input.groups_note,
                       **{k: list(v) for k, v in (
                           {**train_input.info.class_groups,
                            **train_input.extra_groups}).items()}},
      "final": final,
      "best": best,
      # Every evaluation, per seed: the headline numbers and per-class
      # accuracy (for learning curves of single classes).
      "history": [{"epoch": h["epoch"], "step": h["step"],
                   **{k: [m.get(k) for m in h["test"]]
                      for k in ("top1", "head", "medium", "tail",
                                "per_class")}} for h in history],
  }
  if num_replicas > 1:
    out.update(final_std=final_std, best_std=best_std, per_seed=per_seed)
  return out
