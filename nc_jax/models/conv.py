"""A 2-D convolution layer that picks its kernels: XLA's, or oneDNN's on CPU.

`Conv` is a drop-in for the bias-free `flax.linen.Conv` of the backbones:
the same `params/kernel` (HWIO, float32), the same output. What differs is
how the convolution and its two gradients are computed:

  xla     `lax.conv_general_dilated` and its autodiff transpose (every
          platform, every dtype).
  onednn  `nc_jax.onednn`'s FFI kernels: oneDNN's forward, backward-data and
          backward-weights primitives on the NHWC arrays as they are.
          CPU, float32, one device.
  auto    onednn where it applies and is available (CPU backend, a single
          device, float32 compute, kernels built), else xla.

Why: on the 2-core dev box oneDNN's primitives ran a ResNet-32 3x3
convolution's forward + both gradients in 10.7 / 8.8 / 7.4 ms (32x32x16,
16x16x32, 8x8x64, batch 128) against XLA's 25.1 / 15.7 / 11.1 ms, most of
the difference being XLA's weight gradient, which it computes as a forward
convolution over transposed copies of both operands. Whole ResNet-32 train
step: 587 ms with xla, 327-358 ms with onednn
(`python -m experiments.benchmark --conv_impl xla|onednn --json`).

"auto" keeps xla on several devices because an opaque custom call has no
SPMD partitioning rule: XLA would gather a batch-sharded operand onto every
device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax import onednn

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

CONV_IMPLS = ("auto", "xla", "onednn")


def resolve_conv_impl(impl: str, dtype: Dtype = jnp.float32) -> str:
  """Maps "auto" to "onednn" or "xla"; checks that "onednn" can run here.

  Args:
    impl: one of `CONV_IMPLS`.
    dtype: the compute dtype of the convolutions.

  Returns:
    "onednn" or "xla".

  Raises:
    ValueError: unknown `impl`, or "onednn" asked for where it cannot run
      (the message says why and what to do instead).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl {impl!r}; expected one of "
                     f"{CONV_IMPLS}.")
  if impl == "xla":
    return "xla"
  problems = []
  if jax.default_backend() != "cpu":
    problems.append(f"the backend is {jax.default_backend()}, not cpu")
  if jax.device_count() != 1:
    problems.append(f"there are {jax.device_count()} devices, not 1")
  if jnp.dtype(dtype) != jnp.float32:
    problems.append(f"the compute dtype is {jnp.dtype(dtype).name}, not "
                    "float32")
  if not problems and not onednn.available():
    problems.append(onednn.unavailable_reason())
  if not problems:
    return "onednn"
  if impl == "auto":
    return "xla"
  raise ValueError("conv_impl='onednn' cannot run here: " +
                   "; ".join(problems) + ". Use conv_impl='auto' or 'xla'.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: Padding) -> jax.Array:
  return onednn.conv_forward(x, kernel, strides=strides, padding=padding)


def _onednn_conv_fwd(x, kernel, strides, padding):
  return _onednn_conv(x, kernel, strides, padding), (x, kernel)


def _onednn_conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(jnp.float32)
  dx = onednn.conv_backward_data(dy, kernel, x_shape=x.shape,
                                 strides=strides, padding=padding)
  dk = onednn.conv_backward_weights(x, dy, kernel_shape=kernel.shape,
                                    strides=strides, padding=padding)
  return dx, dk


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int],
           padding: Padding, impl: str = "xla") -> jax.Array:
  """NHWC x HWIO cross-correlation with explicit padding.

  Args:
    x: `(N, H, W, Ci)`.
    kernel: `(KH, KW, Ci, Co)`, same dtype as `x`.
    strides: `(sh, sw)`.
    padding: `((top, bottom), (left, right))`.
    impl: "xla" or "onednn" (already resolved, see `resolve_conv_impl`).

  Returns:
    `(N, Ho, Wo, Co)` in `x`'s dtype; differentiable in `x` and `kernel`.
  """
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv2d needs NHWC x and HWIO kernel with matching "
                     f"channels; got {x.shape} and {kernel.shape}.")
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(a), int(b)) for a, b in padding)
  if impl == "onednn":
    return _onednn_conv(x.astype(jnp.float32), kernel.astype(jnp.float32),
                        strides, padding)
  if impl != "xla":
    raise ValueError(f"conv2d impl must be 'xla' or 'onednn', got {impl!r}.")
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
  """Bias-free 2-D convolution (NHWC), a `flax.linen.Conv` look-alike.

  Attributes:
    features: output channels.
    kernel_size: `(KH, KW)`.
    strides: `(sh, sw)`.
    padding: `((top, bottom), (left, right))`, explicit.
    kernel_init: initialiser of the float32 HWIO kernel.
    dtype: compute dtype (inputs and kernel are cast to it).
    impl: "auto", "xla" or "onednn" (see the module docstring).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Sequence[Sequence[int]] = ((1, 1), (1, 1))
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`(N, H, W, Ci)` -> `(N, Ho, Wo, features)` in `dtype`."""
    kernel = self.param(
        "kernel", self.kernel_init,
        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    impl = resolve_conv_impl(self.impl, self.dtype)
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype),
                  strides=tuple(self.strides),
                  padding=tuple(tuple(p) for p in self.padding), impl=impl)
