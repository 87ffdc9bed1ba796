"""The fixed simplex equiangular tight frame (ETF) classifier.

A simplex ETF is K unit vectors in R^d whose pairwise cosines all equal the
most negative value K vectors can share, -1/(K-1). Yang et al. (2022) fix the
last layer of a classifier to such a frame and never train it.

References:
  Yang, Chen, Li, Xie, Lin, Tao. Inducing Neural Collapse in Imbalanced
  Learning: Do We Really Need a Learnable Classifier at the End of Deep Neural
  Network? NeurIPS 2022. arXiv:2203.09081.
  Papyan, Han, Donoho. Prevalence of neural collapse during the terminal phase
  of deep learning training. PNAS 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def min_feature_dim(num_classes: int) -> int:
  """Smallest feature dimension that holds a K-class simplex ETF (K - 1)."""
  return max(num_classes - 1, 1)


def check_dims(num_classes: int, feature_dim: int) -> None:
  """Raises ValueError unless a K-class simplex ETF fits in d dimensions."""
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(
        f"simplex_etf needs num_classes >= 2 (an integer), got {num_classes!r}.")
  if not isinstance(feature_dim, (int, np.integer)):
    raise ValueError(f"feature_dim must be an integer, got {feature_dim!r}.")
  need = min_feature_dim(num_classes)
  if feature_dim < need:
    raise ValueError(
        f"A simplex ETF for num_classes={num_classes} needs feature_dim >= "
        f"{need} (num_classes - 1), got feature_dim={feature_dim}. Use a "
        f"backbone with a wider feature output (at least {need}) or fewer "
        "classes.")


def simplex_etf(num_classes: int,
                feature_dim: int,
                *,
                seed: int = 0,
                dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Returns a random simplex ETF `M` of shape `(feature_dim, num_classes)`.

  Columns are unit vectors, every pair has cosine exactly -1/(K-1), and they
  sum to zero: `M^T M = K/(K-1) (I_K - 11^T/K)`.

  The construction centres an orthonormal frame: with `U` (d x K) having
  orthonormal columns, `M = sqrt(K/(K-1)) U (I_K - 11^T/K)` (the paper's
  recipe). That needs d >= K. When d = K - 1 (the mathematical minimum, since
  the simplex spans K - 1 dimensions) we instead take an orthonormal basis `Q`
  (K x (K-1)) of the sum-zero subspace of R^K and a random orthonormal
  `V` (d x (K-1)); `M = sqrt(K/(K-1)) V Q^T` has the same Gram matrix. For
  d >= K both recipes coincide in distribution; the first is used so that the
  default matches the reference code's construction.

  The random frame is drawn with numpy from `seed`, in float64, so the matrix
  is bit-identical on every host and backend for a given seed: a multi-host
  job or a resumed run gets the same classifier without communicating it.

  Args:
    num_classes: K >= 2.
    feature_dim: d >= K - 1.
    seed: integer seed of the random rotation.
    dtype: dtype of the returned array.

  Returns:
    `(feature_dim, num_classes)` array `M`.

  Raises:
    ValueError: if `feature_dim < num_classes - 1` or `num_classes < 2`.

  References:
    Yang et al. 2022, Eq. (1) and Sec. 3.
  """
  check_dims(num_classes, feature_dim)
  k, d = int(num_classes), int(feature_dim)
  rng = np.random.default_rng(seed)
  centre = np.eye(k) - np.full((k, k), 1.0 / k)
  if d >= k:
    u, r = np.linalg.qr(rng.standard_normal((d, k)))
    # Fix QR's sign ambiguity so the frame is a deterministic function of the
    # random draw (LAPACK builds may pick different signs).
    u = u * np.sign(np.diag(r))[None, :]
    m = u @ centre
  else:  # d == k - 1
    # Orthonormal basis of {x : sum(x) = 0}: the last K-1 left singular
    # vectors of the centring matrix span it.
    q, _, _ = np.linalg.svd(centre)
    q = q[:, :k - 1]  # (K, K-1), orthonormal, columns orthogonal to ones.
    v, r = np.linalg.qr(rng.standard_normal((d, d)))
    v = v * np.sign(np.diag(r))[None, :]
    m = v @ q.T
  m = np.sqrt(k / (k - 1)) * m
  # Rounding leaves column norms 1 +- 1e-16; renormalise for exact unit norm.
  m = m / np.linalg.norm(m, axis=0, keepdims=True)
  return jnp.asarray(m, dtype=dtype)


def etf_gram(num_classes: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """The Gram matrix every K-class simplex ETF has, `(K, K)`.

  Diagonal 1, off-diagonal -1/(K-1).
  """
  k = num_classes
  return jnp.asarray(
      k / (k - 1) * (np.eye(k) - np.full((k, k), 1.0 / k)), dtype=dtype)


def replica_etfs(num_classes: int,
                 feature_dim: int,
                 *,
                 seed: int,
                 num_replicas: int = 1) -> jax.Array:
  """The fixed classifiers of `num_replicas` independent runs.

  Replica r gets `simplex_etf(num_classes, feature_dim, seed=seed + r)`, so
  replica 0 of an S-seed run trains against the same ETF as a single run
  with the same `seed`. This is the only place the training code builds
  ETFs; the model never holds one (the ETF head takes it as an input).

  Args:
    num_classes: K >= 2.
    feature_dim: d >= K - 1.
    seed: the run's `etf_seed`.
    num_replicas: S >= 1.

  Returns:
    float32 `(d, K)` for S = 1, else `(S, d, K)`.

  Raises:
    ValueError: as `simplex_etf`, or for `num_replicas < 1`.
  """
  if num_replicas < 1:
    raise ValueError(f"num_replicas must be >= 1, got {num_replicas}.")
  mats = [simplex_etf(num_classes, feature_dim, seed=int(seed) + r)
          for r in range(num_replicas)]
  return mats[0] if num_replicas == 1 else jnp.stack(mats)
