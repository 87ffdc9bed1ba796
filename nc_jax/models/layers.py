"""Layer conventions every backbone and head shares: inits and BatchNorm.

The initialisers reproduce the reference code's PyTorch inits, and
`batch_norm` its BatchNorm (momentum, epsilon) in one of two
implementations with the same variables (`params/scale`, `params/bias`,
`batch_stats/mean`, `batch_stats/var`), so checkpoints move between them:

  flax   `flax.linen.BatchNorm`, then the residual add and the activation
         as plain jnp ops, differentiated by autodiff. The default, and what
         `nc_jax.implementations` picks on GPU and TPU.
  fused  `nc_jax.models.norm.BatchNorm`: BatchNorm, residual and ReLU in one
         hand-written VJP shaped for XLA's CPU fusion; picked on CPU.

References:
  He, Zhang, Ren, Sun. Delving Deep into Rectifiers. ICCV 2015. (The
  Kaiming-normal initialisation.)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models import norm

Dtype = Any

# Kaiming-normal, fan-in: std = sqrt(2 / fan_in), a plain (untruncated) normal,
# as PyTorch's `init.kaiming_normal_(w)` default used by the reference code for
# conv and linear weights. Flax infers fan_in from the kernel layout: `in` for a
# Dense `(in, out)`, `kh * kw * in` for a Conv `(kh, kw, in, out)`.
KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# Kaiming-normal, fan-out: std = sqrt(2 / fan_out), PyTorch's
# `init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")`, which the
# reference uses for the convs of its DenseNet-BC and ImageNet ResNets. For a
# Conv kernel `(kh, kw, in, out)` Flax's fan_out is `kh * kw * out`, the same
# number as PyTorch's `out_channels * kh * kw` for its `(out, in, kh, kw)`.
KAIMING_NORMAL_FAN_OUT = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal")

# PyTorch's BatchNorm momentum 0.1 weights the NEW batch statistic; Flax's
# momentum weights the OLD running value, so 0.1 there is 0.9 here.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# The BatchNorm implementations a model can be given (resolved; "auto" is a
# request that `nc_jax.implementations` turns into one of these).
NORM_IMPLS = ("flax", "fused")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch `nn.Linear`'s default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  The reference re-initialises only the linear weight (Kaiming) and keeps this
  default for the bias, so we do too.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...],
           dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class FlaxBatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm`, then an optional residual and activation.

  A subclass, so its variables sit where `flax.linen.BatchNorm`'s (and the
  fused `norm.BatchNorm`'s) do. Same call signature as `norm.BatchNorm`:
  `(x, residual=None)`; the residual is added after the affine map and
  before the activation ("relu" or "none").
  """
  activation: str = "none"

  def __call__(self, x: jax.Array,  # pytype: disable=signature-mismatch
               residual: jax.Array | None = None) -> jax.Array:
    if self.activation not in norm.ACTIVATIONS:
      raise ValueError(f"Unknown activation {self.activation!r}; expected "
                       f"one of {norm.ACTIVATIONS}.")
    if residual is not None and residual.shape != x.shape:
      raise ValueError(f"residual shape {residual.shape} != input shape "
                       f"{x.shape}.")
    y = super().__call__(x)
    if residual is not None:
      y = y + residual.astype(y.dtype)
    if self.activation == "relu":
      y = jax.nn.relu(y)
    return y


def batch_norm(train: bool, *, impl: str = "flax", dtype: Dtype = jnp.float32,
               activation: str = "none",
               name: str | None = None) -> nn.Module:
  """A BatchNorm with the reference's momentum and epsilon.

  Train mode normalises with the batch's statistics and updates the running
  ones in `batch_stats` (which must then be mutable); eval mode uses the
  running statistics. Statistics are reduced in float32 even for bfloat16
  inputs. Scale starts at 1, bias at 0, as in PyTorch. The module is called
  as `bn(x)` or `bn(x, residual)`; `activation="relu"` applies a ReLU after
  the residual add (fused into the layer's gradient with `impl="fused"`).
  One small difference from PyTorch remains: Flax's convention folds the
  biased batch variance into the running variance, PyTorch the unbiased one
  (a factor B / (B - 1), under 1% at batch 128). Under `jit` with a batch
  sharded over a mesh the statistics are those of the global batch, as in
  single-device PyTorch; no `axis_name` is needed.

  Args:
    train: batch statistics (True) or running ones (False).
    impl: "flax" or "fused" (see the module docstring).
    dtype: the output dtype.
    activation: "relu" or "none".
    name: the module's name (its variables' scope).
  """
  if impl == "fused":
    return norm.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                          epsilon=BN_EPSILON, activation=activation,
                          dtype=dtype, name=name)
  if impl == "flax":
    return FlaxBatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, activation=activation,
                         dtype=dtype, param_dtype=jnp.float32, name=name)
  hint = (" Resolve 'auto' first with nc_jax.implementations.resolve (the builder "
          "does)." if impl == "auto" else "")
  raise ValueError(f"A model's norm_impl must be one of {NORM_IMPLS}, got "
                   f"{impl!r}.{hint}")
