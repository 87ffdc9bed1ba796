"""Build, load and register the oneDNN kernels (the native side).

`load_kernels()` compiles `csrc/onednn_conv.cc` (three typed XLA FFI handlers:
forward, backward-data, backward-weights, on NHWC activations and HWIO
kernels) against the oneDNN of the `onednn-cpu-gomp` /
`onednn-devel-cpu-gomp` wheels (the `cpu-kernels` extra), loads the shared
library and registers the handlers with `jax.ffi` for the CPU platform.
It is called once, at start-up, by `nc_jax.kernels.resolve` (never while a
model is traced: the JAX side, `nc_jax.kernels.onednn_conv`, only checks
that the handlers are registered).

The library is built once per (source, jaxlib, oneDNN, compiler) into
`$NC_JAX_CACHE/kernels` (`nc_jax.cache`; default `~/.cache/nc_jax/kernels`),
through a temporary file renamed into place, so concurrent processes may
race safely. When it cannot be built here (`NC_JAX_NO_ONEDNN=1`, not x86-64
Linux, no C++ compiler, no oneDNN wheels, an unwritable cache, a failed
compile) `load_kernels()` raises `KernelsUnavailable` with a one-line reason that
names the fix, and the failure is remembered for the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

from nc_jax import cache

SOURCE = pathlib.Path(__file__).parent / "csrc" / "onednn_conv.cc"
# kind -> (XLA custom-call target name, exported C symbol).
TARGETS = {
    "forward": ("nc_jax_onednn_conv_forward", "NcConvForward"),
    "backward_data": ("nc_jax_onednn_conv_backward_data",
                      "NcConvBackwardData"),
    "backward_weights": ("nc_jax_onednn_conv_backward_weights",
                         "NcConvBackwardWeights"),
}
ONEDNN_WHEELS = ("onednn-cpu-gomp==2023.2.0", "onednn-devel-cpu-gomp==2023.2.0")
OFF_SWITCH = "NC_JAX_NO_ONEDNN"

_lock = threading.Lock()
_state: dict[str, object] = {}


class KernelsUnavailable(RuntimeError):
  """The kernels cannot be built or loaded here; the message says why."""


class KernelsNotLoaded(RuntimeError):
  """A oneDNN convolution was traced before `load_kernels()` ran in this process."""


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
      raise KernelsUnavailable(
          f"NC_JAX_ONEDNN_ROOT={root} has no include/oneapi/dnnl/dnnl.hpp "
          "and lib/libdnnl.so*")
    return inc, libs[0]
  header = _dist_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
  lib = (_dist_file("onednn-cpu-gomp", "/libdnnl.so.3")
         or _dist_file("onednn-cpu-gomp", "/libdnnl.so"))
  if header is None or lib is None:
    raise KernelsUnavailable(
        "oneDNN wheels not installed (pip install 'nc_jax[cpu-kernels]', "
        f"i.e. {' '.join(ONEDNN_WHEELS)})")
  return header.parent.parent.parent, lib


def _compiler() -> str:
  name = os.environ.get("CXX", "g++")
  cxx = shutil.which(name)
  if cxx is None:
    raise KernelsUnavailable(
        f"no C++ compiler ({name} not on PATH; install g++ or set CXX)")
  return cxx


def _check_platform() -> None:
  if os.environ.get(OFF_SWITCH):
    raise KernelsUnavailable(f"switched off by {OFF_SWITCH}")
  if not (sys.platform.startswith("linux") and
          os.uname().machine in ("x86_64", "AMD64")):
    raise KernelsUnavailable(
        f"built for x86-64 Linux only (this is {sys.platform}/"
        f"{os.uname().machine})")


def problem() -> str | None:
  """Why the kernels could not be built here, from cheap checks only.

  Looks at the switch, the platform, the compiler and the oneDNN wheels;
  compiles nothing and starts no jax backend (`nc_jax.kernels.xla_setup`
  asks before the backends start). None does not promise that a build
  succeeds.
  """
  try:
    _check_platform()
    _compiler()
    _find_onednn()
  except KernelsUnavailable as e:
    return str(e)
  return None


def _cache_dir() -> pathlib.Path:
  return cache.cache_root() / "kernels"


def _compile(cmd: list[str]) -> subprocess.CompletedProcess:
  """Runs the compiler (the one place that does; tests patch it)."""
  return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _build() -> pathlib.Path:
  """Compiles the kernels unless a cached build matches; returns the .so."""
  import jax  # pylint: disable=g-import-not-at-top

  _check_platform()
  cxx = _compiler()
  inc, lib = _find_onednn()
  ffi_inc = pathlib.Path(jax.ffi.include_dir())
  source = SOURCE.read_bytes()
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
    raise KernelsUnavailable(
        f"cannot write the kernel cache {out.parent} ({e.strerror or e}); "
        f"set {cache.ENV} to a writable folder") from e
  cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC",
         f"-I{inc}", f"-I{ffi_inc}", str(SOURCE),
         "-o", tmp, str(lib), f"-Wl,-rpath,{lib.parent}"]
  proc = _compile(cmd)
  if proc.returncode != 0:
    os.unlink(tmp)
    log = out.with_suffix(".log")
    try:
      log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
      where = f"log: {log}"
    except OSError:
      where = "no log written"
    raise KernelsUnavailable(
        f"compiling {SOURCE.name} with {cxx} failed ({where})")
  os.replace(tmp, out)
  return out


def _load() -> None:
  import jax  # pylint: disable=g-import-not-at-top

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
      raise KernelsUnavailable(f"cannot load {path}: {e}") from e
  for target, symbol in TARGETS.values():
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  _state["library"] = library  # keeps the handlers loaded
  _state["path"] = str(path)


def load_kernels() -> None:
  """Builds (if needed), loads and registers the kernels, once per process.

  Raises:
    KernelsUnavailable: they cannot be built or loaded here; the one-line
      message says why and what to install. Raised again, without a new
      attempt, on later calls in the same process.
  """
  with _lock:
    if "error" not in _state:
      try:
        _load()
        _state["error"] = None
      except KernelsUnavailable as e:
        _state["error"] = str(e)
    error = _state["error"]
  if error is not None:
    raise KernelsUnavailable(error)


def available() -> bool:
  """`load_kernels()` succeeded (it is attempted by this call if it has not been)."""
  try:
    load_kernels()
  except KernelsUnavailable:
    return False
  return True


def unavailable_reason() -> str | None:
  """Why `available()` is False (one line, with the fix), or None."""
  try:
    load_kernels()
  except KernelsUnavailable as e:
    return str(e)
  return None


def is_loaded() -> bool:
  """Whether the handlers are registered in this process (builds nothing)."""
  return "library" in _state


def library_path() -> str | None:
  """The loaded shared library's path, or None (builds nothing)."""
  return _state.get("path")  # type: ignore[return-value]


def require_loaded() -> None:
  """Raises `KernelsNotLoaded` unless `load_kernels()` has succeeded.

  What the JAX side calls while tracing: it never builds anything.
  """
  if not is_loaded():
    raise KernelsNotLoaded(
        "nc_jax's oneDNN kernels are not loaded in this process; call "
        "nc_jax.kernels.onednn_build.load_kernels() at start-up "
        "(nc_jax.kernels.resolve does) before tracing a model with "
        "conv_impl='onednn'.")
