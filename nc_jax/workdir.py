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

Multi-host runs: process 0 holds the lock for all processes (the others take
none). Work directories given as URLs (gs://...) are not locked.
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
from typing import Any, Iterator

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


def describe(holder: dict[str, Any]) -> str:
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
        f"{workdir} is in use by a live run: {describe(holder)}. Wait for it "
        "to finish or stop it (kill "
        f"{holder.get('pid')}), or use another --workdir.")
  return WorkdirLocked(
      f"{workdir} is locked by {describe(holder)}, which cannot be checked "
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
