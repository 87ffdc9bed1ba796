"""Opening a trained run: a workdir's checkpoint or an exported file.

`open_source(path, which)` returns a `RunSource`: the run's config, the model
and its compiled eval step assembled by `builder.build_model` (the one way
a model is made), and the restored weights (only the parameters and the
BatchNorm statistics; the optimiser state is never read). `nc_jax.runs`
builds its `Run`, `export` and `evaluate` on it. Nothing here invents a
training fact: class counts and names come from the workdir's files or the
exported file, and are None where neither has them.
"""

from __future__ import annotations

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

import dataclasses
import json
import os
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from nc_jax import builder as builder_lib
from nc_jax import best as best_lib
from nc_jax import checkpoint as ckpt_lib
from nc_jax import run_config
from nc_jax import data as data_lib
from nc_jax import models
from nc_jax import sharding
from nc_jax import steps as steps_lib

FORMAT = "nc_jax.run"
FORMAT_VERSION = 1
WHICH = ("final", "best")


class RunError(ckpt_lib.CheckpointError):
  """A workdir or file that cannot be loaded; the message names the fix."""


# ------------------------------------------------------------------ sources


@dataclasses.dataclass
class RunSource:
  """A restored checkpoint, all replicas.

  `params`, `model_state` and `etf` are stacked over a leading replica
  axis when `num_replicas > 1`; `state` and `etf_device` are what
  `eval_step` takes.
  """
  path: pathlib.Path
  kind: str  # "workdir" or "file"
  config: ConfigDict
  which: str
  step: int
  epoch: float | None
  model: models.ImageClassifier
  step_config: steps_lib.StepConfig
  num_replicas: int
  state: Any
  etf: np.ndarray | None
  etf_device: Any
  eval_step: Any
  mesh: Any
  class_counts: list[int] | None
  class_names: list[str] | None
  class_groups: dict[str, list[int]]
  info: data_lib.DatasetInfo
  forward: Any = None


def parse_which(which: str | int) -> str | int:
  """"final", "best" or a step number (int or digits) -> "final"/"best"/int.

  Raises:
    ValueError: anything else.
  """
  if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
    if which < 0:
      raise ValueError(f"which={which}: a step number is >= 0.")
    return int(which)
  if isinstance(which, str):
    w = which.strip().lower()
    if w in WHICH:
      return w
    if w.isdigit():
      return int(w)
  raise ValueError(f"which={which!r} is not 'final', 'best' or a step "
                   "number (e.g. 19200).")


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _config_from_dict(d: dict) -> ConfigDict:
  config = ConfigDict(run_config.with_missing_fields(d))
  config.lock()
  return config


def _class_facts(wd: pathlib.Path, info) -> tuple[list | None, list | None,
                                                  dict]:
  """(train counts, class names, class groups) from the workdir's files."""
  results = _read_json(wd / "results.json") or {}
  subset = _read_json(wd / "train_subset.json") or {}
  counts = results.get("train_counts")
  if counts is None and subset.get("images") is not None:
    counts = [len(ids) for ids in subset["images"]]
  names = subset.get("classes")
  groups = {k: [int(c) for c in v]
            for k, v in (results.get("class_groups") or {}).items()
            if k != "note"}
  if not groups:
    groups = {k: list(v) for k, v in info.class_groups.items()}
  return counts, (list(names) if names else None), groups


def _pick_checkpoint(wd: pathlib.Path, which: str | int
                     ) -> tuple[int, str, dict | None]:
  """(step, label, best) of `which` in workdir `wd`; `best` is
  `best.read_best`'s dict when the best file holds it, else None
  (the step is in `checkpoints/`)."""
  steps = ckpt_lib.saved_steps(wd / "checkpoints")
  best = best_lib.read_best(wd / "best")
  best_step = None if best is None else int(best["record"]["step"])
  finished = (wd / "results.json").is_file()
  if which == "final":
    if not steps and finished:
      raise RunError(
          f"{wd} is a finished run without its checkpoints (checkpoints/ is "
          "missing or empty: copied without them?). Pass the workdir the run "
          "trained in, or a file written by runs.export"
          + (", or use which='best' (--which best)." if best is not None
             else "."))
    if not steps:
      raise RunError(
          f"{wd} holds no checkpoint yet: the run has not reached its first "
          "checkpoint (checkpoint_every_epochs), or was stopped before. Let "
          "it train further (rerun its command to resume), or pass another "
          "workdir.")
    return steps[-1], "final" if finished else "latest", None
  if which == "best":
    if best is None:
      raise RunError(
          f"{wd} has no best checkpoint (best/{best_lib.BEST_FILE}): a run "
          "writes it at its first evaluation (and runs from before 2026-11-25 "
          "wrote none), and this one has none yet. Use --which final "
          "(which='final').")
    return best_step, "best", best
  if which in steps:
    return which, "step", None
  if which == best_step:
    return which, "step", best
  kept = sorted(set(steps) | ({best_step} if best is not None else set()))
  raise RunError(
      f"{wd} has no checkpoint at step {which}; kept steps: "
      f"{', '.join(map(str, kept)) or 'none'} (the last keep_checkpoints "
      "in checkpoints/, and the best one). Pass one of them, 'final' or "
      "'best'.")


def _abstract_weights(built: builder_lib.BuiltModel,
                      image_shape: tuple[int, int, int], mesh) -> dict:
  """`{"params", "model_state"}` as shapes (stacked over the replicas),
  replicated over `mesh`: what a checkpoint's weights are restored into."""
  def one(key):
    return steps_lib.init_variables(built.model, key, tuple(image_shape))
  s = built.num_replicas
  key = jax.ShapeDtypeStruct((2,) if s == 1 else (s, 2), jnp.uint32)
  params, model_state = jax.eval_shape(one if s == 1 else jax.vmap(one), key)
  rep = sharding.replicated_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
      {"params": params, "model_state": model_state})


def _eval_state(step: int, weights: dict, num_replicas: int
                ) -> steps_lib.TrainState:
  """A train state that holds only what evaluation reads (stacked over the
  replicas, as the eval step maps over them)."""
  steps = jnp.full((num_replicas,) if num_replicas > 1 else (), step,
                   jnp.int32)
  return steps_lib.TrainState(
      step=steps, params=weights["params"],
      model_state=weights["model_state"], opt_state=None, rng=None)


def _restore_weights(wd: pathlib.Path, step: int, best: dict | None,
                     abstract: dict) -> tuple[dict, dict]:
  """(weights, record) of the checkpoint at `step`: from `best` when given,
  else from `checkpoints/`; the optimiser state is not read."""
  if best is None:
    reader = ckpt_lib.Checkpointer(wd / "checkpoints", keep=None,
                                   read_only=True)
    try:
      return reader.restore(step, abstract, partial=True)
    finally:
      reader.close()
  try:
    weights = flax.serialization.from_state_dict(
        abstract, {k: best["state"][k] for k in abstract})
    weights = jax.tree.map(
        lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding),
        weights, abstract)
  except (ValueError, KeyError, TypeError) as e:
    raise RunError(
        f"{wd / 'best' / best_lib.BEST_FILE} does not match the model of "
        f"{wd / 'config.json'} ({type(e).__name__}: {str(e)[:200]}).") from e
  return weights, best["record"]


def _open_workdir(wd: pathlib.Path, which: str | int) -> RunSource:
  if not (wd / "config.json").is_file():
    raise RunError(
        f"{wd} has no config.json: it is not the workdir of a run of "
        "nc-jax-train, or that run stopped "
        "before it started training.")
  raw = _read_json(wd / "config.json")
  if not isinstance(raw, dict):
    raise RunError(f"{wd / 'config.json'} is not valid JSON; restore it.")
  config = _config_from_dict(raw)
  try:
    info = data_lib.dataset_info(config.dataset)
  except ValueError as e:
    raise RunError(f"{wd}: {e}") from None
  step, label, best = _pick_checkpoint(wd, which)
  counts, names, groups = _class_facts(wd, info)
  mesh = sharding.make_mesh()
  try:
    built = builder_lib.build_model(
        config, num_classes=info.num_classes, mean=info.mean, std=info.std,
        class_counts=counts, mesh=mesh, with_features=False,
        for_loading=True)
  except ValueError as e:
    raise RunError(f"{wd}: {e}") from None
  weights, record = _restore_weights(
      wd, step, best, _abstract_weights(built, info.image_shape, mesh))
  epoch = record.get("epoch")
  if epoch is None and counts is not None:
    # The train input drops the last partial batch of an epoch.
    epoch = step / max(sum(counts) // int(config.batch_size), 1)
  return RunSource(
      path=wd, kind="workdir", config=config, which=label, step=int(step),
      epoch=None if epoch is None else float(epoch), model=built.model,
      step_config=built.step_config, num_replicas=built.num_replicas,
      state=_eval_state(step, weights, built.num_replicas),
      etf=None if built.etf is None else np.asarray(built.etf),
      etf_device=built.etf, eval_step=built.eval_step, mesh=mesh,
      class_counts=counts, class_names=names, class_groups=groups, info=info)


def _open_file(path: pathlib.Path) -> RunSource:
  try:
    blob = flax.serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several types for other files
    raise RunError(f"{path} is not a file written by nc_jax.runs.export "
                   f"({type(e).__name__}). Pass a run's workdir or such a "
                   "file.") from None
  if not isinstance(blob, dict) or blob.get("format") != FORMAT:
    raise RunError(f"{path} is not a file written by nc_jax.runs.export. "
                   "Pass a run's workdir or such a file.")
  if int(blob.get("version", 0)) > FORMAT_VERSION:
    raise RunError(f"{path} has format version {blob['version']}, newer "
                   "than this nc_jax reads; update nc_jax.")
  config = _config_from_dict(json.loads(blob["config"]))
  meta = json.loads(blob["meta"])
  info = data_lib.dataset_info(config.dataset)
  info = dataclasses.replace(info, num_classes=int(meta["num_classes"]),
                             image_shape=tuple(meta["image_shape"]),
                             mean=tuple(meta["mean"]), std=tuple(meta["std"]))
  mesh = sharding.make_mesh()
  # One replica: the file holds the one `export` picked.
  one = ConfigDict(config.to_dict())
  one.num_seeds = 1
  try:
    built = builder_lib.build_model(
        one, num_classes=info.num_classes, mean=info.mean, std=info.std,
        class_counts=meta.get("class_counts"), mesh=mesh,
        with_features=False,
        for_loading=True)
  except ValueError as e:
    raise RunError(f"{path}: {e}") from None
  rep = sharding.replicated_sharding(mesh)
  weights = {"params": jax.device_put(blob["params"], rep),
             "model_state": jax.device_put(blob.get("model_state") or {},
                                           rep)}
  etf = blob.get("etf")
  etf = None if etf is None or not built.method.fixed_classifier else (
      np.asarray(etf, np.float32))
  return RunSource(
      path=path, kind="file", config=config, which=meta["which"],
      step=int(meta["step"]), epoch=meta.get("epoch"), model=built.model,
      step_config=built.step_config, num_replicas=1,
      state=_eval_state(int(meta["step"]), weights, 1), etf=etf,
      etf_device=None if etf is None else jax.device_put(etf, rep),
      eval_step=built.eval_step, mesh=mesh,
      class_counts=meta.get("class_counts"),
      class_names=meta.get("class_names"),
      class_groups={k_: list(v) for k_, v in meta["class_groups"].items()},
      info=info)


def open_source(path: str | os.PathLike, which: str | int = "final"
                ) -> RunSource:
  which = parse_which(which)
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise RunError(
        f"{p} does not exist. Pass the --workdir of a run of nc-jax-train "
        "(python -m nc_jax.cli.train) or a file written by "
        "nc_jax.runs.export.")
  p = p.resolve()
  if p.is_file():
    src = _open_file(p)
    if which not in ("final", src.step, src.which):
      raise RunError(
          f"{p} is an exported file holding one checkpoint (step {src.step}, "
          f"{src.which}); which={which!r} cannot pick another. Leave which "
          "at 'final'.")
    return src
  return _open_workdir(p, which)


__all__ = ["FORMAT", "FORMAT_VERSION", "RunError", "RunSource", "WHICH",
           "open_source", "parse_which"]
