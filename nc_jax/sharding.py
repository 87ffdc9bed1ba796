"""Devices, processes and meshes: everything that knows about more than one.

The training system is data parallel: a 1-D `Mesh` with one axis, `data`,
over every device of every process. Parameters and optimizer state are
replicated (`P()`), batches are split along their leading axis (`P('data')`).
Each process produces only its own slice of a global batch and
`jax.make_array_from_process_local_data` stitches the slices together; on a
single process that is simply a device_put with the batch sharding.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts `jax.distributed` when asked to, or when the environment says so.

  Explicit arguments win; otherwise the standard variables
  `NC_JAX_COORDINATOR`, `NC_JAX_NUM_PROCESSES` and `NC_JAX_PROCESS_ID` are
  read. With neither, a single-process run is assumed and nothing happens
  (on Cloud TPU pods and SLURM clusters `jax.distributed.initialize()` with
  no arguments auto-detects; pass `coordinator_address="auto"` for that).
  """
  coordinator_address = coordinator_address or os.environ.get(
      "NC_JAX_COORDINATOR")
  if num_processes is None:
    num_processes = _env_int("NC_JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("NC_JAX_PROCESS_ID")
  check_distributed_args(coordinator_address, num_processes, process_id)
  if not coordinator_address or jax.distributed.is_initialized():
    return
  # CPU processes need a collectives implementation to talk to each other.
  # Set unconditionally: asking for the backend here would initialise it,
  # which jax.distributed forbids, and the option only affects CPU devices.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or not value.strip():
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not a whole number.") from None


def check_distributed_args(coordinator_address: str | None,
                           num_processes: int | None,
                           process_id: int | None) -> None:
  """Raises ValueError, naming the flags, for arguments that cannot start
  the run they describe: a process count or id without a coordinator
  (nothing would connect), an address that is not HOST:PORT, an id outside
  `0..num_processes-1`. What is left unset with a coordinator is for
  `jax.distributed` to find (SLURM, Open MPI, TPU pods)."""
  flags = ("--coordinator_address=HOST:PORT (the same on every process), "
           "--num_processes=N and --process_id=0..N-1 (this process's "
           "index), or $NC_JAX_COORDINATOR, $NC_JAX_NUM_PROCESSES, "
           "$NC_JAX_PROCESS_ID; or --coordinator_address=auto on Cloud TPU "
           "pods and SLURM")
  if not coordinator_address:
    if (num_processes or 1) > 1 or process_id not in (None, 0):
      raise ValueError(
          f"num_processes={num_processes}, process_id={process_id} without "
          f"a coordinator address: a multi-process run needs {flags}.")
    return
  if coordinator_address != "auto":
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"coordinator address {coordinator_address!r} is not "
                       f"HOST:PORT. Pass {flags}.")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes={num_processes}: pass {flags}.")
  if process_id is not None and not 0 <= process_id < (num_processes
                                                       or process_id + 1):
    raise ValueError(
        f"process_id={process_id} with num_processes={num_processes}: "
        f"process ids run from 0 to num_processes - 1. Pass {flags}.")


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all global devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """k stacked batches `(k, B, ...)`: B split over the data axis."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises a ValueError naming the fix if the batch cannot be split evenly."""
  n = mesh.devices.size
  if global_batch_size % n:
    lower = global_batch_size - global_batch_size % n
    raise ValueError(
        f"batch_size={global_batch_size} is not divisible by the {n} devices "
        f"of the mesh ({jax.process_count()} process(es)). Set "
        f"--config.batch_size to a multiple of {n}, e.g. {max(lower, n)} or "
        f"{lower + n}.")


def to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays split over the data axis.

  Args:
    batch: dict of arrays whose leading axis is this process's slice
      (`global_batch / process_count` rows).
    mesh: the data-parallel mesh.

  Returns:
    dict of global `jax.Array`s with leading axis `global_batch`.
  """
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }


def to_global_stacked(batches: Mapping[str, Any], mesh: Mesh
                      ) -> dict[str, jax.Array]:
  """`to_global` for k stacked host batches `(k, b, ...)`: axis 1 holds this
  process's rows, which become the global `(k, B, ...)` split along B."""
  sharding = stacked_batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batches.items()
  }


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree (same on every process) replicated on the mesh."""
  sharding = replicated_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), sharding, lambda idx, x=x: np.asarray(x)[idx]), tree)
