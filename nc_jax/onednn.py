"""oneDNN convolution kernels for XLA's CPU backend, built on first use.

XLA sends forward convolutions to oneDNN on CPU, but it computes a weight
gradient as another forward convolution over transposed copies of the
activation and of the output gradient. On the 2-core dev box those copies
and that odd-shaped convolution made a ResNet-32 train step about 1.5x
slower than PyTorch's, which calls oneDNN's own backward primitives. This
module compiles `csrc/onednn_conv.cc` (three typed XLA FFI handlers: forward,
backward-data, backward-weights, all on NHWC activations and HWIO kernels)
against the oneDNN of the `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels
and registers them with JAX. `nc_jax.models.conv` decides when to use them.

The shared library is built once per (source, jaxlib, oneDNN, compiler) into
`$NC_JAX_CACHE/kernels` (`nc_jax.cache`; default `~/.cache/nc_jax/kernels`),
with a temporary file renamed into place, so concurrent processes may race
safely. If anything is missing (no C++ compiler, no oneDNN headers, not x86-64 Linux)
`available()` is False, `unavailable_reason()` says why and what to install,
and callers fall back to XLA's convolutions. `NC_JAX_NO_ONEDNN=1` switches
the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import numpy as np

from nc_jax import cache

_SOURCE = pathlib.Path(__file__).parent / "csrc" / "onednn_conv.cc"
_TARGETS = {
    "forward": ("nc_jax_onednn_conv_forward", "NcConvForward"),
    "backward_data": ("nc_jax_onednn_conv_backward_data",
                      "NcConvBackwardData"),
    "backward_weights": ("nc_jax_onednn_conv_backward_weights",
                         "NcConvBackwardWeights"),
}
_INSTALL_HINT = ("pip install onednn-cpu-gomp==2023.2.0 "
                 "onednn-devel-cpu-gomp==2023.2.0 and a C++17 compiler (g++)")

_lock = threading.Lock()
_state: dict[str, object] = {}


class OneDNNUnavailable(RuntimeError):
  """The kernels cannot be built or loaded here; the message says why."""


def _dist_file(dist: str, suffix: str) -> pathlib.Path | None:
  """The installed file of distribution `dist` whose path ends in `suffix`."""
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if ("/" + str(f).replace("\\", "/")).endswith(suffix):
      path = pathlib.Path(f.locate()).resolve()
      if path.exists():
        return path
  return None


def _find_onednn() -> tuple[pathlib.Path, pathlib.Path]:
  """(include dir holding oneapi/dnnl/dnnl.hpp, path of libdnnl.so)."""
  root = os.environ.get("NC_JAX_ONEDNN_ROOT")
  if root:
    inc = pathlib.Path(root) / "include"
    libs = sorted((pathlib.Path(root) / "lib").glob("libdnnl.so*"))
    if not (inc / "oneapi" / "dnnl" / "dnnl.hpp").exists() or not libs:
      raise OneDNNUnavailable(
          f"NC_JAX_ONEDNN_ROOT={root} has no include/oneapi/dnnl/dnnl.hpp "
          "and lib/libdnnl.so*.")
    return inc, libs[0]
  header = _dist_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
  lib = (_dist_file("onednn-cpu-gomp", "/libdnnl.so.3")
         or _dist_file("onednn-cpu-gomp", "/libdnnl.so"))
  if header is None or lib is None:
    raise OneDNNUnavailable(
        f"oneDNN headers or library not installed ({_INSTALL_HINT}).")
  return header.parent.parent.parent, lib


def _cache_dir() -> pathlib.Path:
  return cache.cache_root() / "kernels"


def _build() -> pathlib.Path:
  """Compiles the kernels if no cached build matches; returns the .so path."""
  if not (sys.platform.startswith("linux") and
          os.uname().machine in ("x86_64", "AMD64")):
    raise OneDNNUnavailable(
        f"the oneDNN kernels are built for x86-64 Linux only (this is "
        f"{sys.platform}/{os.uname().machine}).")
  cxx = shutil.which(os.environ.get("CXX", "g++"))
  if cxx is None:
    raise OneDNNUnavailable(
        f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH; install "
        "g++ or set CXX.")
  inc, lib = _find_onednn()
  ffi_inc = pathlib.Path(jax.ffi.include_dir())
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(b"\0".join([
      source, jax.__version__.encode(), str(ffi_inc).encode(),
      str(inc).encode(), str(lib).encode(), cxx.encode(),
  ])).hexdigest()[:16]
  out = _cache_dir() / f"onednn_conv_{key}.so"
  if out.exists():
    return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
  except OSError as e:
    raise OneDNNUnavailable(
        f"cannot write the kernel cache {out.parent} ({e}); set "
        f"{cache.ENV} to a writable folder.") from e
  cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC",
         f"-I{inc}", f"-I{ffi_inc}", str(_SOURCE),
         "-o", tmp, str(lib), f"-Wl,-rpath,{lib.parent}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise OneDNNUnavailable(
        "compiling the oneDNN kernels failed:\n  " + " ".join(cmd) + "\n" +
        proc.stderr[-2000:])
  os.replace(tmp, out)
  return out


def _load() -> None:
  if os.environ.get("NC_JAX_NO_ONEDNN"):
    raise OneDNNUnavailable("switched off by NC_JAX_NO_ONEDNN.")
  path = _build()
  try:
    library = ctypes.CDLL(str(path))
  except OSError:
    # A damaged cache entry (e.g. a disk that filled up): build it again.
    path.unlink(missing_ok=True)
    path = _build()
    try:
      library = ctypes.CDLL(str(path))
    except OSError as e:
      raise OneDNNUnavailable(f"cannot load {path}: {e}") from e
  for target, symbol in _TARGETS.values():
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  _state["library"] = library  # keeps the handlers loaded
  _state["path"] = str(path)


def _ensure() -> str | None:
  """Builds and registers once per process; returns the failure, if any."""
  with _lock:
    if "error" not in _state:
      try:
        _load()
        _state["error"] = None
      except OneDNNUnavailable as e:
        _state["error"] = str(e)
    return _state["error"]  # type: ignore[return-value]


def available() -> bool:
  """True when the kernels are built and registered (builds on first call)."""
  return _ensure() is None


def unavailable_reason() -> str | None:
  """Why `available()` is False (with what to install), or None."""
  return _ensure()


def library_path() -> str | None:
  """The loaded shared library's path, or None."""
  _ensure()
  return _state.get("path")  # type: ignore[return-value]


Padding = tuple[tuple[int, int], tuple[int, int]]


def _attrs(strides: tuple[int, int], padding: Padding) -> dict[str, np.int64]:
  (pt, pb), (pl, pr) = padding
  return {"stride_h": np.int64(strides[0]), "stride_w": np.int64(strides[1]),
          "pad_top": np.int64(pt), "pad_left": np.int64(pl),
          "pad_bottom": np.int64(pb), "pad_right": np.int64(pr)}


def output_shape(x_shape, kernel_shape, strides: tuple[int, int],
                 padding: Padding) -> tuple[int, int, int, int]:
  """`(N, Ho, Wo, Co)` of a convolution of NHWC `x_shape` by HWIO kernel."""
  n, h, w, _ = x_shape
  kh, kw, _, co = kernel_shape
  (pt, pb), (pl, pr) = padding
  return (n, (h + pt + pb - kh) // strides[0] + 1,
          (w + pl + pr - kw) // strides[1] + 1, co)


def _call(kind: str, shape, *args, strides, padding) -> jax.Array:
  error = _ensure()
  if error is not None:
    raise OneDNNUnavailable(error)
  return jax.ffi.ffi_call(
      _TARGETS[kind][0], jax.ShapeDtypeStruct(shape, np.float32),
      vmap_method="sequential")(*args, **_attrs(strides, padding))


@functools.partial(jax.jit, static_argnames=("strides", "padding"))
def conv_forward(x: jax.Array, kernel: jax.Array, *,
                 strides: tuple[int, int], padding: Padding) -> jax.Array:
  """Cross-correlation, as `lax.conv_general_dilated` with NHWC/HWIO/NHWC.

  Args:
    x: `(N, H, W, Ci)` float32.
    kernel: `(KH, KW, Ci, Co)` float32.
    strides: `(sh, sw)`.
    padding: `((top, bottom), (left, right))`, explicit.

  Returns:
    `(N, Ho, Wo, Co)` float32.
  """
  shape = output_shape(x.shape, kernel.shape, strides, padding)
  return _call("forward", shape, x, kernel, strides=strides, padding=padding)


@functools.partial(jax.jit,
                   static_argnames=("x_shape", "strides", "padding"))
def conv_backward_data(dy: jax.Array, kernel: jax.Array, *,
                       x_shape: tuple[int, int, int, int],
                       strides: tuple[int, int], padding: Padding
                       ) -> jax.Array:
  """Gradient of `conv_forward` with respect to `x`: `(N, H, W, Ci)`."""
  return _call("backward_data", tuple(x_shape), dy, kernel, strides=strides,
               padding=padding)


@functools.partial(jax.jit,
                   static_argnames=("kernel_shape", "strides", "padding"))
def conv_backward_weights(x: jax.Array, dy: jax.Array, *,
                          kernel_shape: tuple[int, int, int, int],
                          strides: tuple[int, int], padding: Padding
                          ) -> jax.Array:
  """Gradient of `conv_forward` with respect to the kernel: HWIO."""
  return _call("backward_weights", tuple(kernel_shape), x, dy,
               strides=strides, padding=padding)
