"""Optional dependencies: what a module needs beyond the library core.

`pip install nc_jax` installs the library layer (`nc_jax.etf`,
`nc_jax.losses`, the heads, `nc_jax.nnx`, `nc_jax.nc_metrics`): jax, flax,
optax, chex and numpy. Training, data, checkpoints, reports and the
commands need the `train` extra (`pip install 'nc_jax[train]'`). A module
that needs it calls `require(__name__)` before its own imports, so that
importing it without the extra fails with one line that names the extra,
not with a `ModuleNotFoundError` deep inside.
"""

from __future__ import annotations

import importlib.util

# What the training side imports that the core does not bring (module ->
# the package that provides it). TensorFlow is not here: the release
# reader and the device pipeline run without it (GPU hosts often lack it);
# the modules that need it say so themselves.
TRAIN = {"ml_collections": "ml-collections", "absl": "absl-py",
         "orbax.checkpoint": "orbax-checkpoint", "etils": "etils"}
REPORT = {**TRAIN, "matplotlib": "matplotlib"}


def missing(requirements: dict[str, str]) -> list[str]:
  """The packages of `requirements` (module -> package) not installed."""
  out = []
  for module, package in requirements.items():
    try:
      found = importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):  # a parent missing or blocked
      found = False
    if not found:
      out.append(package)
  return out


def require(what: str, requirements: dict[str, str] | None = None, *,
            extra: str = "train") -> None:
  """Raises ImportError, in one line naming the extra, when `what` (a
  module or command name) cannot run without packages that are missing."""
  gone = missing(TRAIN if requirements is None else requirements)
  if gone:
    raise ImportError(
        f"{what} needs nc_jax's `{extra}` extra, which is not installed "
        f"(missing: {', '.join(gone)}): pip install 'nc_jax[{extra}]'")
