"""The ETF head for Flax NNX models: `from nc_jax.nnx import ETFHead`.

The NNX twin of the Linen `nc_jax.models.heads.ETFHead`: BatchNorm over the
features (PyTorch's momentum and epsilon, scale 1 and bias 0 at start), the
row-wise L2 normalisation `h / max(||h||, 1e-8)` with the same safe gradient
at 0, then `logits = h @ M` with `M` the fixed simplex ETF. Given the same
BatchNorm variables, both heads return the same `(logits, h)`.

An NNX module owns its state, so this head holds `M` itself, as an `ETF`
variable: a `flax.nnx.Variable` subclass that is *not* `nnx.Param`. What
trains `nnx.Param` (`nnx.grad`'s default, `nnx.Optimizer(..., wrt=nnx.Param)`)
never sees it, so it is neither updated nor weight-decayed, and it still
travels with the model through `nnx.state`/`nnx.split` (checkpoints) and
`nnx.jit`. `nnx.state(model, ETF)` selects it; `head.classifier[...]` reads
it (for the DR loss's targets and the neural-collapse statistics).

Train and eval mode follow NNX's convention: the head starts in train mode
(BatchNorm on batch statistics, updating the running ones); `model.eval()`
switches every BatchNorm to the running statistics and `model.train()`
back. A call may also override it with `use_running_average=`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nc_jax import etf as etf_lib
from nc_jax.models.heads import _check_features, _l2_normalize
from nc_jax.models.layers import BN_EPSILON, BN_MOMENTUM

__all__ = ["ETF", "ETFHead"]


class ETF(nnx.Variable):
  """A fixed classifier: a model variable that no optimizer over Params sees.

  Being a `Variable` but not a `Param`, it is filtered out of
  `nnx.state(model, nnx.Param)`, `nnx.grad` (which differentiates Params by
  default) and `nnx.Optimizer(model, tx, wrt=nnx.Param)`.
  """


def _fixed_classifier(classifier: jax.Array | np.ndarray | None,
                      num_classes: int, feature_dim: int,
                      etf_seed: int) -> jax.Array:
  """The `(d, K)` float32 classifier the head keeps: given, or built."""
  if classifier is None:
    return etf_lib.simplex_etf(num_classes, feature_dim, seed=etf_seed,
                               dtype=jnp.float32)
  shape = tuple(np.shape(classifier))
  want = (feature_dim, num_classes)
  if shape != want:
    raise ValueError(
        f"ETFHead(num_classes={num_classes}, feature_dim={feature_dim}) needs "
        f"classifier= of shape (feature_dim, num_classes) = {want}, got "
        f"{shape}. Build it with nc_jax.etf.simplex_etf({num_classes}, "
        f"{feature_dim}, seed=...), or leave classifier= out to get that "
        "with etf_seed=.")
  if not jnp.issubdtype(jnp.result_type(classifier), jnp.floating):
    raise ValueError(
        f"ETFHead's classifier= must be a float array, got dtype "
        f"{jnp.result_type(classifier)}; pass nc_jax.etf.simplex_etf(...).")
  return jnp.asarray(classifier, jnp.float32)


class ETFHead(nnx.Module):
  """BatchNorm -> L2 normalisation -> the fixed simplex ETF.

  Args (constructor):
    num_classes: K >= 2.
    feature_dim: d >= K - 1, the width of the incoming features.
    l2_normalize: if False, skip the normalisation (the reference's
      ImageNet-LT setting: BatchNorm only).
    classifier: the `(d, K)` fixed classifier to hold; by default
      `nc_jax.etf.simplex_etf(K, d, seed=etf_seed)`.
    etf_seed: the seed of that default ETF (ignored with `classifier=`).
    rngs: the module's `nnx.Rngs` (BatchNorm's initialisers take one; its
      initial values, scale 1 and bias 0, do not depend on it).

  Variables: `bn.scale`, `bn.bias` (`nnx.Param`, `(d,)`), `bn.mean`, `bn.var`
  (`nnx.BatchStat`, `(d,)`): the Linen head's `params/bn/...` and
  `batch_stats/bn/...` under the same names; `classifier` (`ETF`, `(d, K)`,
  float32): the fixed ETF, never trained.

  Raises:
    ValueError: if a K-class simplex does not fit in d dimensions, or
      `classifier` is not a float `(d, K)` array.
  """

  def __init__(self, num_classes: int, feature_dim: int, *,
               l2_normalize: bool = True,
               classifier: jax.Array | np.ndarray | None = None,
               etf_seed: int = 0, rngs: nnx.Rngs):
    etf_lib.check_dims(num_classes, feature_dim)
    self.num_classes = int(num_classes)
    self.feature_dim = int(feature_dim)
    self.l2_normalize = bool(l2_normalize)
    # The Linen head's BatchNorm (nc_jax.models.layers.batch_norm, "flax"):
    # PyTorch's momentum 0.1 is Flax's 0.9; statistics in float32.
    self.bn = nnx.BatchNorm(self.feature_dim, momentum=BN_MOMENTUM,
                            epsilon=BN_EPSILON, dtype=jnp.float32,
                            param_dtype=jnp.float32, rngs=rngs)
    self.classifier = ETF(_fixed_classifier(
        classifier, self.num_classes, self.feature_dim, etf_seed))

  def __call__(self, features: jax.Array, *,
               use_running_average: bool | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Classifies pooled features against the fixed ETF.

    Args:
      features: `(B, d)` pooled backbone output (any float dtype).
      use_running_average: True for BatchNorm's running statistics (eval),
        False for the batch's (train, updating the running ones); None
        (default) follows the mode set by `model.train()` / `model.eval()`.

    Returns:
      `(logits, h)`: `(B, K)` logits `h @ M` and the `(B, d)` features `h`
      after BatchNorm and (if enabled) L2 normalisation, both float32.

    Raises:
      ValueError: if `features` is not `(B, d)`.
    """
    _check_features(features, self.feature_dim, "etf")
    h = self.bn(features.astype(jnp.float32),
                use_running_average=use_running_average)
    if self.l2_normalize:
      h = _l2_normalize(h)
    # A constant by definition: even a gradient taken with respect to every
    # Variable (not just Params) must not move it.
    m = jax.lax.stop_gradient(self.classifier[...])
    # HIGHEST: on accelerators the default float32 matmul may round inputs to
    # TF32/bfloat16, which would blur cosines near 1 that the DR loss fits.
    logits = jnp.dot(h, m, precision=jax.lax.Precision.HIGHEST)
    return logits, h
