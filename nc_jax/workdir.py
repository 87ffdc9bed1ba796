"""One live run per work directory: the `.lock` file.

A run holds `WORKDIR/.lock` from the moment it starts writing there until it
ends (normally or by an exception). The file is created with `O_EXCL`, so
of two processes only one gets it, and it says who holds it: host, pid, the
process's start time (to tell a reused pid apart) and the command. A second
run on the same workdir stops at once with an error naming the holder.

A lock left behind by a process that no longer exists (killed with
SIGKILL, a machine that rebooted) is taken over when the holder was on this
host: its pid is gone, or now belongs to a process that started later. A
lock taken on another host cannot be checked from here; the error says so
and how to remove it.

Before any of that, `check_target` checks (reading only) that a path can
take a run: a new folder it can create, or the folder of a run to resume.

Multi-host runs: process 0 holds the lock for all processes (the others take
none). A workdir is a path (a bucket through a mount), never a URL.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
import uuid
from typing import Any, Callable, Iterator

import numpy as np

LOCK_NAME = ".lock"


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir; the message names it."""


def _proc_start(pid: int) -> str | None:
  """The start time of process `pid` in clock ticks since boot (Linux)."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  # Field 22; the command name (field 2) may hold spaces, so count from its
  # closing parenthesis.
  return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def _me() -> dict[str, Any]:
  return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "proc_start": _proc_start(os.getpid()),
      "started": datetime.datetime.now().astimezone().isoformat(
          timespec="seconds"),
      "command": " ".join(sys.argv)[:500],
      "token": uuid.uuid4().hex,
  }


def _read(path: pathlib.Path) -> dict[str, Any] | None:
  """The holder recorded in `path`; {} if unreadable; None if absent."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  except OSError:
    return {}
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def holder_state(holder: dict[str, Any]) -> str:
  """"live", "dead" (safe to take over) or "unknown" (another host)."""
  if not holder or "pid" not in holder:
    return "unknown"
  if holder.get("host") != socket.gethostname():
    return "unknown"
  pid = int(holder["pid"])
  if not _alive(pid):
    return "dead"
  start = holder.get("proc_start")
  if start is not None and _proc_start(pid) not in (None, start):
    return "dead"  # the pid was reused by a later process
  return "live"


def describe_holder(holder: dict[str, Any]) -> str:
  if not holder:
    return "an unreadable lock"
  command = str(holder.get("command", "?"))
  if len(command) > 160:
    command = command[:157] + "..."
  return (f"pid {holder.get('pid')} on host {holder.get('host')} (since "
          f"{holder.get('started')}: {command})")


def _refusal(workdir: pathlib.Path, holder: dict[str, Any], state: str
             ) -> WorkdirLocked:
  lock = workdir / LOCK_NAME
  if state == "live":
    return WorkdirLocked(
        f"{workdir} is in use by a live run: {describe_holder(holder)}. Wait for it "
        "to finish or stop it (kill "
        f"{holder.get('pid')}), or use another --workdir.")
  return WorkdirLocked(
      f"{workdir} is locked by {describe_holder(holder)}, which cannot be checked "
      f"from host {socket.gethostname()}. If no run is using this workdir "
      f"any more, remove {lock} and start again; otherwise use another "
      "--workdir.")


def check_free(workdir: os.PathLike | str) -> None:
  """Raises `WorkdirLocked` if a live (or unverifiable) run holds `workdir`.

  Read-only: a stale lock is left for `hold` to take over.
  """
  workdir = pathlib.Path(workdir)
  holder = _read(workdir / LOCK_NAME)
  if holder is None:
    return
  state = holder_state(holder)
  if state != "dead":
    raise _refusal(workdir, holder, state)


def _create(path: pathlib.Path, record: dict[str, Any]) -> bool:
  """Creates `path` holding `record` unless it exists; True if created.

  The record is written to a private file first and hard-linked into place
  (which fails if `path` exists), so no reader ever sees a half-written
  lock; where hard links are not supported, `O_EXCL` creation is used.
  """
  text = json.dumps(record, indent=1) + "\n"
  tmp = path.with_name(f"{LOCK_NAME}.new-{record['token'][:8]}")
  tmp.write_text(text)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # no hard links here
    pass
  finally:
    tmp.unlink(missing_ok=True)
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  return True


def _take_over(path: pathlib.Path, stale: dict[str, Any]) -> None:
  """Moves a stale lock out of the way, unless someone replaced it first."""
  aside = path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return  # another process removed it already
  if _read(aside) == stale:
    aside.unlink(missing_ok=True)
    return
  # Lost a race: what was moved is a fresh lock another process just took.
  # Put it back (without overwriting a newer one) and let the caller retry.
  try:
    os.link(aside, path)
  except FileExistsError:
    pass
  aside.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(workdir: os.PathLike | str) -> Iterator[pathlib.Path]:
  """Holds `workdir`'s lock for the `with` block (creates the workdir).

  Raises:
    WorkdirLocked: another live run holds it, or a run on another host.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_NAME
  me = _me()
  for _ in range(5):
    if _create(path, me):
      break
    holder = _read(path)
    if holder is None:
      continue  # released meanwhile
    state = holder_state(holder)
    if state != "dead":
      raise _refusal(workdir, holder, state)
    _take_over(path, holder)
  else:
    raise WorkdirLocked(f"Could not take {path} (other processes keep "
                        "taking it); use another --workdir.")
  try:
    yield path
  finally:
    current = _read(path)
    if current and current.get("token") == me["token"]:
      path.unlink(missing_ok=True)


# Files and folders a run writes into its workdir.
RUN_FILES = frozenset({
    "config.json", "checkpoints", "metrics.jsonl", "tensorboard",
    "results.json", "train_subset.json", "best", "damaged", LOCK_NAME})


def resolve_path(workdir: str | os.PathLike | None) -> pathlib.Path:
  """The absolute workdir path (orbax needs one).

  Raises:
    ValueError: empty (`--workdir=` from an unset shell variable would be
      the working directory), or a URL: the workdir is written through the
      file system (config.json, metrics.jsonl, the lock), so a bucket is
      used through a mount. (A `pathlib.Path("")` is "." already and is
      taken as the working directory.)
  """
  if workdir is None or not str(workdir).strip():
    raise ValueError("--workdir is empty: pass the folder for this run (a "
                     "new one, or the folder of a run to resume).")
  if "://" in str(workdir):
    raise ValueError(
        f"--workdir {workdir} is a URL; nc_jax writes its workdir through the "
        "file system. Mount the bucket (e.g. gcsfuse for gs://) or use a "
        "shared file system, and pass that path.")
  return pathlib.Path(workdir).expanduser().resolve()


def check_creatable(path: pathlib.Path, flag: str) -> None:
  """Raises ValueError, naming `flag`, unless the missing `path` can be
  created: its nearest existing ancestor is a folder this process may
  write in."""
  parent = path.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise ValueError(f"{flag} {path} cannot be created: {parent} is a file. "
                     "Pass a path under a folder.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{flag} {path} cannot be created: {parent} is not "
                     "writable. Pass a folder you can write to.")


def check_target(workdir: pathlib.Path,
                 check_run: Callable[[pathlib.Path], None]) -> None:
  """Read-only checks that `workdir` can take a run (nothing written).

  Args:
    workdir: from `resolve_path`.
    check_run: called with an existing run directory, to compare its
      recorded config and kernels with this run's (raises ValueError).

  Raises:
    ValueError: `workdir` is a file, cannot be created or written, holds
      files of something else, or `check_run` refuses it.
  """
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(
        f"--workdir {workdir} is an existing file, not a directory. Pass a "
        "new folder (it is created) or the folder of a run to resume.")
  if not workdir.exists():
    check_creatable(workdir, "--workdir")
    return
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir} is not writable. Pass a folder "
                      "you can write to.")
  names = {p.name for p in workdir.iterdir()}
  others = sorted(n for n in names - RUN_FILES if not n.startswith("."))
  if others and "config.json" not in names:
    shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
    raise ValueError(
        f"--workdir {workdir} already holds other files ({shown}) and is not "
        "a run directory (no config.json). Pass a new or empty folder.")
  check_run(workdir)


def on_chief(fn: Callable[[], Any], what: str) -> Any:
  """Runs `fn` on process 0; every process raises if it failed there.

  Process 0 alone checks and holds the workdir lock of a multi-host run.
  Returns `fn()` on process 0, None elsewhere.

  Raises:
    WorkdirLocked: on every process, when `fn` raised it on process 0.
  """
  import jax  # pylint: disable=g-import-not-at-top
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except WorkdirLocked as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = int(multihost_utils.broadcast_one_to_all(
        np.int32(error is not None)))
    if failed and error is None:
      raise WorkdirLocked(f"process 0 could not {what}; its error says why.")
  if error is not None:
    raise error
  return result


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
