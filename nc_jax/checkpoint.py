"""Checkpoints and the work directory: resume, config checks, safe writes.

A work directory holds `config.json` (the run's config, written once the
config and the data have been checked and loaded, and compared on every
restart), `checkpoints/` (orbax, one folder per step), `metrics.jsonl`,
TensorBoard event files, `.lock` while a run is live (`nc_jax.workdir`) and,
once finished, `results.json`.

Rules that protect finished work:
- A restart with a different config stops with the differing keys named. A
  workdir whose run never saved a checkpoint has nothing to protect: a rerun
  with another config starts afresh there.
- `config.json` also records the convolution and BatchNorm implementations
  the run resolved to (`resolved`: `conv_impl`, `norm_impl`;
  `nc_jax.implementations`). A restart that resolves to others (e.g. on a
  machine without a C++ compiler) stops, because the numbers would change,
  unless the config sets `allow_kernel_change=True`; an accepted change is
  recorded (`resolved_before`).
- A directory with `results.json` is finished: a rerun reports it and exits
  without touching anything.
- A checkpoint whose files cannot be read (damaged storage, a truncated
  file) is set aside, renamed into `WORKDIR/damaged/`, never deleted; the
  run says so in one warning line and resumes from the newest intact one,
  or from the start. A checkpoint that reads but does not fit the model
  (the code changed) stops the run with one line.
- A full disk during a save ends the run with one line naming the
  directory, the step and the space needed (`preemption.NoSpace`); the
  partial checkpoint is removed, those before it stay, and the same command
  resumes once there is room.
- Files are written to a temporary name and renamed, so a kill never leaves
  a half-written `results.json` or `config.json`.

`best/` holds the state of the evaluation with the best mean test top-1
(`BestCheckpoint`), beside the newest ones in `checkpoints/`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import shutil
import sys
from typing import Any, Callable

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import ConfigDict

from nc_jax import preemption

# Fields that may differ between a run and its resumption: they change how
# progress is shown, not what is computed; or, for the kernel requests, what
# matters is what they resolve to, which is compared on its own.
RESUMABLE_CHANGES = frozenset({"log_every_steps", "data_dir", "conv_impl",
                               "norm_impl", "allow_kernel_change",
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
                 "steps_per_dispatch": 1}


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
KERNEL_CHANGE_FLAG = "--config.allow_kernel_change=True"


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used; the message names the fix."""


def write_json_atomic(path: os.PathLike | str, obj: Any) -> None:
  """Writes JSON to `path` via a temporary file and an atomic rename (a
  failed write, e.g. on a full disk, leaves the old file and no temporary
  one)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=float))
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def is_no_space(e: BaseException | None) -> bool:
  """Whether `e`, or an exception it came from, is a full disk (ENOSPC, as
  Python raises it or as TensorStore words it for orbax)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _megabytes(n: float) -> str:
  return f"{n / 1e6:.1f} MB"


def _tree_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def no_space(what: str, directory: os.PathLike | str, *, step: int | None,
             needed: int | None, kept: str) -> preemption.NoSpace:
  """The one-line `NoSpace` error of a write that found the disk full."""
  try:
    free = shutil.disk_usage(directory).free
  except OSError:
    free = None
  room = ""
  if needed is not None:
    room = f": it needs about {_megabytes(needed)} free"
    room += f", {_megabytes(free)} is" if free is not None else ""
  elif free is not None:
    room = f" ({_megabytes(free)} free)"
  at = f" at step {step}" if step is not None else ""
  return preemption.NoSpace(
      f"no space left on the device for {what}{at} in {directory}{room}. "
      f"{kept} Free some space (or copy the workdir to a disk with room) "
      "and run the same command to resume.")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def config_to_dict(config: ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def has_checkpoint(workdir: pathlib.Path) -> bool:
  """Whether `workdir/checkpoints` holds a finished checkpoint (a step
  folder; orbax's temporary folders do not count)."""
  return bool(saved_steps(pathlib.Path(workdir) / "checkpoints"))


def saved_steps(directory: pathlib.Path) -> list[int]:
  """The finished checkpoints' steps in an orbax directory, ascending
  (orbax's temporary folders do not count; [] when there is none)."""
  try:
    return sorted(int(p.name) for p in pathlib.Path(directory).iterdir()
                  if p.name.isdigit() and p.is_dir())
  except (FileNotFoundError, NotADirectoryError):
    return []


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


def check_config(workdir: pathlib.Path, config: ConfigDict,
                 resolved: dict | None = None, *,
                 why: str | None = None) -> None:
  """Raises ValueError if `workdir` holds a checkpointed run of another
  config, or one that resolved to other kernels (read-only; a config
  without a checkpoint does not count).

  Args:
    workdir: the run directory.
    config: this run's config.
    resolved: this process's implementations
      (`nc_jax.implementations.Implementations.record()`), or None not to
      compare them.
    why: a note on the new ones for the message (`Implementations.note`).
  """
  path = workdir / "config.json"
  if not path.exists() or not has_checkpoint(workdir):
    return
  old = _read_config_json(path)
  _compare(workdir, {k: v for k, v in old.items() if k not in RECORD_KEYS},
           config_to_dict(config))
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


def check_or_write_config(workdir: pathlib.Path, config: ConfigDict,
                          resolved: dict | None = None, *,
                          why: str | None = None) -> dict:
  """Writes `config.json`, or checks the existing one matches `config`.

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
  if not path.exists() or not has_checkpoint(workdir):
    if jax.process_index() == 0:
      write_json_atomic(path, {**config_to_dict(config), **record})
    return record
  check_config(workdir, config, resolved, why=why)
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
    write_json_atomic(path, {**old, **kept})
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


def _compare(workdir: pathlib.Path, old: dict, new: dict) -> None:
  a, b = {**MISSING_MEANS, **_flatten(old)}, _flatten(new)
  diff = sorted(k for k in set(a) | set(b)
                if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
  if diff:
    lines = [f"  {k}: {a.get(k)!r} in the workdir, {b.get(k)!r} now"
             for k in diff]
    for k in diff:
      if k in CHANGED_DEFAULTS and a.get(k) == CHANGED_DEFAULTS[k][0]:
        lines.append(f"  ({k}'s default was {a.get(k)!r} until "
                     f"{CHANGED_DEFAULTS[k][1]}: this run was trained with "
                     "it)")
    flags = [_override(k, a.get(k)) for k in diff if k in b]
    fix = ("Resume it with the same config"
           + (f" ({' '.join(flags)})" if flags and None not in flags else "")
           + ", or start the new run in another --workdir.")
    raise ValueError(
        f"{workdir} holds a run with a different config:\n" + "\n".join(lines)
        + "\n" + fix)


class _OrbaxThreadErrors(logging.Filter):
  """Drops orbax's log of an exception in one of its writer threads: the
  same exception reaches the caller of `save`/`restore`, which reports it
  once (a full disk otherwise prints a traceback per thread and file)."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if "orbax" in record.pathname and "raised an exception" in text:
      return False
    # asyncio's notes on orbax's write tasks that failed with the save,
    # logged when they are collected.
    return not ("exception was never retrieved" in text and "orbax" in text)


_ORBAX_FILTER = _OrbaxThreadErrors()


def _quiet_closed_loops(hook: Callable[[Any], None]) -> Callable[[Any], None]:
  """`sys.unraisablehook` without the "Event loop is closed" errors that
  orbax's read coroutines raise when they are collected after a failed
  restore (hundreds of tracebacks for one damaged file)."""
  def quiet(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
    if code is not None and "orbax" in code.co_filename:
      return
    hook(unraisable)
  quiet.nc_jax_quiet = True
  return quiet


def _install_quiet_hooks() -> None:
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _ORBAX_FILTER not in logger.filters:
      logger.addFilter(_ORBAX_FILTER)
  if not getattr(sys.unraisablehook, "nc_jax_quiet", False):
    sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
DAMAGED_DIR = "damaged"


def _short(e: BaseException, limit: int = 200) -> str:
  """An orbax/TensorStore error in one short line (no embedded spec)."""
  text = str(e).split("See full TensorStore details")[0]
  text = " ".join(text.split())
  return (text[:limit] + "...") if len(text) > limit else text


class Checkpointer:
  """Orbax `CheckpointManager` for the train state plus a small JSON record.

  The JSON record carries what the metrics history needs to survive a
  restart (the evaluations so far, for the best-epoch numbers).
  """

  def __init__(self, directory: pathlib.Path, *, keep: int | None,
               read_only: bool = False):
    """`read_only` (for readers such as `nc_jax.runs`) creates, cleans and
    deletes nothing, so it is safe beside a live run."""
    self.directory = directory
    self._keep, self._read_only = keep, read_only
    _install_quiet_hooks()
    self._manager = self._open()
    self._closed = False

  def _open(self) -> ocp.CheckpointManager:
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    if self._read_only:  # orbax warns that a read-only manager will not save
      absl_logger.setLevel(logging.ERROR)
    try:
      return ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None if self._read_only else self._keep,
              create=not self._read_only,
              cleanup_tmp_directories=not self._read_only,
              read_only=self._read_only,
              enable_async_checkpointing=False))
    finally:
      absl_logger.setLevel(level)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
    """Saves `state` and `record` at `step`.

    Raises:
      preemption.NoSpace: the disk filled up; the partial checkpoint is
        removed, the ones before it are untouched.
    """
    if step in self._manager.all_steps():
      return  # already saved (e.g. the final step of a resumed, finished run)
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  record=ocp.args.JsonSave(record)))
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not is_no_space(e):
        raise
      self._discard_partial(step)
      steps = saved_steps(self.directory)
      needed = (_tree_bytes(self.directory / str(steps[-1])) if steps else
                sum(x.nbytes for x in jax.tree.leaves(state)))
      kept = (f"The checkpoints before it ({', '.join(map(str, steps))}) are "
              "intact; the partial one was removed." if steps else
              "No checkpoint was saved before it; the partial one was "
              "removed.")
      raise no_space("the checkpoint", self.directory, step=step,
                     needed=needed, kept=kept) from None

  def _discard_partial(self, step: int) -> None:
    """Removes orbax's temporary folder of an unfinished save of `step`."""
    if jax.process_index() != 0:
      return
    for p in pathlib.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
      shutil.rmtree(p, ignore_errors=True)

  def restore(self, step: int, abstract_state: Any, *,
              partial: bool = False) -> tuple[Any, dict]:
    """Restores `step` into the shardings and shapes of `abstract_state`.

    `partial`: `abstract_state` is a dict naming only some of the saved
    state's fields (e.g. `params` and `model_state`, without the optimiser
    state, for a model that only evaluates); only those are read.

    Raises:
      CheckpointError: the checkpoint cannot be read, or does not fit.
    """
    if partial:
      state_args = ocp.args.PyTreeRestore(
          abstract_state, partial_restore=True,
          restore_args=jax.tree.map(
              lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
              abstract_state))
    else:
      state_args = ocp.args.StandardRestore(abstract_state)
    try:
      out = self._manager.restore(
          step,
          args=ocp.args.Composite(state=state_args,
                                  record=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(
          f"The checkpoint at step {step} in {self.directory} cannot be "
          f"restored ({type(e).__name__}: {_short(e)}). It was left as it "
          "is. If the model or the code changed since it was written, use "
          "the version that wrote it or a new --workdir.") from e
    return out["state"], dict(out["record"])

  def readable(self, step: int) -> bool:
    """Whether every file of checkpoint `step` reads back as host arrays,
    whatever model they would go into (a damaged one does not; one of
    another model, or from other devices, does)."""
    d = pathlib.Path(self.directory) / str(step)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax's notes on older layouts
    try:
      reader = ocp.PyTreeCheckpointer()
      tree = reader.metadata(d / "state").item_metadata.tree
      as_numpy = jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      reader.restore(d / "state",
                     args=ocp.args.PyTreeRestore(restore_args=as_numpy))
      json.loads((d / "record" / "metadata").read_text())
      return True
    except Exception:  # pylint: disable=broad-except
      return False
    finally:
      absl_logger.setLevel(level)

  def restore_newest(self, abstract_state: Any, *,
                     warn: Callable[[str], None]
                     ) -> tuple[int | None, Any, dict]:
    """The newest checkpoint that can be restored: `(step, state, record)`,
    or `(None, None, {})` when there is none.

    A checkpoint whose files cannot be read is set aside (moved to
    `WORKDIR/damaged/`, never deleted), `warn` says so in one line, and the
    one before it is tried.

    Raises:
      CheckpointError: a checkpoint reads but does not fit `abstract_state`
        (the model changed): one short line, nothing is moved.
    """
    while (step := self._manager.latest_step()) is not None:
      try:
        return step, *self.restore(step, abstract_state)
      except CheckpointError as e:
        if self.readable(step):
          raise CheckpointError(
              f"The checkpoint at step {step} in {self.directory} does not "
              f"fit this run's model ({_short(e.__cause__, 160)}): the code "
              "or the model changed since it was written. Resume with the "
              "version that wrote it, or use a new --workdir.") from None
        where = self._set_aside(step)
        older = self._manager.latest_step()
        warn(f"warning: the checkpoint at step {step} cannot be read "
             f"({_short(e.__cause__, 120)}); set aside as {where}. "
             + (f"Resuming from the checkpoint at step {older}." if older
                is not None else "No other checkpoint: starting from step 0."))
    return None, None, {}

  def _set_aside(self, step: int) -> pathlib.Path:
    """Moves checkpoint `step` to `WORKDIR/damaged/checkpoint_STEP[_n]`."""
    root = pathlib.Path(self.directory).parent / DAMAGED_DIR
    target = root / f"checkpoint_{step}"
    n = 1
    while target.exists():
      n += 1
      target = root / f"checkpoint_{step}_{n}"
    if jax.process_index() == 0:
      root.mkdir(exist_ok=True)
      os.replace(pathlib.Path(self.directory) / str(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"nc_jax_set_aside_{step}")
    self._manager.reload()
    return target

  def close(self) -> None:
    """Closes the manager (its threads) once; safe to call again."""
    if self._closed:
      return
    self._closed = True
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      pass  # closing after a failed save: nothing more to finish


def mean_top1(per_seed: list[dict]) -> float:
  """Mean test top-1 over the replicas of one evaluation."""
  return float(sum(m["top1"] for m in per_seed) / len(per_seed))


BEST_FILE = "state.msgpack"


def _host_copy(x: Any) -> Any:
  """A numpy copy of a replicated array, also where it spans processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def read_best(directory: os.PathLike | str) -> dict[str, Any] | None:
  """`{"state": state dict, "record": {...}}` of `directory/BEST_FILE`, or
  None when there is none.

  Raises:
    CheckpointError: the file exists but cannot be read.
  """
  path = epath.Path(directory) / BEST_FILE
  if not path.exists():
    return None
  try:
    blob = flax.serialization.msgpack_restore(path.read_bytes())
    return {"state": blob["state"], "record": json.loads(blob["record"])}
  except Exception as e:  # msgpack raises several types for damaged files
    raise CheckpointError(
        f"The best checkpoint {path} cannot be read ({type(e).__name__}: "
        f"{str(e)[:200]}). It was left as it is; move it away to go on "
        "without it.") from e


class BestCheckpoint:
  """The train state of the best evaluation so far, `WORKDIR/best/`.

  "Best" is the highest test top-1, mean over the replicas (`num_seeds`),
  by strict improvement (the first of equal evaluations wins, as in
  results.json's `best` block for one seed). It is one file,
  `best/state.msgpack` (flax msgpack of the whole train state and a record
  `step`, `epoch`, `top1` (the mean), `top1_per_seed`), written to a
  temporary name and renamed: about 20 ms for ResNet-32's state, where an
  orbax checkpoint takes 300-500 ms on a 2-core CPU. Process 0 writes it.

  Resume: the tracker starts from the restored evaluation history, and a
  best file newer than the restored step (a run killed after saving a best
  but before its next checkpoint) is deleted, since that history lost it;
  replaying the same steps saves it again. So a killed and resumed run ends
  with the same `best/` as an uninterrupted one.
  """

  def __init__(self, directory: os.PathLike | str, *, history: list[dict],
               start_step: int, warn: Callable[[str], None] | None = None):
    self.directory = epath.Path(directory)
    self.path = self.directory / BEST_FILE
    self._chief = jax.process_index() == 0
    if self._chief and self.path.exists():
      try:
        saved = read_best(self.directory)["record"]["step"]
      except CheckpointError as e:  # damaged storage (writes are atomic)
        target = self.directory.parent / DAMAGED_DIR / f"best_{BEST_FILE}"
        n = 1
        while target.exists():
          n += 1
          target = target.with_name(f"best_{n}_{BEST_FILE}")
        target.parent.mkdir(exist_ok=True)
        self.path.rename(target)
        if warn is not None:
          warn(f"warning: {self.path} cannot be read ({_short(e, 120)}); "
               f"set aside as {target}. The next better evaluation writes a "
               "new one.")
        saved = None
      if saved is not None and saved > start_step:
        self.path.unlink()
    self.top1 = max((mean_top1(h["test"]) for h in history), default=None)

  def update(self, step: int, state: Any, entry: dict) -> bool:
    """Saves `state` if evaluation `entry` (a history entry) is a new best."""
    top1 = mean_top1(entry["test"])
    if self.top1 is not None and not top1 > self.top1:
      return False
    self.top1 = top1
    record = {"step": int(step), "epoch": float(entry["epoch"]), "top1": top1,
              "top1_per_seed": [float(m["top1"]) for m in entry["test"]]}
    if self._chief:
      host = jax.tree.map(_host_copy, state)
      data = flax.serialization.msgpack_serialize({
          "state": flax.serialization.to_state_dict(host),
          "record": json.dumps(record)})
      self.directory.mkdir(parents=True, exist_ok=True)
      tmp = self.directory / f".{BEST_FILE}.tmp-{os.getpid()}"
      try:
        tmp.write_bytes(data)
        tmp.replace(self.path)
      except OSError as e:
        if not is_no_space(e):
          raise
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                       str(self.path))
        full.needed = len(data)  # for the message
        raise full from None
      finally:
        tmp.unlink(missing_ok=True)
    return True

  def close(self) -> None:
    pass
