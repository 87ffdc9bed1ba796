"""Which convolution and BatchNorm implementations a run uses: the one decider.

"Kernels" in nc_jax means one thing: oneDNN's compiled C++ convolution
primitives (`nc_jax.cpu_kernels`), one of the implementations decided here.

A run asks with two config fields, `conv_impl` ("auto", "xla", "onednn")
and `norm_impl` ("auto", "flax", "fused"), and this module answers once, at
start-up, from the config and the backend:

                      conv                         norm
  CPU                 onednn: one device, float32,  fused
                      a CIFAR ResNet, kernels built
                      (`nc_jax.cpu_kernels`); else
                      xla
  GPU / TPU           xla                           flax

The answer, an `Implementations`, is what the builder injects into the
model (models never decide), what training writes to `config.json` and `results.json`
(`record()`) and compares on resume, what the benchmark reports, and (from
the config and a guess of the backend, before jax starts) what
`nc_jax.cli.xla_defaults` tunes the process for.

Why these defaults: on CPU, oneDNN's own backward primitives and the fused
BatchNorm (a hand-written gradient shaped for XLA's CPU fusion) make the
ResNet-32 train step much faster (docs/performance.md). On accelerators
XLA's convolutions are the vendor libraries' already, an opaque CPU custom
call cannot run at all, and the fused BatchNorm's CPU tricks have not been
measured there, so they get the plain Flax path. The two BatchNorms have
the same variables and agree to float32 rounding, so checkpoints move
between them; the two convolutions have the same parameters.

Functions:
  choose(...)          the decision, pure (no jax, no building): which
                       implementations apply, given a backend.
  resolve(...)         `choose` on this process's backend and devices, then
                       loads the oneDNN kernels if they are chosen; "auto"
                       falls back to XLA's convolutions, with the reason in
                       `Implementations.note`, when they cannot be built here.
  resolve_implementations(config)  `resolve` with the config's fields.
  likely_backend()     a guess of jax's backend that starts nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
from typing import Any, Mapping

CONV_IMPLS = ("auto", "xla", "onednn")
NORM_IMPLS = ("auto", "flax", "fused")


@dataclasses.dataclass(frozen=True)
class Implementations:
  """A resolved choice.

  Attributes:
    conv: "onednn" or "xla".
    norm: "fused" or "flax".
    note: why the convolutions are XLA's although oneDNN's were wanted
      ("auto" on a CPU where the kernels cannot be built), else None.
  """
  conv: str
  norm: str
  note: str | None = None

  def record(self) -> dict[str, str]:
    """What `config.json` and `results.json` hold, and resume compares."""
    return {"conv_impl": self.conv, "norm_impl": self.norm}

  def describe(self) -> str:
    """For the log: "onednn convolutions, fused BatchNorm"."""
    conv = f"{self.conv} convolutions"
    if self.note:
      conv += f" ({self.note})"
    return f"{conv}, {self.norm} BatchNorm"


def _is_cpu(backend: str) -> bool:
  return backend.lower() == "cpu"


def choose(*, backbone: str, compute_dtype: str = "float32",
           conv_impl: str = "auto", norm_impl: str = "auto",
           backend: str, device_count: int = 1) -> Implementations:
  """The implementations that apply, without checking the kernels build.

  Args:
    backbone: a key of `nc_jax.models.BACKBONES`.
    compute_dtype: "float32" or "bfloat16".
    conv_impl: "auto", "xla" or "onednn".
    norm_impl: "auto", "flax" or "fused".
    backend: jax's backend name ("cpu", "gpu", "cuda", "rocm", "tpu").
    device_count: devices the step runs on (the mesh; all processes').

  Returns:
    `Implementations`; conv "onednn" means oneDNN's apply here (`resolve` then
    checks that they build).

  Raises:
    ValueError: an unknown name, or "onednn" asked for where it cannot run
      (the message says why and what to pass instead).
  """
  from nc_jax import models  # pylint: disable=g-import-not-at-top

  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl {conv_impl!r}; expected one of "
                     f"{CONV_IMPLS}.")
  if norm_impl not in NORM_IMPLS:
    raise ValueError(f"Unknown norm_impl {norm_impl!r}; expected one of "
                     f"{NORM_IMPLS}.")
  cpu = _is_cpu(backend)
  norm = norm_impl if norm_impl != "auto" else ("fused" if cpu else "flax")
  if conv_impl == "xla":
    return Implementations("xla", norm)
  problems = []
  if not models.supports_onednn_convs(backbone):
    if conv_impl == "onednn":
      raise ValueError(
          f"conv_impl='onednn' is implemented for the CIFAR ResNets, not "
          f"{backbone!r}; use conv_impl='auto' or 'xla'.")
    return Implementations("xla", norm)
  if not cpu:
    problems.append(f"the backend is {backend}, not cpu")
  if device_count != 1:
    problems.append(f"there are {device_count} devices, not 1")
  if compute_dtype != "float32":
    problems.append(f"the compute dtype is {compute_dtype}, not float32")
  if not problems:
    return Implementations("onednn", norm)
  if conv_impl == "auto":
    return Implementations("xla", norm)
  raise ValueError("conv_impl='onednn' cannot run here: " +
                   "; ".join(problems) + ". Use conv_impl='auto' or 'xla'.")


def resolve(*, backbone: str, compute_dtype: str = "float32",
            conv_impl: str = "auto", norm_impl: str = "auto",
            backend: str | None = None,
            device_count: int | None = None) -> Implementations:
  """`choose` for this process, with the oneDNN kernels loaded if chosen.

  Call once at start-up, before any model is traced: this is where the
  kernels are compiled (first use on a machine) and registered.

  Args:
    backbone, compute_dtype, conv_impl, norm_impl: as in `choose`.
    backend: default `jax.default_backend()`.
    device_count: default `jax.device_count()` (all processes' devices).

  Raises:
    ValueError: as `choose`, and for `conv_impl="onednn"` where the kernels
      cannot be built (one line: why, and what to pass instead).
  """
  if backend is None or device_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    backend = jax.default_backend() if backend is None else backend
    device_count = jax.device_count() if device_count is None else device_count
  kernels = choose(backbone=backbone, compute_dtype=compute_dtype,
                   conv_impl=conv_impl, norm_impl=norm_impl, backend=backend,
                   device_count=device_count)
  if kernels.conv != "onednn":
    return kernels
  from nc_jax import cpu_kernels  # pylint: disable=g-import-not-at-top
  try:
    cpu_kernels.load()
  except cpu_kernels.KernelsUnavailable as e:
    if conv_impl == "auto":
      return Implementations("xla", kernels.norm,
                     note=f"oneDNN kernels unavailable: {e}")
    raise ValueError(f"conv_impl='onednn' cannot run here: oneDNN kernels "
                     f"unavailable: {e}. Use conv_impl='auto' or 'xla'."
                     ) from None
  return kernels


def resolve_implementations(config: Any, *, backend: str | None = None,
                    device_count: int | None = None) -> Implementations:
  """`resolve` with `config.backbone`, `compute_dtype`, `conv_impl` and
  `norm_impl` (a ConfigDict or any object with those attributes)."""
  return resolve(backbone=config.backbone,
                 compute_dtype=config.compute_dtype,
                 conv_impl=config.conv_impl,
                 norm_impl=getattr(config, "norm_impl", "auto"),
                 backend=backend, device_count=device_count)


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
  malloc and XLA flag settings of `nc_jax.cli.xla_defaults`). In order:
  `JAX_PLATFORMS` (its first entry) when set; "gpu" when a CUDA or ROCm
  PJRT plugin is installed and a GPU device node exists (/dev/nvidia0..,
  /dev/kfd); "tpu" when libtpu is installed and a TPU device node exists
  (/dev/accel*, /dev/vfio/N); else "cpu". It can be wrong (a driver that
  fails to start, a device owned by another process); a wrong guess costs
  speed, never correctness, because the model's implementations are decided
  again from jax's real backend by `resolve`.
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
