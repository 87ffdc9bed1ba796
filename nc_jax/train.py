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

import json
import math
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
from nc_jax.data.archive import resolve_data_dir
from nc_jax import metrics as metrics_lib
from nc_jax import models
from nc_jax import nc_metrics
from nc_jax import optim
from nc_jax import provenance
from nc_jax import reporting
from nc_jax import sharding
from nc_jax import steps as steps_lib
from nc_jax.reporting import say

DTYPES = builder_lib.DTYPES
SCALAR_KEYS = ("top1", "top5", "head", "medium", "tail", "ece", "loss")


class ConfigError(ValueError):
  """The config or its inputs cannot work; the message names the fix."""


def validate_config(config: ConfigDict) -> None:
  """Stops a bad config before any work, with one message naming the fix.

  Raises:
    ConfigError: wrapping the first problem found.
  """
  try:
    _validate(config)
  except ConfigError:
    raise
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e


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
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"compute_dtype must be one of {list(DTYPES)}, got "
                     f"{config.compute_dtype!r}.")
  if config.backbone in models.BACKBONES:
    # Raises here, before any work, for a bad conv_impl or one that cannot
    # run on this machine.
    models.backbone_conv_impl(config.backbone, config.conv_impl,
                              DTYPES[config.compute_dtype])
  if config.loss.dr_form not in ("reference", "paper"):
    raise ValueError("loss.dr_form must be 'reference' or 'paper', got "
                     f"{config.loss.dr_form!r}.")
  if config.loss.dr_form == "paper" and config.loss.given_ew:
    raise ValueError(
        "loss.dr_form='paper' uses fixed lengths e_w, e_h; the per-batch "
        "class lengths belong to the reference form. Set "
        "--config.loss.given_ew=False (or keep dr_form='reference').")
  if config.mixup_alpha < 0:
    raise ValueError(f"mixup_alpha must be >= 0 (0 = off), got "
                     f"{config.mixup_alpha}.")
  if config.num_seeds < 1:
    raise ValueError(f"num_seeds must be >= 1, got {config.num_seeds}.")
  if config.seeds_mode not in steps_lib.REPLICA_MODES:
    raise ValueError(f"seeds_mode must be one of {steps_lib.REPLICA_MODES}, "
                     f"got {config.seeds_mode!r}.")
  if config.pipeline not in data_lib.PIPELINES:
    raise ValueError(f"pipeline must be one of {data_lib.PIPELINES}, got "
                     f"{config.pipeline!r}.")
  for name in ("num", "eval_every", "checkpoint_every"):
    optim.duration_steps(config, name, 1)  # both-set conflicts
  if optim.duration_steps(config, "num", 1) is None:
    raise ValueError("No training length: set num_epochs or num_steps "
                     "(epochs=N or steps=N in the config argument).")
  data_lib.check_data_dir(config.dataset, resolve_data_dir(config.data_dir))


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
               groups, classifier_fn, with_nc: bool):
    self.fn, self.input = eval_fn, eval_input
    self.s, self.k, self.groups = num_replicas, num_classes, groups
    self.classifier_fn, self.with_nc = classifier_fn, with_nc
    self._nc_update = jax.jit(nc_metrics.update_stats)

  def __call__(self, state, etf) -> list[dict]:
    accs = [metrics_lib.EvalAccumulator() for _ in range(self.s)]
    nc_stats = None
    for batch in self.input.iterate():
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
  """Trains and evaluates per `config` in `workdir`; returns results.json."""
  validate_config(config)
  # Orbax needs absolute paths; keep URLs (gs://...) as they are.
  workdir = (pathlib.Path(workdir) if "://" in str(workdir)
             else pathlib.Path(workdir).expanduser().resolve())
  results_path = workdir / "results.json"
  if results_path.exists():
    say(f"{workdir} already holds a finished run ({results_path}); nothing to "
        "do. Use another --workdir to train again.")
    return json.loads(results_path.read_text())
  mesh = sharding.make_mesh()
  try:
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_lib.check_or_write_config(workdir, config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  s = int(config.num_seeds)

  # ---------------------------------------------------------------- data
  t0 = time.perf_counter()
  data_dir = resolve_data_dir(config.data_dir)
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
  info = train_input.info
  groups = {**info.class_groups, **train_input.extra_groups}
  say(f"data: {config.dataset}-LT r={config.imb_factor} ({config.imb_profile}) "
      f"{train_input.num_examples} train images, per class "
      f"{list(train_input.counts)}; {eval_input.num_examples} test images "
      f"[{time.perf_counter() - t0:.1f}s, pipeline={config.pipeline}]")
  if train_input.subset is not None and reporting.is_chief():
    ckpt_lib.write_json_atomic(workdir / "train_subset.json",
                               train_input.subset)

  spe = train_input.steps_per_epoch
  total = optim.duration_steps(config, "num", spe)
  eval_every = optim.duration_steps(config, "eval_every", spe, default=total)
  ckpt_every = optim.duration_steps(config, "checkpoint_every", spe,
                                    default=total)

  # --------------------------------------------------------------- model
  try:
    built = builder_lib.build(
        config, num_classes=info.num_classes, image_shape=info.image_shape,
        mean=info.mean, std=info.std, class_counts=train_input.counts,
        steps_per_epoch=spe, total_steps=total, mesh=mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  method, model, etf = built.method, built.model, built.etf
  train_step, eval_step = built.train_step, built.eval_step
  state = built.init_state()
  n_params = sum(x.size for x in jax.tree.leaves(state.params)) // s
  replicas = f"{s} replica(s)"
  if s > 1:
    replicas += f" ({steps_lib.resolve_replica_mode(config.seeds_mode)})"
  convs = models.backbone_conv_impl(config.backbone, config.conv_impl,
                                    DTYPES[config.compute_dtype])
  say(f"model: {config.backbone} + {method.head} head ({config.method}), "
      f"{n_params:,} trainable parameters, feature dim {model.feature_dim}; "
      f"{convs} convolutions; {replicas}; mesh {mesh.devices.size} "
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
  start = int(start or 0)

  classifier_fn = lambda state, etf: built.classifiers(state)  # noqa: E731
  evaluator = _Evaluator(eval_step, eval_input, num_replicas=s,
                         num_classes=info.num_classes, groups=groups,
                         classifier_fn=classifier_fn,
                         with_nc=bool(config.nc_metrics))
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
                                 classifier_fn=classifier_fn, with_nc=True)

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

  # ------------------------------------------------------------ train
  say(f"training {total} steps ({total / spe:g} epochs of {spe} steps, batch "
      f"{config.batch_size}) from step {start}; workdir {workdir}")
  progress = reporting.Progress(total_steps=total, steps_per_epoch=spe,
                                batch_size=config.batch_size, start_step=start,
                                eval_every=eval_every)
  step = start
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
      sums = out if sums is None else add(sums, out)
      n_sum += 1
      progress.step()
      if step % config.log_every_steps == 0 or step == total:
        scalars = {k: float(np.mean(jax.device_get(v))) / n_sum
                   for k, v in sums.items()}
        scalars["lr"] = float(np.mean(jax.device_get(out["lr"])))  # current
        sums, n_sum = None, 0
        if not all(np.isfinite(v) for v in scalars.values()):
          raise FloatingPointError(
              f"Non-finite training metrics around step {step}: {scalars}. "
              "The last good checkpoint is kept; lower optim.lr or check the "
              "data.")
        line, ips = progress.line(step, {k: scalars[k] for k in
                                         ("loss", "lr", "train_acc")})
        say(line)
        writer.write(step, "train", dict(scalars, images_per_sec=ips))
      if step % eval_every == 0 or step == total:
        t = time.perf_counter()
        run_eval(step)
        progress.exclude(time.perf_counter() - t, evaluation=True)
      if step % ckpt_every == 0 or step == total:
        t = time.perf_counter()
        checkpointer.save(step, state, {
            "history": history, "resumes": resumes,
            "wall_s": wall_before + time.perf_counter() - t_start})
        progress.exclude(time.perf_counter() - t)
  finally:
    progress.close()

  # ----------------------------------------------------------- results
  if start == total and not history:
    run_eval(step)
  results = _results(config, train_input, history, s)
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
