"""The train state's checkpoints: orbax, and the faults of real machines.

`Checkpointer` saves the train state and a small JSON record (the
evaluation history, wall time, resumes) into `WORKDIR/checkpoints/` (orbax,
one folder per step, the newest `keep_checkpoints` kept) and restores the
newest one that can be read:

- A checkpoint whose files cannot be read (damaged storage, a truncated
  file) is set aside, renamed into `WORKDIR/damaged/`, never deleted; the
  run says so in one warning line and resumes from the newest intact one,
  or from the start. A checkpoint that reads but does not fit the model
  (the code changed) stops the run with one line.
- A full disk during a save ends the run with one line naming the
  directory, the step and the space needed (`preemption.NoSpace`); the
  partial checkpoint is removed, those before it stay, and the same command
  resumes once there is room.
- orbax's worker threads report their errors to the caller, once: their
  own logs of them, and asyncio's notes at collection time, are dropped.

The run's config file is `nc_jax.run_config`; the best evaluation's state,
`nc_jax.best`.
"""

from __future__ import annotations

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import logging
import os
import pathlib
import shutil
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from nc_jax import preemption


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used; the message names the fix."""


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


def short_error(e: BaseException, limit: int = 200) -> str:
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
      if not preemption.is_no_space(e):
        raise
      self._discard_partial(step)
      steps = saved_steps(self.directory)
      needed = (preemption.tree_bytes(self.directory / str(steps[-1])) if steps else
                sum(x.nbytes for x in jax.tree.leaves(state)))
      kept = (f"The checkpoints before it ({', '.join(map(str, steps))}) are "
              "intact; the partial one was removed." if steps else
              "No checkpoint was saved before it; the partial one was "
              "removed.")
      raise preemption.no_space("the checkpoint", self.directory, step=step,
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
          f"restored ({type(e).__name__}: {short_error(e)}). It was left as it "
          "is. If the model or the code changed since it was written, use "
          "the version that wrote it; if it is damaged, read an older step or "
          "the best one (training resumes past a damaged one by itself).") from e
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
              f"fit this run's model ({short_error(e.__cause__, 160)}): the code "
              "or the model changed since it was written. Resume with the "
              "version that wrote it, or use a new --workdir.") from None
        where = self._set_aside(step)
        older = self._manager.latest_step()
        warn(f"warning: the checkpoint at step {step} cannot be read "
             f"({short_error(e.__cause__, 120)}); set aside as {where}. "
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
