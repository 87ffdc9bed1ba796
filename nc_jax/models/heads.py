"""Classifier heads, and the layer conventions every backbone shares.

Two heads sit on top of a backbone's pooled features `(B, d)`:

- `LinearHead`: the usual `nn.Linear(d, K)` with bias. With `freeze=True` it
  reproduces the reference code's CIFAR-ResNet baseline, whose "learnable"
  classifier has `requires_grad = False`: the kernel and bias then live in a
  separate `frozen` variable collection, so an optimizer over `params` never
  sees (or weight-decays) them.
- `ETFHead`: BatchNorm over the features, row-wise L2 normalisation
  `h / max(||h||, 1e-8)` (optional; ImageNet-LT switches it off), then
  `logits = h @ M` with `M` the fixed simplex ETF of `nc_jax.etf`. `M` is not
  a variable: it is a constant rebuilt from `etf_seed`, so it can never be
  trained, decayed or lost from a checkpoint (the seed travels in the config).

Both heads run in float32 whatever the backbone's compute dtype: they cost
almost nothing, and the dot-regression loss looks at cosines close to 1, where
bfloat16's 8-bit mantissa would be too coarse.

References:
  Yang, Chen, Li, Xie, Lin, Tao. Inducing Neural Collapse in Imbalanced
  Learning: Do We Really Need a Learnable Classifier at the End of Deep Neural
  Network? NeurIPS 2022. arXiv:2203.09081. (Sec. 3; the reference code's
  `ETF_Classifier` and its BatchNorm + normalisation feature head.)
  He, Zhang, Ren, Sun. Delving Deep into Rectifiers. ICCV 2015. (The
  Kaiming-normal initialisation.)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import etf as etf_lib
from nc_jax.models import norm

# ---------------------------------------------------------------------------
# Conventions shared by every backbone and head in this package.
# ---------------------------------------------------------------------------

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

# PyTorch's default `nn.Linear` weight init, `kaiming_uniform_(a=sqrt(5))`:
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in). The
# reference's ImageNet classifier (`models/resnet.py` `Classifier`) keeps it;
# its bias is `torch_linear_bias_init`.
TORCH_LINEAR_KERNEL = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")

# PyTorch's BatchNorm momentum 0.1 weights the NEW batch statistic; Flax's
# momentum weights the OLD running value, so 0.1 there is 0.9 here.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# The reference clamps ||h|| from below by this before dividing by it.
NORM_EPS = 1e-8

Dtype = Any


def batch_norm(train: bool, *, dtype: Dtype = jnp.float32,
               activation: str = "none",
               name: str | None = None) -> norm.BatchNorm:
  """A BatchNorm with the reference's momentum and epsilon.

  Train mode normalises with the batch's statistics and updates the running
  ones in `batch_stats` (which must then be mutable); eval mode uses the
  running statistics. Statistics are reduced in float32 even for bfloat16
  inputs. Scale starts at 1, bias at 0, as in PyTorch. `activation="relu"`
  fuses the following ReLU (and a residual passed as the second call
  argument) into the layer's hand-written gradient (`nc_jax.models.norm`,
  which has the same variables and numbers as `flax.linen.BatchNorm`).
  One small difference from PyTorch remains: Flax's convention folds the
  biased batch variance into the running variance, PyTorch the unbiased one
  (a factor B / (B - 1), under 1% at batch 128). Under `jit` with a batch
  sharded over a mesh the statistics are those of the global batch, as in
  single-device PyTorch; no `axis_name` is needed.
  """
  return norm.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, activation=activation,
                        dtype=dtype, name=name)


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


@functools.lru_cache(maxsize=8)
def cached_etf(num_classes: int, feature_dim: int, seed: int) -> np.ndarray:
  """`etf.simplex_etf(num_classes, feature_dim, seed=seed)` as float32 numpy.

  Cached because the QR behind it takes about a second at ImageNet-LT size
  (K = 1000, d = 4096) and every trace of a head would otherwise redo it. The
  array is made read-only so no caller can corrupt the cached copy.

  Raises:
    ValueError: (from `nc_jax.etf`) if `feature_dim < num_classes - 1`.
  """
  m = np.array(etf_lib.simplex_etf(num_classes, feature_dim, seed=seed,
                                   dtype=jnp.float32))
  m.setflags(write=False)
  return m


def _l2_normalize(h: jax.Array) -> jax.Array:
  """Row-wise `h / max(||h||, NORM_EPS)`, with finite gradients at h = 0.

  `sqrt(max(|h|^2, eps^2))` equals `max(||h||, eps)` but, unlike
  `jnp.maximum(jnp.linalg.norm(h), eps)`, never differentiates the norm at 0
  (where it is 0/0 = NaN and the NaN would leak through the max).
  """
  sq = jnp.sum(jnp.square(h), axis=-1, keepdims=True)
  return h * jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS**2))


def _check_features(features: jax.Array, feature_dim: int, head: str) -> None:
  if features.ndim != 2 or features.shape[-1] != feature_dim:
    raise ValueError(
        f"The {head} head was built for features of shape (B, {feature_dim}),"
        f" got {features.shape}.")


class LinearHead(nn.Module):
  """A linear classifier `logits = h @ W + b`, learnable or frozen.

  Attributes:
    num_classes: K.
    feature_dim: d, the width of the incoming features.
    freeze: if True, `W` and `b` go into the `frozen` collection instead of
      `params` (initialised identically), reproducing the reference code's
      frozen random linear layer on the CIFAR ResNets.

  Variables: `params/kernel (d, K)`, `params/bias (K,)`, or the same two names
  under `frozen`. Kernel: Kaiming-normal; bias: PyTorch's default uniform
  (the reference's CIFAR and DenseNet classifiers; its ImageNet one keeps
  PyTorch's default Kaiming-uniform kernel, a difference of init only).
  """
  num_classes: int
  feature_dim: int
  freeze: bool = False

  head_name = "linear"

  @nn.compact
  def __call__(self, features: jax.Array,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Classifies pooled features.

    Args:
      features: `(B, d)` pooled backbone output (any float dtype).
      train: unused; kept so every head has the same signature.

    Returns:
      `(logits, features)`: `(B, K)` and `(B, d)`, both float32; the features
      are the input, unchanged, since that is what enters the classifier.
    """
    del train
    _check_features(features, self.feature_dim, self.head_name)
    h = features.astype(jnp.float32)
    shape_w, shape_b = (self.feature_dim, self.num_classes), (self.num_classes,)
    bias_init = torch_linear_bias_init(self.feature_dim)
    if self.freeze:
      # The init functions run only under `init`; make_rng('params') draws
      # from the same stream the learnable head would use.
      kernel = self.variable(
          "frozen", "kernel",
          lambda: KAIMING_NORMAL(self.make_rng("params"), shape_w)).value
      bias = self.variable(
          "frozen", "bias",
          lambda: bias_init(self.make_rng("params"), shape_b)).value
    else:
      kernel = self.param("kernel", KAIMING_NORMAL, shape_w)
      bias = self.param("bias", bias_init, shape_b)
    logits = jnp.dot(h, kernel, precision=jax.lax.Precision.HIGHEST) + bias
    return logits, h


class ETFHead(nn.Module):
  """BatchNorm -> L2 normalisation -> fixed simplex-ETF classifier.

  Attributes:
    num_classes: K.
    feature_dim: d; must be at least K - 1 (checked by `nc_jax.etf`).
    etf_seed: seed of the ETF's random rotation. The matrix is a constant of
      the computation, rebuilt from this seed; it is never a variable.
    l2_normalize: if False, skip the normalisation (the reference's
      ImageNet-LT setting: BatchNorm only).

  Variables: `params/bn/{scale,bias} (d,)`, `batch_stats/bn/{mean,var} (d,)`.
  """
  num_classes: int
  feature_dim: int
  etf_seed: int = 0
  l2_normalize: bool = True

  head_name = "etf"

  def etf(self) -> jax.Array:
    """The fixed classifier `M`, `(d, K)` float32; usable without binding."""
    return jnp.asarray(
        cached_etf(self.num_classes, self.feature_dim, self.etf_seed))

  @nn.compact
  def __call__(self, features: jax.Array,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Classifies pooled features against the fixed ETF.

    Args:
      features: `(B, d)` pooled backbone output (any float dtype).
      train: BatchNorm uses (and updates) batch statistics when True.

    Returns:
      `(logits, h)`: `(B, K)` logits `h @ M` and the `(B, d)` features `h`
      after BatchNorm and (if enabled) L2 normalisation, both float32.
    """
    _check_features(features, self.feature_dim, self.head_name)
    h = batch_norm(train, name="bn")(features.astype(jnp.float32))
    if self.l2_normalize:
      h = _l2_normalize(h)
    # HIGHEST: on accelerators the default float32 matmul may round inputs to
    # TF32/bfloat16, which would blur cosines near 1 that the DR loss fits.
    logits = jnp.dot(h, self.etf(), precision=jax.lax.Precision.HIGHEST)
    return logits, h


def linear_head(num_classes: int, feature_dim: int, *,
                freeze_classifier: bool = False) -> LinearHead:
  """Registry factory for `LinearHead` (option: `freeze_classifier`)."""
  return LinearHead(num_classes=num_classes, feature_dim=feature_dim,
                    freeze=freeze_classifier)


def etf_head(num_classes: int, feature_dim: int, *, etf_seed: int = 0,
             l2_normalize: bool = True) -> ETFHead:
  """Registry factory for `ETFHead` (options: `etf_seed`, `l2_normalize`).

  Builds (and caches) the ETF eagerly so an impossible `(K, d)` fails here,
  with `nc_jax.etf`'s ValueError, rather than at the first trace.
  """
  cached_etf(num_classes, feature_dim, int(etf_seed))
  return ETFHead(num_classes=num_classes, feature_dim=feature_dim,
                 etf_seed=int(etf_seed), l2_normalize=l2_normalize)
