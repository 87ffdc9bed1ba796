"""Optional CPU kernels: oneDNN's convolution primitives as XLA FFI calls.

XLA's CPU backend computes a convolution's weight gradient as another
forward convolution over transposed copies of the activation and of the
output gradient. This component calls oneDNN's forward, backward-data and
backward-weights primitives on the NHWC arrays as they are instead.
Nothing else in nc_jax needs it: models run XLA's convolutions unless they
are given `conv_impl="onednn"`, which `nc_jax.implementations` chooses only on a
single CPU device in float32, after `load()` has succeeded.

  build.py        find oneDNN, compile csrc/onednn_conv.cc into the cache,
                  load it, register the FFI targets (`load`, `available`,
                  `unavailable_reason`, `problem`)
  conv.py         the JAX side: FFI calls and the differentiable `conv2d`
  csrc/           the C++ handlers

Requirements: x86-64 Linux, a C++17 compiler (`g++`, or `$CXX`) and the
oneDNN wheels of the `cpu-kernels` extra (`pip install
'nc_jax[cpu-kernels]'`, or `NC_JAX_ONEDNN_ROOT` pointing at a oneDNN
install). The library is compiled on first use (a few seconds) into
`$NC_JAX_CACHE/kernels`. Without any of these, or with `NC_JAX_NO_ONEDNN=1`,
`load()` raises `KernelsUnavailable` with one line saying why, and the
automatic choice uses XLA's convolutions.
"""

from nc_jax.cpu_kernels.build import (KernelsNotLoaded, KernelsUnavailable,
                                      available, is_loaded, library_path, load,
                                      problem, unavailable_reason)
from nc_jax.cpu_kernels.conv import (conv2d, conv_backward_data,
                                     conv_backward_weights, conv_forward)

__all__ = [
    "KernelsNotLoaded", "KernelsUnavailable", "available", "conv2d",
    "conv_backward_data", "conv_backward_weights", "conv_forward",
    "is_loaded", "library_path", "load", "problem", "unavailable_reason",
]
