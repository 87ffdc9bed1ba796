"""BatchNorm fused with its ReLU (and residual add), with a hand-written VJP.

The CPU BatchNorm of the backbones, which `nc_jax.kernels` gives the
models on CPU (`fused_batch_norm`, a factory with
`nc_jax.models.layers.batch_norm`'s signature; accelerators get Flax's
BatchNorm). `BatchNorm` here is a drop-in for
`flax.linen.BatchNorm`: same variables (`params/scale`, `params/bias`,
`batch_stats/mean`, `batch_stats/var`), same running-statistics update (Flax's convention: the
biased batch variance from `E[x^2] - E[x]^2`, clipped at 0, weighted by
`1 - momentum`; nothing is updated while initialising), same numbers up to
float32 rounding. What differs is how the training-mode gradient is computed.

Why: autodiff of `relu(normalize(x) * scale + bias + residual)` leaves XLA's
CPU backend with many passes over the activation (broadcasts of the
per-channel vectors, a separate ReLU mask, the statistics' own gradients);
this VJP reads the activation three times and writes the input gradient
once (measurements: docs/performance.md). It is the textbook BatchNorm
backward:

    g' = g * [y > 0]                    (ReLU mask, from the saved output)
    dbias = sum g',  dscale = sum g' * xhat
    dx = scale / sigma * (g' - dbias / N - xhat * dscale / N)
    dresidual = g'

with `xhat = (x - mean) / sigma`, `sigma = sqrt(var + eps)` and sums over
the `N` rows of every channel. The batch statistics returned for the
running averages are treated as constants (their cotangents are ignored):
they feed only `batch_stats`, never the loss.

Statistics and the normalisation are computed in float32 for bfloat16,
float16 and float32 inputs (float64 inputs stay float64); the output has the
module's `dtype`.

References:
  Ioffe, Szegedy. Batch Normalization: Accelerating Deep Network Training by
  Reducing Internal Covariate Shift. ICML 2015. (Sec. 3, the gradients.)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models import layers

Dtype = Any

ACTIVATIONS = layers.ACTIVATIONS


def _rows(x: jax.Array) -> jax.Array:
  """`(..., C)` -> `(N, C)`: the channel-last activation as one matrix."""
  return x.reshape(-1, x.shape[-1])


def _wide(x: jax.Array) -> jax.Array:
  """`x` in float32, or wider if it already is (float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _channel_vector(v: jax.Array) -> jax.Array:
  """`v @ I`: the same `(C,)` values, produced by a dot.

  Why: XLA's CPU fusion merges the broadcast of a per-channel vector into
  the elementwise op that computed the vector, which writes the broadcast
  out as a full `(N, C)` array and reads it back; broadcasting the result
  of a dot instead happens inside the elementwise fusion. A CPU trick: on
  accelerators get Flax's BatchNorm. Exact for finite `v` (each entry
  is `v_i * 1` plus zeros).
  """
  eye = jnp.eye(v.shape[-1], dtype=v.dtype)
  return jnp.dot(v, eye, precision=jax.lax.Precision.HIGHEST)


def _affine_act(x2: jax.Array, a: jax.Array, c: jax.Array,
                residual: jax.Array | None, activation: str) -> jax.Array:
  """`act(x2 * a + c + residual)` on `(N, C)` rows, float32.

  ReLU is written `(z + |z|) * 0.5`, which is exactly `max(z, 0)`: the
  `max` against a broadcast zero was a separate pass over a materialised
  zero array on XLA's CPU backend, while abs/add/multiply fuse with the
  affine map. The 0.5 is a per-channel vector derived from `a` (not a
  literal) so that it too is broadcast inside the fusion.
  """
  y = x2 * _channel_vector(a) + _channel_vector(c)
  if residual is not None:
    y = y + _wide(_rows(residual))
  if activation == "relu":
    y = (y + jnp.abs(y)) * _channel_vector(a * 0.0 + 0.5)
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm_act(x: jax.Array, scale: jax.Array, bias: jax.Array,
                   residual: jax.Array | None, epsilon: float,
                   activation: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm, plus an optional residual, then an activation.

  Args:
    x: `(..., C)` activation (any float dtype); statistics over all leading
      axes.
    scale: `(C,)` float32.
    bias: `(C,)` float32.
    residual: `None`, or an array of `x`'s shape added after the affine map
      and before the activation.
    epsilon: added to the variance.
    activation: "relu" or "none".

  Returns:
    `(y, mean, var)`: `y` float32 with `x`'s shape, and the `(C,)` batch
    mean and biased variance (float32), for the running averages.
  """
  return _forward(x, scale, bias, residual, epsilon, activation)[0]


def _statistics(x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  mean = jnp.mean(x2, axis=0)
  var = jnp.maximum(jnp.mean(x2 * x2, axis=0) - mean * mean, 0.0)
  return mean, var


def _forward(x, scale, bias, residual, epsilon, activation):
  if activation not in ACTIVATIONS:
    raise ValueError(
        f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
  x2 = _wide(_rows(x))
  mean, var = _statistics(x2)
  inv = jax.lax.rsqrt(var + epsilon)
  # One fused multiply-add per element: y = x * a + c.
  a = inv * scale
  y = _affine_act(x2, a, bias - mean * a, residual, activation)
  y = y.reshape(x.shape)
  # Residuals must be arrays or pytree structure: None, or an empty array of
  # the residual's dtype, says whether (and in what dtype) one was added.
  # The output stands in for the ReLU mask.
  saved = (x, y if activation == "relu" else None, mean, inv, scale,
           None if residual is None else jnp.zeros((0,), residual.dtype))
  return (y, mean, var), saved


def _backward(epsilon, activation, saved, cotangents):
  del epsilon, activation
  x, y, mean, inv, scale, residual_marker = saved
  g = _wide(_rows(cotangents[0]))
  if y is not None:
    # The ReLU mask y > 0, against a zero vector broadcast inside the fusion
    # (see `_channel_vector`).
    zero = _channel_vector(mean * 0.0)
    g = jnp.where(_rows(y) > zero, g, zero)
  x2 = _wide(_rows(x))
  n = x2.shape[0]
  dbias = jnp.sum(g, axis=0)
  # sum g * xhat without materialising xhat = (x - mean) * inv.
  dscale = (jnp.sum(g * x2, axis=0) - mean * dbias) * inv
  # dx = scale * inv * (g - dbias / n - xhat * dscale / n), as per-channel
  # coefficients of one fused pass: dx = g * p + x * q + r.
  p = scale * inv
  q = -p * inv * dscale / n
  r = -p * dbias / n - q * mean
  dx = g * p + x2 * q + r
  dres = (None if residual_marker is None
          else g.reshape(x.shape).astype(residual_marker.dtype))
  return dx.reshape(x.shape).astype(x.dtype), dscale, dbias, dres


batch_norm_act.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis, optionally fused with residual + ReLU.

  Attributes:
    use_running_average: eval mode (running statistics, nothing updated).
    momentum: weight of the OLD running value (Flax's convention).
    epsilon: added to the variance.
    activation: "relu" or "none", applied after the (optional) residual.
    dtype: output dtype; statistics are float32 regardless.

  Variables are those of `flax.linen.BatchNorm`, so the two are
  interchangeable in checkpoints.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  activation: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               residual: jax.Array | None = None) -> jax.Array:
    """`(..., C)` (and optional same-shape `residual`) -> `(..., C)`."""
    layers.check_norm_inputs(self.activation, x, residual)
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,),
                            jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if self.use_running_average:
      # Plain XLA here: without a backward pass, its own fusion of this
      # chain is faster than the `_affine_act` form.
      inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
      y = (x.astype(jnp.float32) - ra_mean.value) * (inv * scale) + bias
      if residual is not None:
        y = y + residual.astype(jnp.float32)
      if self.activation == "relu":
        y = jnp.maximum(y, 0.0)
      return y.astype(self.dtype)
    y, mean, var = batch_norm_act(x, scale, bias, residual, self.epsilon,
                                  self.activation)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    return y.astype(self.dtype)


def fused_batch_norm(train: bool, *, dtype: Dtype = jnp.float32,
                     activation: str = "none",
                     name: str | None = None) -> BatchNorm:
  """`nc_jax.models.layers.batch_norm` with this module's `BatchNorm`: the
  same momentum, epsilon and variables, the fused gradient."""
  return BatchNorm(use_running_average=not train, momentum=layers.BN_MOMENTUM,
                   epsilon=layers.BN_EPSILON, activation=activation,
                   dtype=dtype, name=name)
