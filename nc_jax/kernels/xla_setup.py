"""CPU runtime defaults of the entry points: malloc settings and XLA flags.

`apply()` runs first thing in an entry point, before jax starts its
backends (both settings must be in place by then), and only for runs that
will compute on the CPU: it guesses jax's backend with `likely_backend`
(JAX_PLATFORMS, or an installed GPU/TPU plugin together with a device
node), and on an accelerator it does nothing. It never overrides what the
user set.

## malloc (CPU runs only)

XLA's CPU runtime allocates one large temporary buffer per executed step
from a worker thread. glibc serves an allocation that large on a
non-main-arena thread with a fresh mmap and returns it with munmap on free,
so every step page-faults its way through the buffer again. `tune_malloc`
therefore sets, by mallopt, one malloc arena, no mmap'd chunks and no
trimming, so the buffer is carved from the heap once and reused. The
process keeps its peak heap instead of returning it to the OS. It is not
applied on accelerators: there the host's threads (tf.data's input
pipeline above all) allocate concurrently, and a single arena would
serialise them. Opt out with NC_JAX_NO_MALLOC_TUNING=1; it is also left
alone when GLIBC_TUNABLES or MALLOC_ARENA_MAX is set, and off glibc.

## XLA flags (CPU runs only)

Which flags depend on who computes the convolutions (`nc_jax.kernels`):

* nc_jax's oneDNN kernels (a CIFAR ResNet on one CPU device in float32,
  the kernels buildable here): no flags. With the convolutions out of XLA's
  hands, XLA's own CPU defaults run the rest of the step at least as fast
  as the YNNPACK flags below.
* XLA's convolutions (bfloat16, several devices or processes, DenseNet,
  ResNet-50, `conv_impl="xla"`, no compiler): two library back-ends built
  into jaxlib, `CPU_FLAGS`: elementwise ops, reductions and dots through
  YNNPACK fusions, and every convolution through oneDNN instead of Eigen.
  Without the YNN elementwise fusions, XLA's own loop fusions fold chains of
  BatchNorm/ReLU/residual arithmetic into the transposes that feed the
  weight-gradient convolutions and recompute them there.

Users who set XLA_FLAGS themselves keep exactly their flags;
NC_JAX_NO_XLA_DEFAULTS=1 sets none. Every flag and OpenMP setting that was
tried, with its timing, is in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
from typing import Any, Mapping

import nc_jax.kernels as kernels_lib

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
             "--xla_cpu_experimental_onednn_fusion_type=individual_convolution")


def expects_onednn_convs(backbone: str, compute_dtype: str, conv_impl: str,
                         *, multi_process: bool = False) -> bool:
  """Whether a CPU run will use nc_jax's oneDNN convolution kernels.

  Decided before jax starts its backends by `nc_jax.kernels.choose` on the
  CPU backend (one device, or two or more with `multi_process`) and, for
  "auto", the cheap checks of `onednn_build.problem` (compiler and oneDNN
  wheels present; nothing is compiled). A wrong guess costs speed, never
  correctness.
  """
  try:
    choice = kernels_lib.choose(
        backbone=backbone, compute_dtype=compute_dtype, conv_impl=conv_impl,
        backend="cpu", device_count=2 if multi_process else 1)
  except ValueError:
    return False  # the run stops with this error once it validates its config
  if choice.conv != "onednn":
    return False
  if conv_impl == "onednn":
    return True  # either the kernels build or the run stops
  from nc_jax.kernels import onednn_build  # pylint: disable=g-import-not-at-top
  return onednn_build.problem() is None


# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_malloc() -> bool:
  """One arena, no mmap'd chunks, no trimming (see the module docstring).

  Must run before the threads that allocate (XLA's workers) exist. Returns
  whether the settings were applied.
  """
  if (os.environ.get("NC_JAX_NO_MALLOC_TUNING")
      or os.environ.get("GLIBC_TUNABLES")
      or os.environ.get("MALLOC_ARENA_MAX")
      or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def _field(config: Any, name: str, default: Any) -> Any:
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default)


def apply(config: Any = None, *, multi_process: bool = False) -> str:
  """Applies the malloc settings and the XLA flags of a CPU run.

  Args:
    config: the run's config (a ConfigDict, or `config.json`'s dict):
      its `backbone`, `compute_dtype` and `conv_impl` tell whether its
      convolutions will be nc_jax's oneDNN kernels (`expects_onednn_convs`),
      in which case XLA's own flag defaults are kept. None: XLA's
      convolutions.
    multi_process: the run has several processes.

  Returns:
    The backend guessed (`likely_backend`): on anything but "cpu" nothing
    was changed.

  XLA_FLAGS is left alone if set, or if NC_JAX_NO_XLA_DEFAULTS is set. Must
  run first thing in the process: before jax's backends (or anything that
  starts threads) start.
  """
  backend = likely_backend()
  if backend != "cpu":
    return backend
  # First: a thread that allocates before this gets its own malloc arena.
  tune_malloc()
  if os.environ.get("NC_JAX_NO_XLA_DEFAULTS") or os.environ.get("XLA_FLAGS"):
    return backend
  backbone = _field(config, "backbone", None)
  if backbone is not None and expects_onednn_convs(
      backbone, _field(config, "compute_dtype", "float32"),
      _field(config, "conv_impl", "auto"), multi_process=multi_process):
    return backend
  os.environ["XLA_FLAGS"] = " ".join(CPU_FLAGS)
  return backend


# --------------------------------------------------------------------------
# A guess of the backend, before jax starts.
# --------------------------------------------------------------------------

def _jax_plugins() -> list[str]:
  """Names of installed PJRT plugins (`jax_plugins.*` modules and entry
  points), found without importing any of them."""
  names = []
  try:
    spec = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    names += [m.name for m in pkgutil.iter_modules(
        list(spec.submodule_search_locations))]
  try:
    names += [ep.name for ep in importlib.metadata.entry_points(
        group="jax_plugins")]
  except Exception:  # pylint: disable=broad-except
    pass
  return names


def _has_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def likely_backend(environ: Mapping[str, str] | None = None) -> str:
  """"cpu", "gpu" or "tpu": what jax will most likely pick, starting nothing.

  For decisions that must be made before jax starts its backends (the
  malloc and XLA flag settings of `apply`). In order:
  `JAX_PLATFORMS` (its first entry) when set; "gpu" when a CUDA or ROCm
  PJRT plugin is installed and a GPU device node exists (/dev/nvidia0..,
  /dev/kfd); "tpu" when libtpu is installed and a TPU device node exists
  (/dev/accel*, /dev/vfio/N); else "cpu". It can be wrong (a driver that
  fails to start, a device owned by another process); a wrong guess costs
  speed, never correctness, because the model's implementations are decided
  again from jax's real backend by `nc_jax.kernels.resolve`.
  """
  env = os.environ if environ is None else environ
  platforms = (env.get("JAX_PLATFORMS") or "").strip()
  if platforms:
    first = platforms.split(",")[0].strip().lower()
    if first == "cpu":
      return "cpu"
    return "tpu" if "tpu" in first else "gpu"
  plugins = [n.lower() for n in _jax_plugins()]
  if (any("cuda" in n or "rocm" in n for n in plugins)
      and (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))):
    return "gpu"
  if ((_has_module("libtpu") or any("tpu" in n for n in plugins))
      and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))):
    return "tpu"
  return "cpu"
