"""nc_jax's one cache folder: `$NC_JAX_CACHE`, default `~/.cache/nc_jax`.

It holds data archives extracted once (`nc_jax.data.archive`, one folder per
archive) and the compiled CPU kernels (`nc_jax.kernels`, in
`kernels/`). Everything in it can be deleted; it is rebuilt on demand.
"""

from __future__ import annotations

import os
import pathlib

ENV = "NC_JAX_CACHE"


def cache_root() -> pathlib.Path:
  """`$NC_JAX_CACHE`, or `~/.cache/nc_jax` when it is unset or empty."""
  base = os.environ.get(ENV) or os.path.join(os.path.expanduser("~"),
                                             ".cache", "nc_jax")
  return pathlib.Path(base).expanduser()
