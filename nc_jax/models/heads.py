"""Classifier heads: linear (learnable or frozen), cosine, fixed ETF.

Three heads sit on top of a backbone's pooled features `(B, d)`:

- `LinearHead`: the usual `nn.Linear(d, K)` with bias. With `freeze=True` it
  reproduces the reference code's CIFAR-ResNet baseline, whose "learnable"
  classifier has `requires_grad = False`: the kernel and bias then live in a
  separate `frozen` variable collection, so an optimizer over `params` never
  sees (or weight-decays) them.
- `CosineHead`: LDAM's `NormedLinear`: cosine logits between L2-normalised
  features and L2-normalised class vectors, no bias, values in [-1, 1]; the
  loss applies its own scale (LDAM: 30).
- `ETFHead`: BatchNorm over the features, row-wise L2 normalisation
  `h / max(||h||, 1e-8)` (optional; ImageNet-LT switches it off), then
  `logits = h @ M` with `M` the fixed simplex ETF. `M` is an *input* of the
  call (`classifier=`), never a variable and never built here: one place
  (`nc_jax.etf.replica_etfs`, called by `nc_jax.builder`) makes it from the
  config's `etf_seed`, and the very same array reaches the loss, the logits
  and the neural-collapse metrics, per replica.

All heads run in float32 whatever the backbone's compute dtype: they cost
almost nothing, and the dot-regression loss looks at cosines close to 1, where
bfloat16's 8-bit mantissa would be too coarse.

References:
  Yang, Chen, Li, Xie, Lin, Tao. Inducing Neural Collapse in Imbalanced
  Learning: Do We Really Need a Learnable Classifier at the End of Deep Neural
  Network? NeurIPS 2022. arXiv:2203.09081. (Sec. 3; the reference code's
  `ETF_Classifier` and its BatchNorm + normalisation feature head.)
  Cao, Wei, Gaidon, Arechiga, Ma. Learning Imbalanced Datasets with
  Label-Distribution-Aware Margin Loss. NeurIPS 2019. (`NormedLinear`.)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax import etf as etf_lib
from nc_jax import losses as losses_lib
from nc_jax.models.layers import (KAIMING_NORMAL, batch_norm,
                                  torch_linear_bias_init)

# The reference clamps ||h|| from below by this before dividing by it (the
# DR loss's own clamp, `losses.NORM_EPS`).
NORM_EPS = losses_lib.NORM_EPS

Dtype = Any


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


def _no_classifier_input(classifier, head: str) -> None:
  if classifier is not None:
    raise ValueError(
        f"The {head} head learns its own classifier; classifier= is only for "
        "heads with a fixed one (etf).")


def _symmetric_uniform(bound: float) -> nn.initializers.Initializer:
  """U(-bound, bound), as PyTorch's `weight.uniform_(-1, 1)` in LDAM."""

  def init(key: jax.Array, shape: tuple[int, ...],
           dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def normalized_columns(kernel: jax.Array) -> jax.Array:
  """`(d, K)` kernel with each column scaled to unit L2 norm (float32)."""
  return _l2_normalize(kernel.astype(jnp.float32).T).T


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
  def __call__(self, features: jax.Array, train: bool = False,
               classifier: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Classifies pooled features.

    Args:
      features: `(B, d)` pooled backbone output (any float dtype).
      train: unused; kept so every head has the same signature.
      classifier: must be None: this head owns its weights.

    Returns:
      `(logits, features)`: `(B, K)` and `(B, d)`, both float32; the features
      are the input, unchanged, since that is what enters the classifier.
    """
    del train
    _check_features(features, self.feature_dim, self.head_name)
    _no_classifier_input(classifier, self.head_name)
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


class CosineHead(nn.Module):
  """Cosine classifier `logits_j = <h / ||h||, w_j / ||w_j||>` (no bias).

  LDAM's `NormedLinear`: the logits are cosines in [-1, 1], so the loss must
  supply the temperature (`ldam_loss(..., scale=30)`) and its margins are
  in cosine units.

  Attributes:
    num_classes: K.
    feature_dim: d.

  Variables: `params/kernel (d, K)`, initialised U(-1, 1) as the reference
  (the scale is irrelevant: columns are normalised in the forward pass).
  """
  num_classes: int
  feature_dim: int

  head_name = "cosine"

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False,
               classifier: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Cosine logits of pooled features.

    Args:
      features: `(B, d)` pooled backbone output (any float dtype).
      train: unused; kept so every head has the same signature.
      classifier: must be None: this head owns its weights.

    Returns:
      `(logits, h)`: `(B, K)` cosines and the `(B, d)` L2-normalised
      features that enter the classifier, both float32.
    """
    del train
    _check_features(features, self.feature_dim, self.head_name)
    _no_classifier_input(classifier, self.head_name)
    kernel = self.param("kernel", _symmetric_uniform(1.0),
                        (self.feature_dim, self.num_classes))
    h = _l2_normalize(features.astype(jnp.float32))
    logits = jnp.dot(h, normalized_columns(kernel),
                     precision=jax.lax.Precision.HIGHEST)
    return logits, h


class ETFHead(nn.Module):
  """BatchNorm -> L2 normalisation -> a fixed classifier given at call time.

  Attributes:
    num_classes: K.
    feature_dim: d; must be at least K - 1 (checked by `nc_jax.etf`).
    l2_normalize: if False, skip the normalisation (the reference's
      ImageNet-LT setting: BatchNorm only).
    norm: the BatchNorm factory (`nc_jax.models.layers.batch_norm`'s
      signature; another implementation has the same variables).

  Variables: `params/bn/{scale,bias} (d,)`, `batch_stats/bn/{mean,var} (d,)`.
  The ETF itself is the `classifier` argument, so it is never a variable,
  never trained or decayed, and each replica of a multi-seed run can pass
  its own.
  """
  num_classes: int
  feature_dim: int
  l2_normalize: bool = True
  norm: Callable[..., nn.Module] = batch_norm

  head_name = "etf"

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False,
               classifier: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Classifies pooled features against the fixed ETF.

    Args:
      features: `(B, d)` pooled backbone output (any float dtype).
      train: BatchNorm uses (and updates) batch statistics when True.
      classifier: the `(d, K)` fixed ETF (`nc_jax.etf.replica_etfs`).

    Returns:
      `(logits, h)`: `(B, K)` logits `h @ M` and the `(B, d)` features `h`
      after BatchNorm and (if enabled) L2 normalisation, both float32.

    Raises:
      ValueError: if `classifier` is missing or not `(d, K)`.
    """
    _check_features(features, self.feature_dim, self.head_name)
    want = (self.feature_dim, self.num_classes)
    if classifier is None or tuple(classifier.shape) != want:
      got = None if classifier is None else tuple(classifier.shape)
      raise ValueError(
          f"The etf head needs its fixed classifier as an input, "
          f"classifier= of shape {want}, got {got}. Build it with "
          "nc_jax.etf.replica_etfs (the builder does) and pass it to "
          "model.apply(..., classifier=etf).")
    h = self.norm(train, name="bn")(features.astype(jnp.float32))
    if self.l2_normalize:
      h = _l2_normalize(h)
    # HIGHEST: on accelerators the default float32 matmul may round inputs to
    # TF32/bfloat16, which would blur cosines near 1 that the DR loss fits.
    logits = jnp.dot(h, classifier.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return logits, h


def linear_head(num_classes: int, feature_dim: int, *,
                freeze_classifier: bool = False) -> LinearHead:
  """Registry factory for `LinearHead` (option: `freeze_classifier`)."""
  return LinearHead(num_classes=num_classes, feature_dim=feature_dim,
                    freeze=freeze_classifier)


def cosine_head(num_classes: int, feature_dim: int) -> CosineHead:
  """Registry factory for `CosineHead` (no options)."""
  return CosineHead(num_classes=num_classes, feature_dim=feature_dim)


def etf_head(num_classes: int, feature_dim: int, *,
             l2_normalize: bool = True,
             norm: Callable[..., nn.Module] = batch_norm) -> ETFHead:
  """Registry factory for `ETFHead` (options: `l2_normalize`, `norm`).

  Checks `(K, d)` eagerly so an impossible pair fails here, with
  `nc_jax.etf`'s ValueError, rather than at the first trace.
  """
  etf_lib.check_dims(num_classes, feature_dim)
  return ETFHead(num_classes=num_classes, feature_dim=feature_dim,
                 l2_normalize=l2_normalize, norm=norm)
