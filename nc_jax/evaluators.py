"""Evaluators: what a run measures on a split, by name.

As in big_vision, a run's config lists its evaluators by name
(`config.evals`; the presets list "classification"), each is built from the
compiled eval step and an input, and called with the state; `EVALUATORS`
maps names to evaluator classes, and `get_evaluator` and `check_names`
raise on unknown names. Each returns one metrics dict
per replica (seed); `aggregate` turns those into the mean and std over
seeds that the logs and `results.json` report.

- "classification": top-1 and top-5 accuracy, per-class accuracy and the
  dataset's class groups (head / medium / tail), ECE (None for the fixed-
  ETF heads, see `methods.Method.calibrated`), the method's eval loss, and
  optionally the neural-collapse statistics of the features
  (`nc_jax.nc_metrics`).

Adding a metric: a class with `__call__(state, etf) -> list[dict]` (its
keys beside the others' in each evaluation record), an entry in
`EVALUATORS`, and its name in a config's `evals`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from nc_jax import metrics as metrics_lib
from nc_jax import nc_metrics


class EvalInterrupted(Exception):
  """An evaluation stopped between batches on request (`should_stop`)."""


# Where a record was taken, not a metric: never averaged.
POSITION_KEYS = ("epoch", "step")


def aggregate(per_seed: Sequence[dict]) -> tuple[dict, dict]:
  """Mean and std over seeds of each metric (per-class lists elementwise,
  nested dicts such as the "nc" block recursively, other values: seed 0's).
  A position (`POSITION_KEYS`) is kept when every seed has the same one and
  is None otherwise (the seeds' best epochs differ: their mean is no
  epoch).
  """
  mean, std = {}, {}
  for key in per_seed[0]:
    vals = [m[key] for m in per_seed]
    if key in POSITION_KEYS:
      mean[key] = vals[0] if all(v == vals[0] for v in vals) else None
    elif key == "per_class":
      arr = np.array([[np.nan if v is None else v for v in row]
                      for row in vals])
      mean[key] = [None if np.isnan(v) else float(v) for v in arr.mean(0)]
      std[key] = [None if np.isnan(v) else float(v) for v in arr.std(0)]
    elif all(isinstance(v, dict) for v in vals):
      mean[key], std[key] = aggregate(vals)
    elif all(isinstance(v, (int, float)) for v in vals):
      mean[key] = float(np.mean(vals))
      std[key] = float(np.std(vals))
    else:
      mean[key] = vals[0]
  return mean, std


class ClassificationEvaluator:
  """Runs the eval step over an `EvalInput`, per replica.

  Args:
    eval_fn: the compiled eval step, `(state, batch, etf) -> outputs`.
    eval_input: a `data.EvalInput` (every image once, with a mask).
    num_replicas: S, the seeds trained together.
    num_classes: K.
    groups: group name -> class indices.
    classifier_fn: `(state, etf) -> (d, K)` or `(S, d, K)` classifiers, for
      the neural-collapse statistics (unused without `with_nc`).
    with_nc: also compute the neural-collapse statistics.
    calibrated: False reports ECE as None.
    should_stop: asked between batches; True raises `EvalInterrupted`.
  """

  def __init__(self, eval_fn, eval_input, *, num_replicas: int,
               num_classes: int, groups: Mapping[str, Sequence[int]],
               classifier_fn: Callable[[Any, Any], Any] | None = None,
               with_nc: bool = False, calibrated: bool = True,
               should_stop: Callable[[], bool] = lambda: False):
    self.fn, self.input = eval_fn, eval_input
    self.s, self.k, self.groups = num_replicas, num_classes, groups
    self.classifier_fn, self.with_nc = classifier_fn, with_nc
    self.calibrated = calibrated
    self.should_stop = should_stop
    self._nc_update = jax.jit(nc_metrics.update_stats)

  def __call__(self, state, etf) -> list[dict]:
    """One metrics dict per replica (see `metrics.summarize`)."""
    accs = [metrics_lib.EvalAccumulator() for _ in range(self.s)]
    nc_stats = None
    for batch in self.input.iterate():
      if self.should_stop():
        raise EvalInterrupted()
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
    results = [metrics_lib.summarize(a.totals, self.groups) for a in accs]
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


EVALUATORS: dict[str, type] = {
    "classification": ClassificationEvaluator,
}


def get_evaluator(name: str) -> type:
  """The evaluator class registered as `name`; ValueError naming the valid
  ones."""
  check_names((name,))
  return EVALUATORS[name]


def check_names(names: Sequence[str]) -> None:
  """Raises ValueError, naming the valid ones, for an unknown or repeated
  evaluator name or an empty list (`config.evals`)."""
  names = tuple(names)
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown or not names or len(set(names)) != len(names):
    raise ValueError(
        f"evals={names!r} must name each evaluator once, at least one, from "
        f"{sorted(EVALUATORS)}; e.g. --config.evals=\"('classification',)\".")
