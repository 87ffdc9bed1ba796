"""The CPU kernels, as one plugin: which layers a run's model is given.

A model is given its layers (`nc_jax.models`: `conv=` for the CIFAR
ResNets, `norm=` for every backbone and the ETF head); it never asks which
library computes them. This package is the one place that decides, once
per run, before anything is built, from two config fields, `conv_impl`
("auto", "xla", "onednn") and `norm_impl` ("auto", "flax", "fused"), and
the backend:

                      conv                          norm
  CPU                 onednn: one device, float32,   fused
                      a CIFAR ResNet, the kernels
                      built; else xla
  GPU / TPU           xla                            flax

`resolve(config)` answers with `Layers`: the factories the builder passes
to the model (`model_options`), what training records in `config.json` and
`results.json` and compares on resume (`record`), and one line for the log
(`describe`). `choose` is the same decision without building anything
(the process set-up, `xla_setup`, asks it before jax starts).

The plugin's parts:
  onednn_build.py  finds oneDNN, compiles csrc/onednn_conv.cc, loads it
  onednn_conv.py   the FFI calls, the differentiable conv, `onednn_conv`
  fused_norm.py    BatchNorm + residual + ReLU with a hand-written gradient
  xla_setup.py     malloc and XLA flags, set before jax starts

Why these defaults: on CPU, oneDNN's own backward primitives and the fused
BatchNorm (a gradient shaped for XLA's CPU fusion) make the ResNet-32 train
step much faster (docs/performance.md). On accelerators XLA's convolutions
are the vendor libraries' already, an opaque CPU custom call cannot run,
and the fused BatchNorm has not been measured there. Both BatchNorms have
the same variables and agree to float32 rounding, and both convolutions
the same parameters, so checkpoints move between them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

CONV_IMPLS = ("auto", "xla", "onednn")
NORM_IMPLS = ("auto", "flax", "fused")
# The config fields a run requests its layers with (a resume compares what
# they resolve to, `Layers.record`, not the requests).
REQUEST_FIELDS = ("conv_impl", "norm_impl")


@dataclasses.dataclass(frozen=True)
class Layers:
  """A resolved choice of the layers' implementations.

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

  def model_options(self, backbone: str) -> dict[str, Callable[..., Any]]:
    """The layer factories for `nc_jax.models.create_model` (`norm`, and
    `conv` for a backbone that takes one)."""
    from nc_jax import models  # pylint: disable=g-import-not-at-top
    out: dict[str, Callable[..., Any]] = {"norm": _norm_factory(self.norm)}
    if models.takes_conv(backbone):
      out["conv"] = _conv_factory(self.conv)
    elif self.conv != "xla":
      raise ValueError(f"Backbone {backbone!r} runs XLA's convolutions "
                       f"only, not {self.conv!r}.")
    return out


def _norm_factory(name: str) -> Callable[..., Any]:
  if name == "fused":
    from nc_jax.kernels import fused_norm  # pylint: disable=g-import-not-at-top
    return fused_norm.fused_batch_norm
  from nc_jax.models import layers  # pylint: disable=g-import-not-at-top
  return layers.batch_norm


def _conv_factory(name: str) -> Callable[..., Any]:
  if name == "onednn":
    from nc_jax.kernels import onednn_conv  # pylint: disable=g-import-not-at-top
    return onednn_conv.onednn_conv
  from nc_jax.models import conv  # pylint: disable=g-import-not-at-top
  return conv.Conv


def choose(*, backbone: str, compute_dtype: str = "float32",
           conv_impl: str = "auto", norm_impl: str = "auto",
           backend: str, device_count: int = 1) -> Layers:
  """The implementations that apply, without checking the kernels build.

  Args:
    backbone: a key of `nc_jax.models.BACKBONES`.
    compute_dtype: "float32" or "bfloat16".
    conv_impl: "auto", "xla" or "onednn".
    norm_impl: "auto", "flax" or "fused".
    backend: jax's backend name ("cpu", "gpu", "cuda", "rocm", "tpu").
    device_count: devices the step runs on (the mesh; all processes').

  Returns:
    `Layers`; conv "onednn" means oneDNN's apply here (`resolve` then
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
  cpu = backend.lower() == "cpu"
  norm = norm_impl if norm_impl != "auto" else ("fused" if cpu else "flax")
  if conv_impl == "xla":
    return Layers("xla", norm)
  if not models.takes_conv(backbone):
    if conv_impl == "onednn":
      raise ValueError(
          f"conv_impl='onednn' is implemented for the CIFAR ResNets, not "
          f"{backbone!r}; use conv_impl='auto' or 'xla'.")
    return Layers("xla", norm)
  problems = []
  if not cpu:
    problems.append(f"the backend is {backend}, not cpu")
  if device_count != 1:
    problems.append(f"there are {device_count} devices, not 1")
  if compute_dtype != "float32":
    problems.append(f"the compute dtype is {compute_dtype}, not float32")
  if not problems:
    return Layers("onednn", norm)
  if conv_impl == "auto":
    return Layers("xla", norm)
  raise ValueError("conv_impl='onednn' cannot run here: " +
                   "; ".join(problems) + ". Use conv_impl='auto' or 'xla'.")


def resolve(config: Any, *, backend: str | None = None,
            device_count: int | None = None,
            for_loading: bool = False) -> Layers:
  """The layers `config` runs with in this process, the kernels loaded.

  Call once at start-up, before any model is traced: this is where the
  oneDNN kernels are compiled (first use on a machine) and registered.

  Args:
    config: with `backbone`, `compute_dtype`, `conv_impl`, `norm_impl` (a
      ConfigDict or any object with those attributes).
    backend: default `jax.default_backend()`.
    device_count: default `jax.device_count()` (all processes' devices).
    for_loading: a trained model to evaluate or use: parameters are the
      same whichever implementation computes them, so one asked for that
      cannot run here (oneDNN's on an accelerator) falls back to "auto".

  Raises:
    ValueError: as `choose`, and for `conv_impl="onednn"` where the kernels
      cannot be built (one line: why, and what to pass instead); not with
      `for_loading`.
  """
  if backend is None or device_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    backend = jax.default_backend() if backend is None else backend
    device_count = jax.device_count() if device_count is None else device_count
  request = dict(conv_impl=config.conv_impl,
                 norm_impl=getattr(config, "norm_impl", "auto"))
  try:
    return _resolve(config, backend, device_count, **request)
  except ValueError:
    if not for_loading:
      raise
  return _resolve(config, backend, device_count, conv_impl="auto",
                  norm_impl="auto")


def _resolve(config: Any, backend: str, device_count: int, *,
             conv_impl: str, norm_impl: str) -> Layers:
  layers = choose(backbone=config.backbone,
                  compute_dtype=config.compute_dtype, conv_impl=conv_impl,
                  norm_impl=norm_impl, backend=backend,
                  device_count=device_count)
  if layers.conv != "onednn":
    return layers
  from nc_jax.kernels import onednn_build  # pylint: disable=g-import-not-at-top
  try:
    onednn_build.load_kernels()
  except onednn_build.KernelsUnavailable as e:
    if conv_impl == "auto":
      return Layers("xla", layers.norm,
                    note=f"oneDNN kernels unavailable: {e}")
    raise ValueError(f"conv_impl='onednn' cannot run here: oneDNN kernels "
                     f"unavailable: {e}. Use conv_impl='auto' or 'xla'."
                     ) from None
  return layers
