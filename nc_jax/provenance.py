"""Where a result came from: package versions, the nc_jax commit, the machine.

`results.json` carries this block so that a number can be traced to the
code and libraries that produced it without the run's logs.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

PACKAGES = ("nc_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
            "tensorflow", "tensorflow-cpu", "tensorflow-datasets", "numpy")


def package_versions() -> dict[str, str]:
  """Installed versions of the packages that decide the numbers."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return out


def git_commit() -> str | None:
  """The commit of the nc_jax checkout in use (+ "-dirty" with local edits),
  or None outside a git checkout (an installed wheel)."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"],
                         capture_output=True, text=True, timeout=10)
    if sha.returncode != 0:
      return None
    dirty = subprocess.run(
        ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def command() -> str | None:
  """This process's command line, as it would be typed: `python -m
  experiments.cifar_lt ...` or `nc-jax-train ...` (for a library call, the
  calling script's). Recorded by the process that finishes a run; a resume
  repeats the first command."""
  orig = list(getattr(sys, "orig_argv", []))
  if "-m" in orig[1:3]:
    i = orig.index("-m")
    return shlex.join(["python", *orig[i:]])
  if not sys.argv or not sys.argv[0]:
    return None
  return shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])


def describe(devices: Any = None) -> dict[str, Any]:
  """Versions, commit and machine, as plain JSON data."""
  info: dict[str, Any] = {
      "versions": package_versions(),
      "commit": git_commit(),
      "python": platform.python_version(),
      "host": platform.node(),
      "machine": platform.machine(),
      "command": command(),
  }
  if devices is not None:
    kinds = sorted({getattr(d, "device_kind", str(d)) for d in devices})
    info["devices"] = {"count": len(devices), "kinds": kinds,
                       "platform": devices[0].platform if devices else None}
  return info
