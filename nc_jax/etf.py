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


# How the random rotation of the frame is drawn (`simplex_etf(rotation=)`).
ROTATIONS = ("gaussian", "uniform01")


def check_fits(num_classes: int, feature_dim: int, rotation: str) -> None:
  """Raises ValueError unless `simplex_etf` can draw a K-class ETF in d
  dimensions with `rotation` (d >= K - 1; d >= K for "uniform01")."""
  check_dims(num_classes, feature_dim)
  if rotation not in ROTATIONS:
    raise ValueError(f"Unknown ETF rotation {rotation!r}; valid values are "
                     f"{list(ROTATIONS)}.")
  if rotation == "uniform01" and feature_dim < num_classes:
    raise ValueError(
        f"etf_rotation='uniform01' (the reference's QR of a d x K matrix) "
        f"needs feature_dim >= num_classes, got d={feature_dim} < "
        f"K={num_classes}. Use etf_rotation='gaussian', which also builds "
        "the frame for d = K - 1.")


def simplex_etf(num_classes: int,
                feature_dim: int,
                *,
                seed: int = 0,
                rotation: str = "gaussian",
                dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Returns a random simplex ETF `M` of shape `(feature_dim, num_classes)`.

  Columns are unit vectors, every pair has cosine exactly -1/(K-1), and they
  sum to zero: `M^T M = K/(K-1) (I_K - 11^T/K)`.

  The construction centres an orthonormal frame: with `U` (d x K) having
  orthonormal columns, `M = sqrt(K/(K-1)) U (I_K - 11^T/K)` (the paper's
  recipe). `rotation` says how `U` is drawn:

  - "gaussian": the QR factor of a standard-normal d x K matrix, with QR's
    sign ambiguity fixed (diag(R) > 0). That is a uniformly random (Haar)
    frame: no direction of feature space is preferred. When d = K - 1 (the
    mathematical minimum, since the simplex spans K - 1 dimensions) it
    takes an orthonormal basis `Q` (K x (K-1)) of the sum-zero subspace of
    R^K and a Haar `V` (d x (K-1)) instead; `M = sqrt(K/(K-1)) V Q^T` has
    the same Gram matrix.
  - "uniform01": the reference code's draw, numpy's QR factor of a d x K
    matrix of uniform [0, 1) entries, as numpy returns it. Its first column
    is minus the normalised first column of that matrix, so one class
    vector of `M` points nearly opposite the all-ones direction (cosine
    -0.81 on average for K = 10, d = 64; -0.86 for K = 100, d = 128). It
    needs d >= K, as the reference does; d = K - 1 raises.

  The random matrix is drawn with numpy from `seed`, in float64, so the
  matrix is the same on every host for a given seed: a multi-host job or a
  resumed run gets the same classifier without communicating it.

  Args:
    num_classes: K >= 2.
    feature_dim: d >= K - 1 ("gaussian") or d >= K ("uniform01").
    seed: integer seed of the random rotation.
    rotation: one of `ROTATIONS`.
    dtype: dtype of the returned array.

  Returns:
    `(feature_dim, num_classes)` array `M`.

  Raises:
    ValueError: if `feature_dim` is too small, `num_classes < 2`, or
      `rotation` is unknown.

  References:
    Yang et al. 2022, Eq. (1) and Sec. 3.
  """
  check_fits(num_classes, feature_dim, rotation)
  k, d = int(num_classes), int(feature_dim)
  centre = np.eye(k) - np.full((k, k), 1.0 / k)
  if rotation == "uniform01":
    u, _ = np.linalg.qr(np.random.default_rng(seed).random((d, k)))
    m = u @ centre
  elif d >= k:
    rng = np.random.default_rng(seed)
    u, r = np.linalg.qr(rng.standard_normal((d, k)))
    # Fix QR's sign ambiguity so the frame is a deterministic function of the
    # random draw (LAPACK builds may pick different signs).
    u = u * np.sign(np.diag(r))[None, :]
    m = u @ centre
  else:  # d == k - 1
    rng = np.random.default_rng(seed)
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


def replica_etfs(num_classes: int,
                 feature_dim: int,
                 *,
                 seed: int,
                 num_replicas: int = 1,
                 rotation: str = "gaussian") -> jax.Array:
  """The fixed classifiers of `num_replicas` independent runs.

  Replica r gets `simplex_etf(num_classes, feature_dim, seed=seed + r,
  rotation=rotation)`, so
  replica 0 of an S-seed run trains against the same ETF as a single run
  with the same `seed`. This is the only place the training code builds
  ETFs; the model never holds one (the ETF head takes it as an input).

  Args:
    num_classes: K >= 2.
    feature_dim: d >= K - 1.
    seed: the run's `etf_seed`.
    num_replicas: S >= 1.
    rotation: how each frame's rotation is drawn (`simplex_etf`).

  Returns:
    float32 `(d, K)` for S = 1, else `(S, d, K)`.

  Raises:
    ValueError: as `simplex_etf`, or for `num_replicas < 1`.
  """
  if num_replicas < 1:
    raise ValueError(f"num_replicas must be >= 1, got {num_replicas}.")
  mats = [simplex_etf(num_classes, feature_dim, seed=int(seed) + r,
                      rotation=rotation)
          for r in range(num_replicas)]
  return mats[0] if num_replicas == 1 else jnp.stack(mats)
