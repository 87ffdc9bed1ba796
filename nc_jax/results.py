"""The `results.json` record of a finished run, assembled in one place.

Its blocks: `config`; `train_counts`, `num_train_examples`, `num_seeds`
and `class_groups` (with a note on how the groups were formed); `final`
(the last evaluation) and `best` (the best test top-1 over the
evaluations, test-selected as the reference reports it), each the mean
over seeds with its `epoch`; `history` (every evaluation, per seed: top-1,
head / medium / tail and per-class accuracy); with several seeds also
`final_std`, `best_std` and `per_seed`; the kernels that ran (`resolved`,
and `resolved_before` after an accepted change); and `provenance`
(versions, commit, devices, wall time, resumes, this process's seconds
by phase).
"""

from __future__ import annotations

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

from typing import Any, Mapping, Sequence

from ml_collections import ConfigDict

from nc_jax import run_config
from nc_jax import evaluators

HISTORY_KEYS = ("top1", "head", "medium", "tail", "per_class")


def assemble(config: ConfigDict, train_input, history: Sequence[dict],
             num_replicas: int, *, kernel_record: Mapping[str, Any],
             provenance: Mapping[str, Any]) -> dict[str, Any]:
  """The `results.json` record.

  Args:
    config: the run's config.
    train_input: the run's `data.TrainInput` (counts, groups).
    history: the evaluations, `{"step", "epoch", "test": [per-seed
      metrics]}` each, in order.
    num_replicas: S.
    kernel_record: `run_config.record`'s record keys.
    provenance: `provenance.describe(...)` plus wall time, resumes and
      seconds by phase.
  """
  per_seed = []
  for r in range(num_replicas):
    evals = [(h["epoch"], h["test"][r]) for h in history]
    final_epoch, final = evals[-1]
    best_epoch, best = max(evals, key=lambda e: e[1]["top1"])
    per_seed.append({"final": dict(final, epoch=final_epoch),
                     "best": dict(best, epoch=best_epoch)})
  final, final_std = evaluators.aggregate([p["final"] for p in per_seed])
  best, best_std = evaluators.aggregate([p["best"] for p in per_seed])
  if num_replicas > 1:  # `best` is the mean of each seed's own best
    best["epochs"] = [p["best"]["epoch"] for p in per_seed]
  groups = {**train_input.info.class_groups, **train_input.extra_groups}
  out = {
      "config": run_config.config_to_dict(config),
      "train_counts": [int(c) for c in train_input.counts],
      "num_train_examples": int(train_input.num_examples),
      "num_seeds": num_replicas,
      "class_groups": {"note": train_input.groups_note,
                       **{k: list(v) for k, v in groups.items()}},
      "final": final,
      "best": best,
      # Every evaluation, per seed: the headline numbers and per-class
      # accuracy (for learning curves of single classes).
      "history": [{"epoch": h["epoch"], "step": h["step"],
                   **{k: [m.get(k) for m in h["test"]]
                      for k in HISTORY_KEYS}} for h in history],
  }
  if num_replicas > 1:
    out.update(final_std=final_std, best_std=best_std, per_seed=per_seed)
  out.update(kernel_record)
  out["provenance"] = dict(provenance)
  return out


def _pct(value: float | None) -> str:
  """A percentage, or n/a for a group without classes or test images."""
  return "n/a" if value is None else f"{value:.2f}"


def summary_line(results: Mapping[str, Any], path: str) -> str:
  """The one line a finished run ends with."""
  f, b = results["final"], results["best"]
  groups = ""
  if any(g in f for g in ("head", "medium", "tail")):
    groups = (f" (head {_pct(f.get('head'))} / medium {_pct(f.get('medium'))}"
              f" / tail {_pct(f.get('tail'))})")
  if b.get("epoch") is not None:
    at = f"at epoch {b['epoch']:g}"
  else:
    at = ("(the seeds' mean, at epochs "
          f"{', '.join(f'{e:g}' for e in b['epochs'])})")
  return (f"done: final top1 {_pct(f['top1'])}{groups}, best top1 "
          f"{_pct(b['top1'])} {at}; {path}")
