"""The 2-D convolution of the CIFAR ResNets, with injected kernels.

`Conv` is a drop-in for the bias-free `flax.linen.Conv` of the backbones:
the same `params/kernel` (HWIO, float32), the same output. Its `impl`,
chosen once at start-up by `nc_jax.implementations` and passed down by the builder,
says how the convolution and its two gradients are computed:

  xla     `lax.conv_general_dilated` and its autodiff transpose (every
          platform, every dtype; the default).
  onednn  `nc_jax.cpu_kernels.conv2d`: oneDNN's forward, backward-data and
          backward-weights primitives on the NHWC arrays as they are. CPU,
          float32, one device, and `nc_jax.cpu_kernels.load()` must have
          succeeded (tracing never builds anything).

Why a second implementation: XLA's CPU backend computes the weight gradient
as a forward convolution over transposed copies of both operands, which
oneDNN's backward-weights primitive avoids. It stays on one device because
an opaque custom call has no SPMD partitioning rule: XLA would gather a
batch-sharded operand onto every device.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

# The implementations a model can be given (already resolved; "auto" is a
# request that `nc_jax.implementations` turns into one of these).
IMPLS = ("xla", "onednn")


def check_impl(impl: str) -> None:
  """Raises ValueError unless `impl` is a resolved convolution impl."""
  if impl not in IMPLS:
    hint = (" Resolve 'auto' first with nc_jax.implementations.resolve (the builder "
            "does)." if impl == "auto" else "")
    raise ValueError(f"A model's conv_impl must be one of {IMPLS}, got "
                     f"{impl!r}.{hint}")


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int],
           padding: Padding, impl: str = "xla") -> jax.Array:
  """NHWC x HWIO cross-correlation with explicit padding.

  Args:
    x: `(N, H, W, Ci)`.
    kernel: `(KH, KW, Ci, Co)`, same dtype as `x`.
    strides: `(sh, sw)`.
    padding: `((top, bottom), (left, right))`.
    impl: "xla" or "onednn".

  Returns:
    `(N, Ho, Wo, Co)` in `x`'s dtype ("onednn": float32); differentiable in
    `x` and `kernel`.
  """
  check_impl(impl)
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv2d needs NHWC x and HWIO kernel with matching "
                     f"channels; got {x.shape} and {kernel.shape}.")
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(a), int(b)) for a, b in padding)
  if impl == "onednn":
    from nc_jax import cpu_kernels  # pylint: disable=g-import-not-at-top
    return cpu_kernels.conv2d(x, kernel, strides=strides, padding=padding)
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
    impl: "xla" or "onednn" (see the module docstring).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Sequence[Sequence[int]] = ((1, 1), (1, 1))
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`(N, H, W, Ci)` -> `(N, Ho, Wo, features)` in `dtype`."""
    kernel = self.param(
        "kernel", self.kernel_init,
        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype),
               strides=tuple(self.strides),
               padding=tuple(tuple(p) for p in self.padding), impl=self.impl)
    return y.astype(self.dtype)
