"""The 2-D convolution of the CIFAR ResNets, and what computes it.

`Conv` is a drop-in for the bias-free `flax.linen.Conv` of the backbones:
the same `params/kernel` (HWIO, float32), the same output. How the
convolution and its two gradients are computed is its `compute` function,
`(x, kernel, *, strides, padding) -> y`: XLA's `lax.conv_general_dilated`
and its autodiff transpose by default (`xla_conv2d`, every platform and
dtype). A model is given its convolution (`conv=`, a factory such as
`Conv` or `functools.partial(Conv, compute=...)`); which one a run uses is
decided outside the models, by `nc_jax.kernels`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]
ConvFn = Callable[..., jax.Array]


def xla_conv2d(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int],
               padding: Padding) -> jax.Array:
  """NHWC x HWIO cross-correlation with explicit padding, by XLA.

  Args:
    x: `(N, H, W, Ci)`.
    kernel: `(KH, KW, Ci, Co)`, same dtype as `x`.
    strides: `(sh, sw)`.
    padding: `((top, bottom), (left, right))`.

  Returns:
    `(N, Ho, Wo, Co)` in `x`'s dtype; differentiable in `x` and `kernel`.
  """
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
    compute: `(x, kernel, *, strides, padding) -> y`, the convolution
      itself (`xla_conv2d`; `nc_jax.kernels` may give another with the
      same parameters).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Sequence[Sequence[int]] = ((1, 1), (1, 1))
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  compute: ConvFn = xla_conv2d

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`(N, H, W, Ci)` -> `(N, Ho, Wo, features)` in `dtype`."""
    kernel = self.param(
        "kernel", self.kernel_init,
        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    if x.ndim != 4:
      raise ValueError(f"Conv needs NHWC inputs; got shape {x.shape}.")
    y = self.compute(x.astype(self.dtype), kernel.astype(self.dtype),
                     strides=tuple(int(s) for s in self.strides),
                     padding=tuple((int(a), int(b)) for a, b in self.padding))
    return y.astype(self.dtype)
