"""Neural-collapse metrics against exact geometry and a float64 numpy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax import etf, nc_metrics

K, D = 10, 16


def _reference(features, labels, w, k, tail, center="classes"):
  """Plain float64 numpy, written from the definitions (d x d pinv included)."""
  h = np.asarray(features, np.float64)
  w = np.asarray(w, np.float64)
  present = [c for c in range(k) if np.any(labels == c)]
  kp = len(present)
  mu = {c: h[labels == c].mean(0) for c in present}
  if center == "classes":
    mu_g = np.mean([mu[c] for c in present], axis=0)
  else:
    mu_g = h.mean(0)
  sw = np.zeros((h.shape[1],) * 2)
  for c in present:
    z = h[labels == c] - mu[c]
    sw += z.T @ z
  sw /= len(h)
  mc = np.stack([mu[c] - mu_g for c in present], 1)  # (d, kp)
  sb = mc @ mc.T / kp
  nc1 = np.trace(sw @ np.linalg.pinv(sb, rcond=1e-6, hermitian=True)) / kp

  def pair_cos(vecs):
    u = vecs / np.linalg.norm(vecs, axis=0)
    g = u.T @ u
    return g[np.triu_indices(vecs.shape[1], 1)]

  def spread(x):
    return np.std(x) / np.mean(x)

  ch, cw = pair_cos(mc), pair_cos(w)
  wp = w[:, present]
  tail_p = [i for i, c in enumerate(present) if c in tail]
  return {
      "nc1": nc1,
      "norm_spread_h": spread(np.linalg.norm(mc, axis=0)),
      "norm_spread_w": spread(np.linalg.norm(w, axis=0)),
      "cos_mean_h": ch.mean(), "cos_std_h": ch.std(),
      "cos_gap_h": np.mean(np.abs(ch + 1 / (kp - 1))),
      "cos_mean_w": cw.mean(), "cos_std_w": cw.std(),
      "cos_gap_w": np.mean(np.abs(cw + 1 / (k - 1))),
      "self_duality": np.sum((mc / np.linalg.norm(mc) -
                              wp / np.linalg.norm(wp)) ** 2),
      "cos_hw": np.mean(np.sum(mc * wp, 0) / np.linalg.norm(mc, axis=0) /
                        np.linalg.norm(wp, axis=0)),
      "minority_cos_w": pair_cos(w[:, list(tail)]).mean(),
      "minority_cos_h": pair_cos(mc[:, tail_p]).mean(),
      "num_present": kp,
      "num_samples": len(h),
  }


def _random_problem(seed=0, n=300, k=K, d=D, absent=()):
  rng = np.random.default_rng(seed)
  centres = 3 * rng.standard_normal((k, d))
  labels = rng.integers(0, k, n)
  keep = ~np.isin(labels, absent)
  labels = labels[keep]
  feats = centres[labels] + rng.standard_normal((len(labels), d))
  w = rng.standard_normal((d, k))
  return feats.astype(np.float32), labels.astype(np.int32), w.astype(
      np.float32)


def _assert_close(got, want, rtol=1e-4, atol=1e-5):
  for key, val in want.items():
    assert got[key] == pytest.approx(val, rel=rtol, abs=atol), key


def test_default_tail_is_last_30_percent():
  assert nc_metrics.default_tail_classes(10) == (7, 8, 9)
  assert nc_metrics.default_tail_classes(100) == tuple(range(70, 100))


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_features_on_etf_are_collapsed(scale):
  m = np.asarray(etf.simplex_etf(K, D, seed=3))
  # Imbalanced counts: the class-balanced global mean keeps the simplex exact.
  labels = np.repeat(np.arange(K), [50, 40, 30, 20, 10, 8, 6, 4, 2, 1])
  feats = scale * m.T[labels]
  out = nc_metrics.compute(feats, labels, m, num_classes=K)
  assert out["nc1"] < 1e-6
  for key in ("cos_mean_h", "cos_mean_w", "minority_cos_w", "minority_cos_h"):
    assert out[key] == pytest.approx(-1 / (K - 1), abs=1e-6), key
  for key in ("cos_std_h", "cos_std_w", "cos_gap_h", "cos_gap_w",
              "norm_spread_h", "norm_spread_w", "self_duality"):
    assert abs(out[key]) < 1e-6, key
  assert out["cos_hw"] == pytest.approx(1.0, abs=1e-6)
  assert out["num_present"] == K and out["num_samples"] == len(labels)


@pytest.mark.parametrize("center", ["classes", "samples"])
def test_compute_matches_numpy_reference(center):
  feats, labels, w = _random_problem()
  tail = (6, 7, 8, 9)
  got = nc_metrics.compute(feats, labels, w, num_classes=K, tail_classes=tail,
                           center=center)
  want = _reference(feats, labels, w, K, tail, center)
  assert set(got) == set(nc_metrics.METRIC_KEYS)
  _assert_close(got, want)


def test_absent_classes_are_excluded():
  feats, labels, w = _random_problem(seed=1, absent=(2, 8))
  got = nc_metrics.compute(feats, labels, w, num_classes=K)
  want = _reference(feats, labels, w, K, (7, 8, 9))
  assert got["num_present"] == K - 2
  _assert_close(got, want)


def test_fewer_than_two_tail_classes_gives_nan():
  feats, labels, w = _random_problem(seed=2, absent=(8, 9))
  got = nc_metrics.compute(feats, labels, w, num_classes=K)
  assert math.isnan(got["minority_cos_h"])
  assert not math.isnan(got["minority_cos_w"])


def test_streaming_with_padded_final_batch_matches_one_shot():
  feats, labels, w = _random_problem(seed=4, n=517, absent=(5,))
  # An offset much larger than the within-class spread: naive E[hh^T] - mu
  # mu^T accumulation in float32 would lose the covariance to cancellation.
  feats = feats + 100.0
  batch = 64
  update = jax.jit(nc_metrics.update_stats)
  stats = nc_metrics.init_stats(K, D)
  for start in range(0, len(labels), batch):
    f = feats[start:start + batch]
    l = labels[start:start + batch]
    valid = np.ones(batch, bool)
    valid[len(l):] = False
    # Padding rows carry garbage features and an out-of-range label.
    f = np.concatenate([f, np.full((batch - len(f), D), 1e3, np.float32)])
    l = np.concatenate([l, np.full(batch - len(l), -1, np.int32)])
    stats = update(stats, jnp.asarray(f), jnp.asarray(l), jnp.asarray(valid))
  assert int(stats.count.sum()) == len(labels)
  streamed = nc_metrics.finalize(stats, w)
  one_shot = nc_metrics.compute(feats, labels, w, num_classes=K)
  want = _reference(feats, labels, w, K, (7, 8, 9))
  _assert_close(streamed, want)
  _assert_close(one_shot, want)


def test_compute_jax_respects_mask_and_jits():
  feats, labels, w = _random_problem(seed=5, n=100)
  pad_f = np.concatenate([feats, np.zeros((28, D), np.float32)])
  pad_l = np.concatenate([labels, np.zeros(28, np.int32)])
  mask = np.arange(128) < 100
  fn = jax.jit(lambda f, l, m: nc_metrics.compute_jax(
      f, l, jnp.asarray(w), num_classes=K, mask=m))
  got = {k: float(v) for k, v in fn(pad_f, pad_l, mask).items()}
  _assert_close(got, nc_metrics.compute(feats, labels, w, num_classes=K))


def test_shape_errors():
  feats, labels, w = _random_problem(seed=6, n=20)
  with pytest.raises(ValueError, match="classifier"):
    nc_metrics.compute(feats, labels, w.T, num_classes=K)
  with pytest.raises(ValueError, match="tail_classes"):
    nc_metrics.compute(feats, labels, w, num_classes=K, tail_classes=(10,))
