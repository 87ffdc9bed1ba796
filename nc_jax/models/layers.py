"""Layer conventions every backbone and head shares: inits and BatchNorm.

The initialisers reproduce the reference code's PyTorch inits, and
`batch_norm` its BatchNorm (momentum 0.1 in PyTorch's sense, epsilon
1e-5): `flax.linen.BatchNorm`, then the residual add and the activation as
plain jnp ops. Models take their BatchNorm as a factory with
`batch_norm`'s signature (`norm=`, default `batch_norm`), so another
implementation with the same variables (`params/scale`, `params/bias`,
`batch_stats/mean`, `batch_stats/var`) can be given instead;
`nc_jax.kernels` decides which a run uses.

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

ACTIVATIONS = ("none", "relu")


def check_norm_inputs(activation: str, x: jax.Array,
                      residual: jax.Array | None) -> None:
  """Raises ValueError for an unknown activation or a residual whose shape
  differs from `x`'s; shared by every batch-norm layer of the models."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; expected one of "
                     f"{ACTIVATIONS}.")
  if residual is not None and residual.shape != x.shape:
    raise ValueError(f"residual shape {residual.shape} != input shape "
                     f"{x.shape}.")


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
    check_norm_inputs(self.activation, x, residual)
    y = super().__call__(x)
    if residual is not None:
      y = y + residual.astype(y.dtype)
    if self.activation == "relu":
      y = jax.nn.relu(y)
    return y


def batch_norm(train: bool, *, dtype: Dtype = jnp.float32,
               activation: str = "none",
               name: str | None = None) -> nn.Module:
  """A BatchNorm with the reference's momentum and epsilon (`FlaxBatchNorm`).

  Train mode normalises with the batch's statistics and updates the running
  ones in `batch_stats` (which must then be mutable); eval mode uses the
  running statistics. Statistics are reduced in float32 even for bfloat16
  inputs. Scale starts at 1, bias at 0, as in PyTorch. The module is called
  as `bn(x)` or `bn(x, residual)`; `activation="relu"` applies a ReLU after
  the residual add. One small difference from PyTorch remains: Flax's
  convention folds the biased batch variance into the running variance,
  PyTorch the unbiased one (a factor B / (B - 1), under 1% at batch 128).
  Under `jit` with a batch sharded over a mesh the statistics are those of
  the global batch, as in single-device PyTorch; no `axis_name` is needed.

  This is the models' default `norm` factory; any factory with this
  signature whose module has the same variables and call can replace it.

  Args:
    train: batch statistics (True) or running ones (False).
    dtype: the output dtype.
    activation: "relu" or "none".
    name: the module's name (its variables' scope).
  """
  return FlaxBatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                       epsilon=BN_EPSILON, activation=activation,
                       dtype=dtype, param_dtype=jnp.float32, name=name)
