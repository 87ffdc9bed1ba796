"""The JAX side of the oneDNN kernels: FFI calls and a differentiable conv.

`conv2d` is `lax.conv_general_dilated` with NHWC/HWIO/NHWC dimension
numbers and explicit padding, in float32, whose forward pass and both
gradients are oneDNN's own primitives (`csrc/onednn_conv.cc`). Tracing it
builds nothing: the handlers must already be registered by
`nc_jax.kernels.onednn_build.load_kernels()` (`KernelsNotLoaded`
otherwise). `onednn_conv` is the models' convolution factory
(`nc_jax.models.conv.Conv` computed by `conv2d`).

Under `vmap` (replicas of a multi-seed run) each FFI call runs once per
replica (`vmap_method="sequential"`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.kernels import onednn_build as build
from nc_jax.models.conv import Conv

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
  build.require_loaded()
  return jax.ffi.ffi_call(
      build.TARGETS[kind][0], jax.ShapeDtypeStruct(shape, np.float32),
      vmap_method="sequential")(*args, **_attrs(strides, padding))


@functools.partial(jax.jit, static_argnames=("strides", "padding"))
def conv_forward(x: jax.Array, kernel: jax.Array, *,
                 strides: tuple[int, int], padding: Padding) -> jax.Array:
  """Cross-correlation of `(N, H, W, Ci)` x by `(KH, KW, Ci, Co)` kernel.

  float32 in and out; `strides` `(sh, sw)`; `padding` `((top, bottom),
  (left, right))`. Returns `(N, Ho, Wo, Co)`.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
          padding: Padding) -> jax.Array:
  return conv_forward(x, kernel, strides=strides, padding=padding)


def _conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(jnp.float32)
  dx = conv_backward_data(dy, kernel, x_shape=x.shape, strides=strides,
                          padding=padding)
  dk = conv_backward_weights(x, dy, kernel_shape=kernel.shape,
                             strides=strides, padding=padding)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int],
           padding: Padding) -> jax.Array:
  """Differentiable NHWC x HWIO cross-correlation through oneDNN, float32.

  Inputs are cast to float32; the result is float32.

  Raises:
    ValueError: `x` not NHWC, `kernel` not HWIO, or their channels differ.
  """
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv2d needs NHWC x and HWIO kernel with matching "
                     f"channels; got {x.shape} and {kernel.shape}.")
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(a), int(b)) for a, b in padding)
  return _conv(x.astype(jnp.float32), kernel.astype(jnp.float32), strides,
               padding)


# The CIFAR ResNets' convolution factory with oneDNN computing it: the same
# module and parameters as XLA's (`Conv`), another `compute`.
onednn_conv = functools.partial(Conv, compute=conv2d)
