"""Neural-collapse statistics of last-layer features and classifiers.

Two ways in, one definition of every number:

* `compute(features, labels, classifier, *, num_classes)`: one shot, on
  device (`compute_jax` is the traceable, jittable version returning arrays).
* `init_stats` / `update_stats` / `finalize`: a streaming accumulator for
  evaluation sets that do not fit in memory (ImageNet-LT scale, sharded over
  a mesh). `update_stats` is pure and jittable; with batch-sharded inputs
  under `jit` its reductions are global. `finalize` runs once, on the host,
  in float64.

Both end in the same summary (`_summary`, written against the array API
shared by numpy and jax.numpy), so they agree to float32 rounding.

Definitions (`mu_c` class means, `mu_G` the global mean, `K_p` the number of
classes with at least one sample, `N` the number of samples):

* `mu_G` is the unweighted mean of the present class means
  (`center="classes"`, default). On imbalanced data the sample mean is pulled
  towards the head classes, so centring by it would tilt a perfect simplex;
  the class-balanced mean leaves an ETF's cosines at exactly -1/(K-1).
  `center="samples"` gives Papyan et al.'s sample mean (identical on
  balanced data).
* `nc1 = Tr(Sigma_W Sigma_B^+) / K_p` with
  `Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T` (averaged over
  samples) and `Sigma_B = (1/K_p) sum_c (mu_c - mu_G)(mu_c - mu_G)^T`. The
  pseudo-inverse drops eigenvalues of `Sigma_B` below `PINV_RCOND` (1e-6,
  Papyan et al.'s `rcond`) times the largest; it is evaluated in the span of
  the centred means via their thin SVD, never as a d x d inverse.
* `norm_spread_h`, `norm_spread_w`: std / mean of `||mu_c - mu_G||` and of
  `||w_c||` (population std, ddof=0; Papyan et al.'s code uses ddof=1,
  larger by sqrt(K/(K-1))).
* `cos_mean_*`, `cos_std_*`: mean and population std of the cosines of all
  unordered pairs `c < c'` of centred class means (`_h`) or classifier
  columns (`_w`, not centred). `cos_gap_*`: mean `|cos + 1/(K'-1)|` over the
  same pairs, with `K' = K_p` for means (centring `K_p` means by their own
  mean makes them a `K_p`-simplex at best) and `K' = K` for the classifier.
* `self_duality = || H/||H||_F - M/||M||_F ||_F^2`, H the (d, K_p) centred
  class means and M the matching classifier columns (Papyan et al.'s NC3,
  squared as in their code). 0 when the classifier is a positive multiple of
  the centred means; at most 4.
* `cos_hw`: mean over present classes of `cos(mu_c - mu_G, w_c)`.
* `minority_cos_w`, `minority_cos_h`: mean pairwise cosine among the tail
  classes' classifier columns / centred means (Fang et al.'s minority
  collapse: it tends to 1 when the minority classifiers collapse).

Absent classes (no sample) are excluded from every class-mean statistic (nc1,
norm_spread_h, cos_*_h, self_duality, cos_hw, minority_cos_h); the classifier
statistics (`*_w`) use all K columns. Statistics over fewer than two classes
or pairs are NaN.

Default tail classes: the last `ceil(0.3 K)` class indices (classes are
ordered head first), i.e. 7-9 for 10-class sets as in the reference configs,
70-99 for 100 classes.

References:
  Papyan, Han, Donoho. Prevalence of neural collapse during the terminal phase
  of deep learning training. PNAS 2020 (NC1-NC3).
  Fang, He, Long, Su. Exploring deep neural networks via layer-peeled model:
  Minority collapse in imbalanced training. PNAS 2021.
  Yang et al. Inducing Neural Collapse in Imbalanced Learning. NeurIPS 2022.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TAIL_FRACTION = 0.3
PINV_RCOND = 1e-6
_EPS = 1e-12
# f32 matmuls on TPU (bf16 passes) and GPU (TF32) lose too many bits by default.
_HI = jax.lax.Precision.HIGHEST

METRIC_KEYS = ("nc1", "norm_spread_h", "norm_spread_w", "cos_mean_h",
               "cos_std_h", "cos_gap_h", "cos_mean_w", "cos_std_w",
               "cos_gap_w", "self_duality", "cos_hw", "minority_cos_w",
               "minority_cos_h", "num_present", "num_samples")


class NCStats(NamedTuple):
  """Streaming sufficient statistics (a pytree; K classes, d features).

  Features are accumulated relative to a per-class reference `ref[c]`, the
  mean of class c in the first batch that contains it. Near collapse every
  feature is close to its class mean, so `h - ref_c` is small and the
  exact identity `N Sigma_W = second - sum_c count_c delta_c delta_c^T`
  (`delta_c = sum_c / count_c`) subtracts small numbers, not two nearly equal
  O(||h||^2) ones: no catastrophic cancellation in float32.

  Attributes:
    count: `(K,)` int32 samples per class.
    ref: `(K, d)` float32 per-class reference (0 until the class is seen).
    sum: `(K, d)` float32, `sum_{i: y_i = c} (h_i - ref_c)`.
    second: `(d, d)` float32, `sum_i (h_i - ref_{y_i})(h_i - ref_{y_i})^T`.
  """
  count: jax.Array
  ref: jax.Array
  sum: jax.Array
  second: jax.Array


def default_tail_classes(num_classes: int) -> tuple[int, ...]:
  """The last `ceil(0.3 K)` class indices (7, 8, 9 for K = 10)."""
  n = math.ceil(DEFAULT_TAIL_FRACTION * num_classes)
  return tuple(range(num_classes - n, num_classes))


def _tail_mask(num_classes: int,
               tail_classes: Sequence[int] | None) -> np.ndarray:
  tail = (default_tail_classes(num_classes)
          if tail_classes is None else tuple(int(c) for c in tail_classes))
  if any(c < 0 or c >= num_classes for c in tail):
    raise ValueError(
        f"tail_classes must lie in [0, {num_classes}), got {tail}.")
  mask = np.zeros((num_classes,), bool)
  mask[list(tail)] = True
  return mask


def _check_inputs(features: Any, labels: Any, classifier: Any,
                  num_classes: int) -> None:
  if np.ndim(features) != 2:
    raise ValueError(f"features must be (N, d), got {np.shape(features)}.")
  if np.shape(labels) != (np.shape(features)[0],):
    raise ValueError(f"labels must be (N,) = ({np.shape(features)[0]},), "
                     f"got {np.shape(labels)}.")
  if np.shape(classifier) != (np.shape(features)[1], num_classes):
    raise ValueError(
        "classifier must be (d, K) = "
        f"({np.shape(features)[1]}, {num_classes}), got "
        f"{np.shape(classifier)}. Pass a (K, d) weight transposed.")


def _pair_stats(xp: Any, vecs: Any, valid: Any, num_vertices: Any
                ) -> tuple[Any, Any, Any]:
  """Mean, std and mean |cos + 1/(n-1)| of cosines over valid pairs i < j.

  Batched over a leading axis P so that the four uses in `_summary` compile
  as one computation (XLA's CPU compile time grows with the op count).

  Args:
    xp: numpy or jax.numpy.
    vecs: `(P, K, d)` vectors.
    valid: `(P, K)` bool, which rows take part.
    num_vertices: `(P,)`, n in the simplex target -1/(n-1).

  Returns:
    three `(P,)` arrays, NaN where not even one pair is valid.
  """
  k = vecs.shape[1]
  norms = xp.sqrt(xp.sum(vecs * vecs, axis=2))
  unit = vecs / xp.maximum(norms, _EPS)[:, :, None]
  gram = xp.einsum("pkd,pjd->pkj", unit, unit)
  pair = (valid[:, :, None] & valid[:, None, :]
          & np.triu(np.ones((k, k), bool), 1)[None])
  pf = pair.astype(gram.dtype)
  npair = xp.sum(pf, axis=(1, 2))
  denom = xp.maximum(npair, 1.0)
  mean = xp.sum(gram * pf, axis=(1, 2)) / denom
  std = xp.sqrt(
      xp.sum((gram - mean[:, None, None]) ** 2 * pf, axis=(1, 2)) / denom)
  target = -1.0 / xp.maximum(num_vertices - 1.0, 1.0)
  gap = xp.sum(xp.abs(gram - target[:, None, None]) * pf, axis=(1, 2)) / denom
  ok = npair > 0
  return (xp.where(ok, mean, np.nan), xp.where(ok, std, np.nan),
          xp.where(ok, gap, np.nan))


def _spread(xp: Any, values: Any, valid: Any) -> Any:
  """std / mean of `values` over `valid` entries (ddof=0)."""
  vf = valid.astype(values.dtype)
  n = xp.maximum(xp.sum(vf), 1.0)
  mean = xp.sum(values * vf) / n
  std = xp.sqrt(xp.sum((values - mean) ** 2 * vf) / n)
  return xp.where(xp.sum(vf) > 0, std / xp.maximum(mean, _EPS), np.nan)


def _summary(xp: Any, means: Any, counts: Any,
             within_quad: Callable[[Any], Any], classifier: Any,
             tail_mask: np.ndarray, center: str) -> dict[str, Any]:
  """All metrics from class means, counts and the within-class covariance.

  Args:
    xp: numpy (float64, host) or jax.numpy (traceable).
    means: `(K, d)` class means (any value for absent classes).
    counts: `(K,)` float samples per class.
    within_quad: maps `U (d, r)` to `diag(U^T Sigma_W U)`, shape `(r,)`.
    classifier: `(d, K)`.
    tail_mask: `(K,)` bool numpy array of tail classes.
    center: "classes" or "samples", see the module docstring.

  Returns:
    dict of scalars with keys `METRIC_KEYS`.
  """
  if center not in ("classes", "samples"):
    raise ValueError(f"center must be 'classes' or 'samples', got {center!r}.")
  present = counts > 0
  pf = present.astype(means.dtype)
  k_p = xp.sum(pf)
  n = xp.sum(counts)
  means = means * pf[:, None]
  if center == "classes":
    mu_g = xp.sum(means, axis=0) / xp.maximum(k_p, 1.0)
  else:
    mu_g = xp.sum(means * counts[:, None], axis=0) / xp.maximum(n, 1.0)
  mc = (means - mu_g[None, :]) * pf[:, None]  # (K, d); absent rows zero.

  # NC1 in the span of the centred means: with mc^T = U S V^T,
  # Sigma_B = U S^2 U^T / K_p, so Tr(Sigma_W Sigma_B^+) / K_p
  # = sum_i (u_i^T Sigma_W u_i) / s_i^2 over the kept singular values.
  u, s, _ = xp.linalg.svd(mc.T, full_matrices=False)
  s2 = s * s
  keep = (s2 > PINV_RCOND * xp.max(s2)) & (s2 > 0)
  inv = xp.where(keep, 1.0 / xp.where(keep, s2, 1.0), 0.0)
  nc1 = xp.sum(within_quad(u) * inv)

  w = classifier.T  # (K, d)
  h_norm = xp.sqrt(xp.sum(mc * mc, axis=1))
  w_norm = xp.sqrt(xp.sum(w * w, axis=1))
  all_w = np.ones(tail_mask.shape, bool)
  k = float(tail_mask.shape[0])
  # Rows: all centred means, all classifier columns, then the tail's.
  mean, std, gap = _pair_stats(
      xp, xp.stack([mc, w, mc, w]),
      xp.stack([present, all_w, present & tail_mask, tail_mask]),
      xp.stack([k_p, xp.asarray(k, k_p.dtype), k_p,
                xp.asarray(k, k_p.dtype)]))

  wp = w * pf[:, None]
  h_unit = mc / xp.maximum(xp.sqrt(xp.sum(mc * mc)), _EPS)
  w_unit = wp / xp.maximum(xp.sqrt(xp.sum(wp * wp)), _EPS)
  self_duality = xp.sum((h_unit - w_unit) ** 2)
  cos_hw_c = xp.sum(mc * w, axis=1) / xp.maximum(h_norm * w_norm, _EPS)
  cos_hw = xp.where(k_p > 0, xp.sum(cos_hw_c * pf) / xp.maximum(k_p, 1.0),
                    np.nan)
  return {
      "nc1": nc1,
      "norm_spread_h": _spread(xp, h_norm, present),
      "norm_spread_w": _spread(xp, w_norm, all_w),
      "cos_mean_h": mean[0], "cos_std_h": std[0], "cos_gap_h": gap[0],
      "cos_mean_w": mean[1], "cos_std_w": std[1], "cos_gap_w": gap[1],
      "self_duality": self_duality,
      "cos_hw": cos_hw,
      "minority_cos_w": mean[3],
      "minority_cos_h": mean[2],
      "num_present": k_p,
      "num_samples": n,
  }


def compute_jax(features: jax.Array,
                labels: jax.Array,
                classifier: jax.Array,
                *,
                num_classes: int,
                tail_classes: Sequence[int] | None = None,
                mask: jax.Array | None = None,
                center: str = "classes") -> dict[str, jax.Array]:
  """Traceable one-shot metrics (call under `jit`, `vmap`, `scan`).

  Two passes over the features (means, then deviations from them), so
  `Sigma_W` has no cancellation; `Sigma_W` is never formed as a d x d matrix.

  Args:
    features: `(N, d)` float features.
    labels: `(N,)` integer labels in `[0, num_classes)`.
    classifier: `(d, K)` classifier columns.
    num_classes: K (static).
    tail_classes: tail class indices (static); default the last ceil(0.3 K).
    mask: optional `(N,)` bool, False rows are ignored (padding).
    center: "classes" (default) or "samples": the global mean used.

  Returns:
    dict of float32 scalars, keys `METRIC_KEYS`.
  """
  _check_inputs(features, labels, classifier, num_classes)
  tail = _tail_mask(num_classes, tail_classes)
  f = features.astype(jnp.float32)
  wts = (jnp.ones(labels.shape, jnp.float32) if mask is None
         else mask.astype(jnp.float32))
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * wts[:, None]
  counts = jnp.sum(onehot, axis=0)
  means = jnp.matmul(onehot.T, f, precision=_HI) / jnp.maximum(counts, 1.0)[:,
                                                                            None]
  z = (f - jnp.take(means, labels, axis=0, mode="clip")) * wts[:, None]
  n = jnp.maximum(jnp.sum(counts), 1.0)

  def within_quad(u: jax.Array) -> jax.Array:
    return jnp.sum(jnp.matmul(z, u, precision=_HI) ** 2, axis=0) / n

  return _summary(jnp, means, counts, within_quad,
                  classifier.astype(jnp.float32), tail, center)


@functools.partial(jax.jit,
                   static_argnames=("num_classes", "tail_classes", "center"))
def _compute_jit(features, labels, classifier, mask, *, num_classes,
                 tail_classes, center):
  return compute_jax(features, labels, classifier, num_classes=num_classes,
                     tail_classes=tail_classes, mask=mask, center=center)


def compute(features: Any,
            labels: Any,
            classifier: Any,
            *,
            num_classes: int,
            tail_classes: Sequence[int] | None = None,
            mask: Any = None,
            center: str = "classes") -> dict[str, float]:
  """One-shot neural-collapse metrics as Python floats.

  Args:
    features: `(N, d)` features (numpy or jax).
    labels: `(N,)` integer labels.
    classifier: `(d, K)` classifier (transpose a `(K, d)` weight).
    num_classes: K.
    tail_classes: tail class indices; default the last ceil(0.3 K).
    mask: optional `(N,)` bool of valid rows.
    center: "classes" (default) or "samples".

  Returns:
    dict with keys `METRIC_KEYS` (see the module docstring).
  """
  tail = None if tail_classes is None else tuple(int(c) for c in tail_classes)
  out = _compute_jit(jnp.asarray(features), jnp.asarray(labels),
                     jnp.asarray(classifier), mask, num_classes=num_classes,
                     tail_classes=tail, center=center)
  return {k: float(v) for k, v in jax.device_get(out).items()}


def init_stats(num_classes: int, feature_dim: int) -> NCStats:
  """Empty statistics: `(K,)` counts, `(K, d)` refs and sums, `(d, d)`."""
  return NCStats(
      count=jnp.zeros((num_classes,), jnp.int32),
      ref=jnp.zeros((num_classes, feature_dim), jnp.float32),
      sum=jnp.zeros((num_classes, feature_dim), jnp.float32),
      second=jnp.zeros((feature_dim, feature_dim), jnp.float32))


def update_stats(stats: NCStats,
                 features: jax.Array,
                 labels: jax.Array,
                 mask: jax.Array | None = None) -> NCStats:
  """Adds one batch (pure; jit it, donating `stats` if you like).

  With `features`/`labels` sharded along the batch axis under `jit`, the
  contractions over the batch are global sums, so the result is the same on
  every device and process.

  Args:
    stats: running `NCStats`.
    features: `(B, d)` float features.
    labels: `(B,)` integer labels; must be in `[0, K)` where `mask` is True.
    mask: optional `(B,)` bool, False for padding rows.

  Returns:
    updated `NCStats`.
  """
  k, d = stats.ref.shape
  if np.ndim(features) != 2 or np.shape(features)[1] != d:
    raise ValueError(f"features must be (B, {d}), got {np.shape(features)}.")
  f = features.astype(jnp.float32)
  wts = (jnp.ones(labels.shape, jnp.float32) if mask is None
         else mask.astype(jnp.float32))
  onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32) * wts[:, None]
  bcount = jnp.sum(onehot, axis=0)
  bsum = jnp.matmul(onehot.T, f, precision=_HI)
  first_seen = (stats.count == 0) & (bcount > 0)
  ref = jnp.where(first_seen[:, None],
                  bsum / jnp.maximum(bcount, 1.0)[:, None], stats.ref)
  shifted = (f - jnp.take(ref, labels, axis=0, mode="clip")) * wts[:, None]
  return NCStats(
      count=stats.count + jnp.round(bcount).astype(jnp.int32),
      ref=ref,
      sum=stats.sum + jnp.matmul(onehot.T, shifted, precision=_HI),
      second=stats.second + jnp.matmul(shifted.T, shifted, precision=_HI))


def _to_host(x: jax.Array) -> np.ndarray:
  """float64 numpy copy; gathers arrays not fully addressable (multi-host)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), np.float64)


def finalize(stats: NCStats,
             classifier: Any,
             *,
             tail_classes: Sequence[int] | None = None,
             center: str = "classes") -> dict[str, float]:
  """Metrics of the accumulated statistics, computed on the host in float64.

  Args:
    stats: `NCStats` after all `update_stats` calls.
    classifier: `(d, K)` classifier.
    tail_classes: tail class indices; default the last ceil(0.3 K).
    center: "classes" (default) or "samples".

  Returns:
    the same dict as `compute` on the concatenated batches.
  """
  count, ref, sums, second = (_to_host(x) for x in stats)
  k, d = ref.shape
  w = _to_host(jnp.asarray(classifier))
  if w.shape != (d, k):
    raise ValueError(f"classifier must be (d, K) = ({d}, {k}), got {w.shape}.")
  n = max(count.sum(), 1.0)
  delta = sums / np.maximum(count, 1.0)[:, None]
  sigma_w = (second - (delta * count[:, None]).T @ delta) / n

  def within_quad(u: np.ndarray) -> np.ndarray:
    return np.einsum("dr,de,er->r", u, sigma_w, u)

  out = _summary(np, ref + delta, count, within_quad, w,
                 _tail_mask(k, tail_classes), center)
  return {key: float(v) for key, v in out.items()}
