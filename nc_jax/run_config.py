"""The run's `config.json`: written once, compared on every restart.

A work directory holds `config.json` (the run's config, written once the
config and the data have been checked and loaded), `checkpoints/`
(`nc_jax.checkpoint`), `best/` (`nc_jax.best`), `metrics.jsonl`, TensorBoard
event files, `.lock` while a run is live (`nc_jax.workdir`) and, once
finished, `results.json`. This module owns `config.json`:

- A restart with a different config stops with the differing keys named,
  and the overrides that resume it (`check_resume`). A workdir whose run
  never saved a checkpoint has nothing to protect: a rerun with another
  config starts afresh there (`record`).
- `config.json` also records the layers the run resolved to (`resolved`,
  `nc_jax.kernels.Layers.record`). A restart that resolves to others (e.g.
  on a machine without a C++ compiler) stops, because the numbers would
  change, unless the config sets `allow_kernel_change=True`; an accepted
  change is recorded (`resolved_before`).
- A `config.json` written before a field existed is read with the field's
  old meaning (`MISSING_MEANS`); a field whose default changed says so
  (`CHANGED_DEFAULTS`).
"""

from __future__ import annotations

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib
from typing import Any

import jax
from ml_collections import ConfigDict

from nc_jax import checkpoint as ckpt_lib
from nc_jax import kernels
from nc_jax import methods as methods_lib
from nc_jax import schedule_fit
from nc_jax import workdir as workdir_lib

# Fields that may differ between a run and its resumption: they change how
# progress is shown, not what is computed; or, for the kernel requests, what
# matters is what they resolve to, which is compared on its own.
RESUMABLE_CHANGES = frozenset({"log_every_steps", "data_dir",
                               *kernels.REQUEST_FIELDS, "allow_kernel_change",
                               "preemption_grace_seconds",
                               # How many steps one call runs, not what
                               # they compute (nc_jax.dispatch).
                               "steps_per_dispatch",
                               # Read at step 0 only; a resume restores the
                               # weights from the checkpoint.
                               "pretrained", "pretrained_required"})
# Config fields added after runs were written, and what a config.json
# without them ran with: such a workdir resumes and loads unchanged.
# Flat names ("optim.x" for a nested field).
MISSING_MEANS = {"etf_rotation": "gaussian", "preemption_grace_seconds": 25.0,
                 "pretrained": None, "pretrained_required": False,
                 "crop_min_area": 0.08, "optim.backbone_lr_scale": 1.0,
                 "optim.fit_to_run": [], "optim.fit_from_epochs": None,
                 "evals": ["classification"], "steps_per_dispatch": 1,
                 # Older still (the first committed runs): none of these
                 # changed what those runs computed.
                 "allow_kernel_change": False, "norm_impl": "flax",
                 "eval_logit_adjust_tau": 0.0, "sampler": "random",
                 "loss.cb_beta": 0.9999, "loss.drw_epoch": 160,
                 "loss.la_tau": 1.0, "loss.ldam_max_margin": 0.5,
                 "loss.ldam_scale": 30.0}


def with_missing_fields(d: dict) -> dict:
  """`config.json`'s dict with the fields it predates, as they ran
  (`MISSING_MEANS`), filled in."""
  out = json.loads(json.dumps(d))  # a deep copy
  for name, value in MISSING_MEANS.items():
    *path, last = name.split(".")
    target = out
    for p in path:
      target = target.setdefault(p, {})
    target.setdefault(last, value)
  return out
# Keys of config.json that are records, not config fields.
RECORD_KEYS = ("resolved", "resolved_before")
# Fields that tell one seed of an experiment from another.
SEED_FIELDS = ("seed", "num_seeds")
# Fields of the fixed classifier: a method that learns its own reads none.
ETF_FIELDS = ("etf_rotation", "etf_seed")
KERNEL_CHANGE_FLAG = "--config.allow_kernel_change=True"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def recipe_of(config_json: dict) -> dict[str, Any]:
  """What a run computes, its seeds aside: `config.json`'s fields (flat
  names; those it predates filled in as they ran, `MISSING_MEANS`) less
  the records, the fields a resume may change (`RESUMABLE_CHANGES`),
  `SEED_FIELDS` and, for a method that learns its classifier,
  `ETF_FIELDS`; but with the name of `data_dir`'s file or folder. Runs
  with equal recipes are seeds of one experiment: the same data may sit
  at other paths on other machines, but runs on other data (a JPEG export
  of CIFAR-10 and the original release) are no seeds of one experiment."""
  fields = {k: v for k, v in config_json.items() if k not in RECORD_KEYS}
  flat = {**MISSING_MEANS, **_flatten(fields)}
  unused = ()
  if config_json.get("method") in methods_lib.METHODS and not (
      methods_lib.get_method(config_json["method"]).fixed_classifier):
    unused = ETF_FIELDS  # (whose default changed: CE's seeds still pool)
  recipe = {k: v for k, v in flat.items()
            if k not in RESUMABLE_CHANGES and k not in SEED_FIELDS
            and k not in unused}
  if flat.get("data_dir"):
    recipe["data_dir"] = pathlib.PurePath(str(flat["data_dir"])).name
  return recipe


def config_to_dict(config: ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _read_config_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(
        f"{path} is not valid JSON ({e}); the checkpoints beside it cannot be "
        "matched to a config. Restore the file, or use another "
        "--workdir.") from None


def _kernels_text(record: dict) -> str:
  return (f"{record.get('conv_impl')} convolutions and "
          f"{record.get('norm_impl')} BatchNorm")


# What a run shorter than its recipe scales (`schedule_fit`): compared
# only once the run's length is known, in the schedule the run trains.
SCHEDULE_FIELDS = (*schedule_fit.FIT_FIELDS, "optim.fit_to_run",
                   "optim.fit_from_epochs")


def check_resume(workdir: pathlib.Path, config: ConfigDict,
                 resolved: dict | None = None, *,
                 why: str | None = None, before_fit: bool = False) -> None:
  """Raises ValueError if `workdir` holds a checkpointed run of another
  config, or one that resolved to other kernels (read-only; a config
  without a checkpoint does not count).

  `config.json` records the config a run trains, its schedule scaled to
  its length (`schedule_fit`); so does `config` here, except `before_fit`
  (the request, before the data gives the length), when the schedule's
  fields wait for the comparison that `record` makes.

  Args:
    workdir: the run directory.
    config: this run's config.
    resolved: this process's implementations
      (`nc_jax.kernels.Layers.record()`), or None not to
      compare them.
    why: a note on the new ones for the message (`Layers.note`).
    before_fit: leave out `SCHEDULE_FIELDS`.
  """
  path = workdir / "config.json"
  if not path.exists() or not ckpt_lib.has_checkpoint(workdir):
    return
  old = _read_config_json(path)
  _compare(workdir, {k: v for k, v in old.items() if k not in RECORD_KEYS},
           config_to_dict(config),
           ignore=SCHEDULE_FIELDS if before_fit else ())
  before = old.get("resolved")
  if (resolved is None or before is None or before == resolved
      or config.get("allow_kernel_change")):
    return
  raise ValueError(
      f"{workdir} holds a run that used {_kernels_text(before)}; this "
      f"process would use {_kernels_text(resolved)}"
      + (f" ({why})" if why else "")
      + ", which changes the numbers from here on. Resume where the recorded "
      "kernels are available (or request them: --config.conv_impl=..., "
      f"--config.norm_impl=...), or pass {KERNEL_CHANGE_FLAG} to accept the "
      "change.")


def record(workdir: pathlib.Path, config: ConfigDict,
           resolved: dict | None = None, *,
           why: str | None = None) -> dict:
  """Writes `config.json`, or checks the existing one matches `config`
  (the config the run trains: its schedule fitted to its length).

  A `config.json` beside no checkpoint (a run that stopped before its first
  checkpoint) is replaced: that run starts from step 0 again either way.
  A kernel change accepted by `allow_kernel_change` is recorded: `resolved`
  becomes the new kernels, the old ones are appended to `resolved_before`.

  Returns:
    The record keys of `config.json` (`resolved`, and `resolved_before`
    after an accepted change) as they now stand.
  """
  path = workdir / "config.json"
  record = {} if resolved is None else {"resolved": dict(resolved)}
  if not path.exists() or not ckpt_lib.has_checkpoint(workdir):
    if jax.process_index() == 0:
      workdir_lib.write_json_atomic(path, {**config_to_dict(config), **record})
    return record
  check_resume(workdir, config, resolved, why=why)
  old = _read_config_json(path)
  kept = {k: old[k] for k in RECORD_KEYS if k in old}
  if resolved is None or kept.get("resolved") == resolved:
    return kept
  if "resolved" in kept:  # an accepted change of kernels: record it
    kept["resolved_before"] = [*kept.get("resolved_before", []),
                               kept["resolved"]]
  # (else a workdir written before kernels were recorded: record them now)
  kept["resolved"] = dict(resolved)
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(path, {**old, **kept})
  return kept


# Defaults that changed: field -> (the old default, the date it changed).
# A workdir that ran with the old one is told the override that resumes it.
CHANGED_DEFAULTS = {"etf_rotation": ("gaussian", "2026-11-29")}


def _override(name: str, value: Any) -> str | None:
  """The `--config.` flag that sets `name` to `value`; None where a flag
  cannot (a missing field)."""
  if value is None or isinstance(value, dict):
    return None
  if isinstance(value, (list, tuple)):
    text = "(" + ", ".join(map(repr, value)) + ("," if len(value) == 1 else "")
    quote = '"' if "'" in text else "'"  # repr quotes strings with '
    return f"{quote}--config.{name}={text}){quote}"
  if isinstance(value, str) and (not value or any(c in value for c in " '\"$")):
    return f"'--config.{name}={value}'" if "'" not in value else None
  return f"--config.{name}={value}"


def check_finished(workdir: pathlib.Path, config: ConfigDict,
                   results: dict) -> None:
  """Raises ValueError if the finished run in `workdir` was trained with
  another config than `config` (read-only).

  `config` is the request; it is fitted to the run's length (from
  `results`, the run's results.json) as training fitted it, so that a
  changed warm-up or decay counts. The ETF's fields do not count for a
  method that learns its classifier, nor (as on a resume) do
  `RESUMABLE_CHANGES`, `data_dir` among them.
  """
  path = workdir / "config.json"
  if not path.exists():
    return
  old = {k: v for k, v in _read_config_json(path).items()
         if k not in RECORD_KEYS}
  history = results.get("history") or [{}]
  epochs = history[-1].get("epoch", (results.get("final") or {}).get("epoch"))
  ignore: tuple[str, ...] = SCHEDULE_FIELDS
  if isinstance(epochs, (int, float)) and config.method in methods_lib.METHODS:
    try:
      config, _ = schedule_fit.fit_schedule(
          config, float(epochs),
          epoch_options=methods_lib.get_method(config.method).epoch_options)
      ignore = ()
    except ValueError:
      pass  # a request that cannot be fitted differs anyway: compared as is
  if old.get("method") in methods_lib.METHODS and not (
      methods_lib.get_method(old["method"]).fixed_classifier):
    ignore += ETF_FIELDS
  _compare(workdir, old, config_to_dict(config), ignore=ignore, finished=True)


def _compare(workdir: pathlib.Path, old: dict, new: dict, *,
             ignore: tuple[str, ...] = (), finished: bool = False) -> None:
  a, b = {**MISSING_MEANS, **_flatten(old)}, _flatten(new)
  diff = sorted(k for k in set(a) | set(b)
                if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES
                and k not in ignore)
  if diff:
    # One line: the error is printed as the run's single `error:` line.
    parts = [f"{k}: {a.get(k)!r} in the workdir, {b.get(k)!r} now"
             for k in diff]
    for k in diff:
      if k in CHANGED_DEFAULTS and a.get(k) == CHANGED_DEFAULTS[k][0]:
        parts.append(f"{k}'s default was {a.get(k)!r} until "
                     f"{CHANGED_DEFAULTS[k][1]}: this run was trained with it")
    flags = [_override(k, a.get(k)) for k in diff if k in b]
    same = f" ({' '.join(flags)})" if flags and None not in flags else ""
    if finished:
      raise ValueError(
          f"{workdir} holds a finished run of a different config "
          f"({'; '.join(parts)}); its results are kept. Train the new config "
          f"in another --workdir; the finished run's own config{same} only "
          "reads its results.json again.")
    fix = (f"Resume it with the same config{same}, or start the new run in "
           "another --workdir.")
    raise ValueError(
        f"{workdir} holds a run with a different config ({'; '.join(parts)})."
        f" {fix}")
