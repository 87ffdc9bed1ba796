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
import pathlib
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from nc_jax import best as best_lib
from nc_jax import builder as builder_lib
from nc_jax import checkpoint as ckpt_lib
from nc_jax import data as data_lib
from nc_jax import dispatch
from nc_jax import evaluators as evaluators_lib
from nc_jax import pretrained as pretrained_lib
from nc_jax import preemption
from nc_jax import provenance
from nc_jax import reporting
from nc_jax import results as results_lib
from nc_jax import run_setup
from nc_jax import steps as steps_lib
from nc_jax import validation
from nc_jax import workdir as workdir_lib
from nc_jax.reporting import say

DTYPES = builder_lib.DTYPES
SCALAR_KEYS = ("top1", "top5", "head", "medium", "tail", "ece", "loss")


# The checks live in `validation`; its error is the run's.
ConfigError = validation.ConfigError


def train_and_evaluate(config: ConfigDict, workdir: str | pathlib.Path, *,
                       validated: Any = None) -> dict[str, Any]:
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
  started = time.perf_counter()
  try:
    workdir = workdir_lib.resolve_path(workdir)
  except ValueError as e:  # empty, or a URL
    raise ConfigError(str(e)) from None
  with contextlib.ExitStack() as held:
    stop = held.enter_context(preemption.StopSignals(
        grace_seconds=config.get("preemption_grace_seconds", 25.0),
        multi_process=jax.process_count() > 1, say=say))
    # `validated`: the `kernels.Layers` of a caller that has validated this
    # config already (`nc-jax-paper-table` checks every cell first).
    layers = validated or validation.validate_config(config)
    if (workdir / "results.json").is_file():
      return run_setup.finished_results(config, workdir)
    run_setup.check_workdir(config, workdir, layers)
    saved = ckpt_lib.saved_steps(workdir / "checkpoints")
    if saved:  # a stop before the restore says where the rerun resumes
      stop.mark_saved(saved[-1])
    setup = run_setup.set_up(config, workdir, layers, held)
    setup.started = started
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


class _Loop:
  """The run after set-up: restore, train, evaluate, checkpoint, finish."""

  def __init__(self, setup: run_setup.Setup, stop: preemption.StopSignals):
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
    # Where this process's time went (results.json's provenance.seconds).
    self.seconds = {"set_up": 0.0,
                    "first_dispatch": 0.0, "loop": 0.0, "evaluation": 0.0,
                    "checkpoints": 0.0}

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
    self.seconds["evaluation"] += time.perf_counter() - t

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
    self.seconds["checkpoints"] += time.perf_counter() - t

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
    self.seconds["set_up"] = time.perf_counter() - self.setup.started
    step = self.start
    k = int(config.get("steps_per_dispatch", 1))
    t_loop = time.perf_counter()
    try:
      if (0 < step and (step % eval_every == 0 or step == total)
          and not any(h["step"] == step for h in self.history)):
        self.evaluate(step)  # a stop interrupted it before the checkpoint
      # Chunks of up to k steps that end at every event (nc_jax.dispatch);
      # per-step metrics summed on device over the log interval (no host
      # sync per step); the logged values are interval means.
      chunks = dispatch.plan(step, total, k, (config.log_every_steps,
                                              eval_every, ckpt_every))
      runner = dispatch.Runner(self.built, self.setup.train_input, chunks, k)
      sums, n_sum = None, 0
      for first, n in chunks:
        t = time.perf_counter()
        self.state, sums, out = runner.run(self.state, n, sums)
        if first == self.start:  # tracing and compiling, then dispatch
          self.seconds["first_dispatch"] = time.perf_counter() - t
        step = first + n
        self.at_step = step
        self.stop.mark_trained()
        n_sum += n
        self.progress.step(n)
        stop = dispatch.stop_requested(self.stop.requested, first, step)
        if step % config.log_every_steps == 0 or step == total:
          self._log(step, sums, n_sum, out)
          sums, n_sum = None, 0
        if step % eval_every == 0 or step == total:
          self.evaluate(step)
        if step % ckpt_every == 0 or step == total:
          self.save(step)
        if stop and step < total:
          self.save(step)
          raise self.stop.stopped(step, str(self.checkpointer.directory))
    finally:
      self.progress.close()
      self.seconds["loop"] = time.perf_counter() - t_loop

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

  def _phase_seconds(self) -> dict[str, float]:
    """This process's seconds by phase: set-up (checks, data, model,
    restore), the first dispatch (tracing and compiling the step), the
    training loop, and of that loop the evaluations and checkpoints (each
    after waiting for the steps queued before it, which count as
    training); `training` is the loop less those three."""
    s = dict(self.seconds)
    s["training"] = (s["loop"] - s["first_dispatch"] - s["evaluation"]
                     - s["checkpoints"])
    return {k: round(v, 3) for k, v in s.items()}

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
            resumes=self.resumes, seconds=self._phase_seconds()))
    if reporting.is_chief():
      workdir_lib.write_json_atomic(path, out)
    say(results_lib.summary_line(out, str(path)))
    self.close()
    return out
