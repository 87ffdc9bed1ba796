"""Ending a run early and cleanly: stop signals, divergence, a full disk.

Clusters and TPU pods pre-empt a job with SIGTERM and kill it some seconds
later; Ctrl-C sends SIGINT; a closed terminal or ssh session sends SIGHUP
(kept ignored when the process inherited it so, as under `nohup`).
`StopSignals` turns any of them into a request that the training loop
answers at the next step boundary: it saves a checkpoint there and raises
`Preempted`, which the entry point reports with exit status
`EXIT_PREEMPTED` (the same command resumes, and ends with the numbers of an
uninterrupted run). A second SIGINT exits at once, saying what is saved;
so does any signal while the process shuts down after a stop.

The loop may be far from a step boundary when the signal comes: loading
data, compiling, evaluating. A watchdog thread, woken by the signal itself
(`signal.set_wakeup_fd`, so even while the main thread is inside XLA), makes
the run fit the notice:

- nothing trained since the last checkpoint (loading, compiling the first
  step, the evaluation that follows a restore): it exits at once, since
  there is nothing to save;
- an evaluation in progress stops between batches (`pending`); the
  checkpoint is saved at that step, and the resumed run evaluates it first;
- no boundary reached within `grace_seconds` (a long compilation): it exits
  without a new checkpoint, saying from which step the rerun resumes.

Several processes (`jax.distributed`) must agree on one step. JAX's
pre-emption service listens for SIGTERM itself and every process asks it at
each step (`multihost_utils.reached_preemption_sync_point`); SIGINT is
forwarded to it as SIGTERM. The watchdog's early exits and the interrupted
evaluation are single-process only: one process cannot leave collectives
that the others wait in.

A diverged run (non-finite metrics or parameters) raises `Diverged`, exit
status `EXIT_DIVERGED`. Its checkpoints are all finite (the loop checks
before every save), but resuming would replay the same steps into the same
divergence, so the run must start again with other settings.
"""

from __future__ import annotations

import errno
import functools
import os
import pathlib
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Callable

EXIT_DIVERGED = 3
# EX_IOERR: the disk filled up; the checkpoints before are intact and the
# same command resumes once there is room.
EXIT_NO_SPACE = 74
# EX_TEMPFAIL: stopped on request after saving; the same command resumes.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # a second Ctrl-C: no checkpoint

# What this process saved last (`StopSignals.mark_saved`), so that a signal
# after the run's own handlers are gone, while the process shuts down, says
# what is on disk.
_LAST_SAVED: dict[str, int | None] = {"step": None}


class Stopped(Exception):
  """The run ended early on purpose; the message says what happened and what
  to do, `exit_code` is the process's status."""
  exit_code = 1


class Preempted(Stopped):
  """A checkpoint was saved at a step boundary after a stop signal."""
  exit_code = EXIT_PREEMPTED


class Diverged(Stopped):
  """Training produced non-finite numbers; nothing non-finite was saved."""
  exit_code = EXIT_DIVERGED


class NoSpace(Stopped):
  """The disk filled up during a write; what was saved before is intact."""
  exit_code = EXIT_NO_SPACE


def stop_signals() -> tuple[signal.Signals, ...]:
  """The signals that ask a run to stop: SIGINT (Ctrl-C), SIGTERM
  (pre-emption) and SIGHUP (the terminal or ssh session closed), unless the
  process inherited SIGHUP ignored (`nohup`), which it then keeps."""
  sigs = [signal.SIGINT, signal.SIGTERM]
  hup = getattr(signal, "SIGHUP", None)
  if hup is not None and signal.getsignal(hup) is not signal.SIG_IGN:
    sigs.append(hup)
  return tuple(sigs)


def _say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


class StopSignals:
  """SIGTERM/SIGINT/SIGHUP as a request to stop at the next step boundary.

  Use as a context manager around a run. `requested(step)` is asked at
  every step, `pending()` between evaluation batches; `mark_trained()` and
  `mark_saved(step)` tell the watchdog whether there is anything to save.
  Outside the main thread it installs nothing (no signal can be caught
  there) and never requests a stop.
  """

  def __init__(self, *, grace_seconds: float, multi_process: bool = False,
               say: Callable[[str], None] = _say):
    self.grace_seconds = float(grace_seconds)
    self.multi_process = multi_process
    self.say = say
    self.signal_name: str | None = None
    self.signal_time: float | None = None
    self._event = threading.Event()
    self._unsaved = False
    self._saved_step: int | None = None
    self._installed = False
    self._old: dict = {}

  # ------------------------------------------------------------ install
  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is not threading.main_thread():
      return self
    self._r, self._w = socket.socketpair()
    self._w.setblocking(False)
    self._old_fd = signal.set_wakeup_fd(self._w.fileno(),
                                        warn_on_full_buffer=False)
    _LAST_SAVED["step"] = None
    # With several processes SIGTERM stays with JAX's pre-emption service.
    sigs = tuple(s for s in stop_signals()
                 if not (self.multi_process and s == signal.SIGTERM))
    for sig in sigs:
      # A Python-level handler is what makes the wakeup fd fire; the
      # watchdog does the work.
      self._old[sig] = signal.signal(sig, lambda *_: None)
    self._installed = True
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name="nc_jax-stop-watchdog")
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    if not self._installed:
      return
    for sig, old in self._old.items():
      signal.signal(sig, old)
    signal.set_wakeup_fd(self._old_fd)
    self._installed = False
    self._r.close()  # ends the watchdog's wait
    self._w.close()

  # ------------------------------------------------------------ the loop
  def mark_trained(self) -> None:
    """A step ran since the last checkpoint: a stop must save first."""
    self._unsaved = True

  def mark_saved(self, step: int) -> None:
    """The state at `step` is in a checkpoint."""
    self._saved_step = _LAST_SAVED["step"] = int(step)
    self._unsaved = False

  def pending(self) -> bool:
    """A stop was requested (single process; evaluations stop early)."""
    return self._event.is_set() and not self.multi_process

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step` (called at every step; with
    several processes, the step all of them agreed on)."""
    if self.multi_process:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self._event.is_set()

  def stopped(self, step: int, where: str) -> Preempted:
    """The exception that ends a run stopped after saving `step`."""
    waited = ("" if self.signal_time is None else
              f" {time.monotonic() - self.signal_time:.1f}s after the signal")
    return Preempted(
        f"stopped by {self.signal_name or 'a pre-emption notice'} at step "
        f"{step}: checkpoint saved in {where}{waited}. Run the same command "
        "to resume.")

  # ----------------------------------------------------------- watchdog
  def _resume_point(self) -> str:
    return ("from the start" if self._saved_step is None
            else f"from step {self._saved_step}")

  def _exit(self, code: int, text: str) -> None:
    self.say(text)
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access

  def _watch(self) -> None:
    deadline = None
    while True:
      timeout = None if deadline is None else max(deadline - time.monotonic(),
                                                  0.0)
      try:
        self._r.settimeout(timeout)
        data = self._r.recv(16)
      except socket.timeout:
        self._exit(EXIT_PREEMPTED,
                   f"{self.signal_name}: no step boundary within "
                   f"{self.grace_seconds:g}s; exiting without a new "
                   f"checkpoint. The same command resumes "
                   f"{self._resume_point()}.")
        return
      except OSError:
        return  # closed by __exit__
      if not data:
        return
      for signum in data:
        if self._on_signal(signum):
          deadline = time.monotonic() + self.grace_seconds

  def _on_signal(self, signum: int) -> bool:
    """Acts on one signal; True when the grace period starts."""
    name = signal.Signals(signum).name
    if self._event.is_set():
      if signum == signal.SIGINT and not self._unsaved:
        # The stop's checkpoint is written: nothing is lost by going now.
        self._exit(EXIT_PREEMPTED, f"{name} again: exiting now; the "
                   f"checkpoint at step {self._saved_step} is saved. The same "
                   f"command resumes {self._resume_point()}."
                   if self._saved_step is not None else
                   f"{name} again: exiting now. The same command starts "
                   "again.")
      elif signum == signal.SIGINT:
        self._exit(EXIT_INTERRUPTED, f"{name} again: exiting at once, "
                   "without a checkpoint of the steps since the last one. The "
                   f"same command resumes {self._resume_point()}.")
      return False
    self.signal_name, self.signal_time = name, time.monotonic()
    self._event.set()
    if self.multi_process:
      if signum != signal.SIGTERM:
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's pre-emption service
      self.say(f"{name}: all processes stop at an agreed step after saving "
               "a checkpoint (a second Ctrl-C exits at once).")
      return False
    if not self._unsaved:
      self._exit(EXIT_PREEMPTED,
                 f"{name}: nothing trained since the last checkpoint; "
                 f"exiting now. The same command resumes "
                 f"{self._resume_point()}.")
    self.say(f"{name}: stopping at the next step boundary to save a "
             f"checkpoint (at most {self.grace_seconds:g}s; a second Ctrl-C "
             "exits at once).")
    return True


@functools.lru_cache(maxsize=None)
def _finite_fn():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def fn(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)

  return jax.jit(fn)


def all_finite(tree) -> bool:
  """Whether every float array in `tree` is finite (one device reduction)."""
  return bool(_finite_fn()(tree))


def exit_early_on_signals() -> None:
  """Outside a run's `StopSignals`: SIGTERM/SIGINT/SIGHUP end the process
  at once with `EXIT_PREEMPTED` and one line that says what is saved.
  Before a run starts nothing is written, so there is nothing to save;
  after it stopped (while the process shuts down) its checkpoint is on
  disk. Called first thing by the entry point, so a signal during the
  imports is no traceback."""
  if threading.current_thread() is not threading.main_thread():
    return

  def handler(signum, frame):
    del frame
    name, step = signal.Signals(signum).name, _LAST_SAVED["step"]
    if step is None:
      _say(f"{name}: stopped before training started; nothing to save. The "
           "same command starts the run (or resumes it from its newest "
           "checkpoint).")
    else:
      _say(f"{name}: exiting; the run already stopped with its checkpoint at "
           f"step {step} saved. The same command resumes from step {step}.")
    os._exit(EXIT_PREEMPTED)  # pylint: disable=protected-access

  for sig in stop_signals():
    signal.signal(sig, handler)


def diverged(step: int, what: str, lr: float, saved: int | None) -> Diverged:
  """The `Diverged` error of a run whose `what` went non-finite at `step`
  (`saved`: its newest checkpoint's step, or None)."""
  last = ("no checkpoint was saved" if saved is None
          else f"the last good checkpoint is at step {saved}")
  return Diverged(
      f"training diverged at step {step}: {what} not finite. No checkpoint "
      f"holds a non-finite state ({last}), but resuming would replay the same "
      "steps into the same divergence: start again in a new --workdir (or "
      f"empty this one) with a lower --config.optim.lr (now {lr}), or check "
      "the data.")


# ------------------------------------------------------------ a full disk


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


def tree_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def no_space(what: str, directory: os.PathLike | str, *, step: int | None,
             needed: int | None, kept: str) -> NoSpace:
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
  return NoSpace(
      f"no space left on the device for {what}{at} in {directory}{room}. "
      f"{kept} Free some space (or copy the workdir to a disk with room) "
      "and run the same command to resume.")
