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

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

import contextlib
import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from nc_jax import best as best_lib
from nc_jax import builder as builder_lib
from nc_jax import checkpoint as ckpt_lib
from nc_jax import data as data_lib
from nc_jax import evaluators as evaluators_lib
from nc_jax.data.archive import resolve_data_dir
from nc_jax import optim
from nc_jax import pretrained as pretrained_lib
from nc_jax import preemption
from nc_jax import provenance
from nc_jax import reporting
from nc_jax import results as results_lib
from nc_jax import run_config
from nc_jax import sharding
from nc_jax import steps as steps_lib
from nc_jax import validation
from nc_jax import workdir as workdir_lib
from nc_jax.reporting import say

DTYPES = builder_lib.DTYPES
SCALAR_KEYS = ("top1", "top5", "head", "medium", "tail", "ece", "loss")


# The checks live in `validation`; its error is the run's.
ConfigError = validation.ConfigError


@dataclasses.dataclass
class _Setup:
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


def train_and_evaluate(config: ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, Any]:
  """Trains and evaluates per `config` in `workdir`; returns results.json.

  Phases: set up (checks, data, workdir, model), restore, train (with the
  evaluations and checkpoints on their schedule), finish (results.json).
  Nothing is written into `workdir` before the config and the data are
  known to be good (checked, then loaded). The run holds the workdir's lock
  (`nc_jax.workdir`) until it returns or raises. A SIGTERM/SIGINT ends it
  at a step boundary after a checkpoint (`nc_jax.preemption`).

  Raises:
    ConfigError: the config, the data or the workdir cannot work (the
      message names the fix).
    checkpoint.CheckpointError: a checkpoint exists but cannot be restored.
    preemption.Preempted: stopped by a signal after saving a checkpoint.
    preemption.Diverged: training produced non-finite numbers.
  """
  with contextlib.ExitStack() as held:
    stop = held.enter_context(preemption.StopSignals(
        grace_seconds=config.get("preemption_grace_seconds", 25.0),
        multi_process=jax.process_count() > 1, say=say))
    layers = validation.validate_config(config)
    workdir = workdir_lib.resolve_path(workdir)
    results_path = workdir / "results.json"
    if results_path.is_file():
      say(f"{workdir} already holds a finished run ({results_path}); nothing "
          "to do. Use another --workdir to train again.")
      return json.loads(results_path.read_text())
    _check_workdir(config, workdir, layers)
    setup = _set_up(config, workdir, layers, held)
    loop = _Loop(setup, stop)
    held.callback(loop.close)  # before the lock and the signal handlers
    try:
      loop.restore()
      loop.train()
      return loop.finish()
    except OSError as e:
      if not preemption.is_no_space(e):
        raise
      raise loop.no_space(e) from None


def _check_workdir(config: ConfigDict, workdir: pathlib.Path,
                   layers: Any) -> None:
  """The workdir can take this run (read-only): not a file or a folder of
  something else, not a checkpointed run of another config or other
  layers, not held by a live run; and a fresh run has its pretrained file.
  """
  try:
    workdir_lib.check_target(workdir, lambda wd: run_config.check_resume(
        wd, config, layers.record(), why=layers.note))
    if "://" not in str(workdir):
      workdir_lib.on_chief(lambda: workdir_lib.check_free(workdir),
                           "use the workdir")
    # A resume restores its checkpoint: only a fresh run needs the file.
    if not ckpt_lib.has_checkpoint(workdir):
      pretrained_lib.check_request(config)
  except (ValueError, workdir_lib.WorkdirLocked) as e:
    raise ConfigError(str(e)) from e


def _load_data(config: ConfigDict, mesh) -> tuple[str | None, Any, Any]:
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


def _set_up(config: ConfigDict, workdir: pathlib.Path, layers: Any,
            held: contextlib.ExitStack) -> _Setup:
  """Loads the data, checks the run's length, builds the model, then claims
  the workdir and writes its config."""
  mesh = sharding.make_mesh()
  data_dir, train_input, eval_input = _load_data(config, mesh)
  spe = train_input.steps_per_epoch
  # `request` is what config.json records and a resume compares; `config`
  # the schedule this run trains (scaled to a run shorter than its recipe),
  # what results.json records.
  request = config
  config, total, note = validation.validate_length(request, spe)
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
    if "://" not in str(workdir):
      workdir_lib.on_chief(
          lambda: held.enter_context(workdir_lib.hold(workdir)),
          "take the workdir's lock")
    fresh = not ckpt_lib.has_checkpoint(workdir)
    kernel_record = run_config.record(workdir, request, layers.record(),
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

  return _Setup(
      config, workdir, mesh, data_dir, train_input, eval_input, spe, total,
      optim.duration_steps(config, "eval_every", spe, default=total),
      optim.duration_steps(config, "checkpoint_every", spe, default=total),
      kernel_record, layers, built)


class _Loop:
  """The run after set-up: restore, train, evaluate, checkpoint, finish."""

  def __init__(self, setup: _Setup, stop: preemption.StopSignals):
    self.setup, self.stop = setup, stop
    config, built = setup.config, setup.built
    self.config, self.spe = config, setup.steps_per_epoch
    self.total = setup.total
    self.s = int(config.num_seeds)
    self.state = built.init_state()
    n_params = sum(x.size for x in jax.tree.leaves(self.state.params)) // self.s
    replicas = f"{self.s} replica(s)"
    if self.s > 1:
      replicas += f" ({steps_lib.resolve_replica_mode(config.seeds_mode)})"
    say(f"model: {config.backbone} + {built.method.head} head "
        f"({config.method}), {n_params:,} trainable parameters, feature dim "
        f"{built.model.feature_dim}; {setup.layers.describe()}; {replicas}; mesh "
        f"{setup.mesh.devices.size} device(s) over {jax.process_count()} "
        f"process(es), backend {jax.default_backend()}")
    self.checkpointer = ckpt_lib.Checkpointer(setup.workdir / "checkpoints",
                                              keep=config.keep_checkpoints)
    self.writer = reporting.MetricWriter(setup.workdir)
    self.history: list[dict] = []
    # Wall time and restarts accumulate over the run's processes.
    self.t_start, self.wall_before, self.resumes = time.perf_counter(), 0.0, 0
    self.start = self.at_step = 0
    self.evaluators = self._make_evaluators()

  def _make_evaluators(self) -> dict[str, list[Any]]:
    """Split -> the evaluators `config.evals` names, built on that split:
    the test set, and the (unaugmented) training subset when
    `nc_train_metrics` asks for its neural-collapse statistics."""
    setup, config, built = self.setup, self.config, self.built
    info = setup.train_input.info
    groups = {**info.class_groups, **setup.train_input.extra_groups}
    common = dict(num_replicas=self.s, num_classes=info.num_classes,
                  groups=groups, calibrated=built.method.calibrated,
                  classifier_fn=lambda state, etf: built.classifiers(state),
                  should_stop=self.stop.pending)
    kinds = [evaluators_lib.get_evaluator(n) for n in config.evals]
    out = {"test": [make(built.eval_step, setup.eval_input,
                         with_nc=bool(config.nc_metrics), **common)
                    for make in kinds]}
    if config.nc_metrics and config.nc_train_metrics:
      train_eval_input = data_lib.make_eval_input(
          config.dataset, data_dir=setup.data_dir,
          batch_size=config.eval_batch_size, mesh=setup.mesh,
          split="train_lt", imb_factor=config.imb_factor,
          profile=config.imb_profile, selection_seed=config.selection_seed,
          options=data_lib.options_of(config.dataset, config))
      out["train"] = [make(built.eval_step, train_eval_input, with_nc=True,
                           **common) for make in kinds]
    return out

  def _evaluate_split(self, split: str) -> list[dict]:
    """Per replica, the metrics of every evaluator of `split`, merged."""
    per_seed = [{} for _ in range(self.s)]
    for evaluator in self.evaluators[split]:
      for merged, metrics in zip(per_seed, evaluator(self.state,
                                                     self.built.etf)):
        merged.update(metrics)
    return per_seed

  @property
  def built(self) -> builder_lib.Built:
    return self.setup.built

  # ------------------------------------------------------------ restore
  def restore(self) -> None:
    """Continues from the newest checkpoint in the workdir, if any; a run
    that starts afresh takes its backbone from `config.pretrained` when
    given (`pretrained.into_state`)."""
    had_checkpoint = self.checkpointer.latest_step() is not None
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=x.sharding), self.state)
    # A damaged checkpoint is set aside with a warning, and the one before
    # it restored; one of another model stops the run (CheckpointError).
    start, state, record = self.checkpointer.restore_newest(abstract,
                                                            warn=say)
    if start is None and had_checkpoint:
      self.writer.truncate_after(0)  # every checkpoint was set aside
    if start is not None:
      self.state = state
      self.history = record.get("history", [])
      self.wall_before = float(record.get("wall_s", 0.0))
      self.resumes = int(record.get("resumes", 0)) + 1
      self.writer.truncate_after(start)
      say(f"resumed from the checkpoint at step {start} "
          f"(epoch {start / self.spe:.2f}) in {self.checkpointer.directory}")
      self.stop.mark_saved(start)
    elif self.built.pretrained:
      try:
        self.state = pretrained_lib.into_state(
            self.built.pretrained, self.state, num_replicas=self.s)
      except ValueError as e:  # a file that does not fit the backbone
        raise ConfigError(str(e)) from e
      say(f"backbone: pretrained weights from {self.built.pretrained}")
    self.start = self.at_step = int(start or 0)
    # The state of the best evaluation (mean test top-1), in workdir/best.
    self.best = best_lib.BestCheckpoint(self.setup.workdir / "best",
                                        history=self.history,
                                        start_step=self.start, warn=say)

  # ----------------------------------------------------------- evaluate
  def _run_evaluators(self, step: int) -> None:
    """Evaluates at `step`, logs the line and the metrics record."""
    epoch = step / self.spe
    t_eval = time.perf_counter()
    per_seed = self._evaluate_split("test")
    entry = {"step": step, "epoch": epoch, "test": per_seed}
    if "train" in self.evaluators:
      entry["train"] = self._evaluate_split("train")
    self.history.append(entry)
    mean, _ = evaluators_lib.aggregate(per_seed)
    seconds = time.perf_counter() - t_eval
    say(reporting.eval_line(round(epoch, 2), "test", mean)
        + f" [{seconds:.1f}s]")
    scalars = {k: mean[k] for k in SCALAR_KEYS if mean.get(k) is not None}
    scalars["eval_seconds"] = seconds
    for split in ("test", "train"):
      if split in entry and "nc" in entry[split][0]:
        nc_mean, _ = evaluators_lib.aggregate([m["nc"] for m in entry[split]])
        scalars.update({f"nc_{split}/{k}": v for k, v in nc_mean.items()})
        say(f"  nc {split}: " + " ".join(
            f"{k} {v:.4f}" for k, v in nc_mean.items()
            if k in ("nc1", "cos_mean_h", "self_duality", "minority_cos_w",
                     "minority_cos_h")))
    self.writer.write(step, "eval", scalars)

  def evaluate(self, step: int) -> None:
    """The evaluation at `step`, and the best checkpoint; a stop request
    during it saves the checkpoint at `step` (the rerun evaluates it)."""
    # Dispatch is asynchronous: wait for the queued steps first, or their
    # compute would be timed (and excluded) as evaluation.
    jax.block_until_ready(self.state)
    t = time.perf_counter()
    try:
      self._run_evaluators(step)
    except evaluators_lib.EvalInterrupted:
      self.save(step)
      raise self.stop.stopped(step, str(self.checkpointer.directory)) from None
    self._check_finite(step)
    self.best.update(step, self.state, self.history[-1])
    self.progress.exclude(time.perf_counter() - t, evaluation=True)

  # --------------------------------------------------------- checkpoint
  def _check_finite(self, step: int) -> None:
    if not preemption.all_finite(self.state):
      raise preemption.diverged(step, "the parameters or optimiser state are",
                                self.config.optim.lr,
                                self.checkpointer.latest_step())

  def save(self, step: int) -> None:
    """A checkpoint at `step`, never of a non-finite state."""
    jax.block_until_ready(self.state)
    t = time.perf_counter()
    self._check_finite(step)
    self.checkpointer.save(step, self.state, {
        "epoch": step / self.spe, "history": self.history,
        "resumes": self.resumes,
        "wall_s": self.wall_before + time.perf_counter() - self.t_start})
    self.stop.mark_saved(step)
    self.progress.exclude(time.perf_counter() - t)

  # -------------------------------------------------------------- train
  def train(self) -> None:
    """Steps from `start` to the end, with evaluations and checkpoints."""
    config, spe, total = self.config, self.spe, self.total
    eval_every, ckpt_every = self.setup.eval_every, self.setup.ckpt_every
    say(f"training {total} steps ({total / spe:g} epochs of {spe} steps, "
        f"batch {config.batch_size}) from step {self.start}; workdir "
        f"{self.setup.workdir}")
    self.progress = reporting.Progress(
        total_steps=total, steps_per_epoch=spe, batch_size=config.batch_size,
        start_step=self.start, eval_every=eval_every)
    step = self.start
    try:
      if (0 < step and (step % eval_every == 0 or step == total)
          and not any(h["step"] == step for h in self.history)):
        self.evaluate(step)  # a stop interrupted it before the checkpoint
      batches = self.setup.train_input.iterate(step)
      # Per-step metrics summed on device over the log interval (no host
      # sync per step); the logged values are interval means.
      sums, n_sum = None, 0
      add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
      while step < total:
        self.state, out = self.built.train_step(self.state, next(batches),
                                                self.built.etf)
        step += 1
        self.at_step = step
        self.stop.mark_trained()
        sums = out if sums is None else add(sums, out)
        n_sum += 1
        self.progress.step()
        if step % config.log_every_steps == 0 or step == total:
          self._log(step, sums, n_sum, out)
          sums, n_sum = None, 0
        if step % eval_every == 0 or step == total:
          self.evaluate(step)
        if step % ckpt_every == 0 or step == total:
          self.save(step)
        if self.stop.requested(step) and step < total:
          self.save(step)
          raise self.stop.stopped(step, str(self.checkpointer.directory))
    finally:
      self.progress.close()

  def _log(self, step: int, sums: dict, n_sum: int, out: dict) -> None:
    """The progress line and train record: means over the interval."""
    scalars = {k: float(np.mean(jax.device_get(v))) / n_sum
               for k, v in sums.items()}
    scalars["lr"] = float(np.mean(jax.device_get(out["lr"])))  # current
    if not all(np.isfinite(v) for v in scalars.values()):
      bad = ", ".join(k for k, v in scalars.items() if not np.isfinite(v))
      raise preemption.diverged(step, f"the training metrics ({bad}) are",
                                self.config.optim.lr,
                                self.checkpointer.latest_step())
    line, ips = self.progress.line(step, {k: scalars[k] for k in
                                          ("loss", "lr", "train_acc")})
    say(line)
    self.writer.write(step, "train", dict(scalars, images_per_sec=ips))

  # ------------------------------------------------------- faults, close
  def no_space(self, e: OSError) -> preemption.NoSpace:
    """The error of a write other than a checkpoint (metrics, the best
    state, results.json) that found the disk full at the current step."""
    name = getattr(e, "filename", None)
    what = (str(pathlib.Path(name).relative_to(self.setup.workdir))
            if name and pathlib.Path(name).is_relative_to(self.setup.workdir)
            else name or "the run's files")
    steps = ckpt_lib.saved_steps(self.checkpointer.directory)
    kept = (f"The checkpoints ({', '.join(map(str, steps))}) are intact."
            if steps else "No checkpoint was saved yet.")
    return preemption.no_space(what, self.setup.workdir, step=self.at_step,
                             needed=getattr(e, "needed", None), kept=kept)

  def close(self) -> None:
    """Closes the checkpointer's threads and the metric files (once; also
    when the run ends by an exception)."""
    for close in (self.checkpointer.close, self.writer.close,
                  self.best.close if hasattr(self, "best") else None):
      if close is not None:
        try:
          close()
        except Exception:  # pylint: disable=broad-except
          pass  # on the way out after another error: that one is reported

  # ------------------------------------------------------------- finish
  def finish(self) -> dict[str, Any]:
    """Writes results.json (process 0) and returns it."""
    path = self.setup.workdir / "results.json"
    out = results_lib.assemble(
        self.config, self.setup.train_input, self.history, self.s,
        kernel_record=self.setup.kernel_record,
        provenance=dict(
            provenance.describe(jax.devices()),
            wall_s=round(self.wall_before + time.perf_counter()
                         - self.t_start, 1),
            resumes=self.resumes))
    if reporting.is_chief():
      workdir_lib.write_json_atomic(path, out)
    say(results_lib.summary_line(out, str(path)))
    self.close()
    return out
