"""Properties of the fixed simplex ETF."""

import chex
import jax
import numpy as np
import pytest

from nc_jax import etf as etf_lib

SIZES = [(2, 1), (3, 2), (10, 9), (10, 64), (100, 99), (100, 128), (10, 512)]


def _check_etf(m: np.ndarray, k: int, d: int, atol: float) -> None:
  assert m.shape == (d, k)
  m = m.astype(np.float64)
  np.testing.assert_allclose(np.linalg.norm(m, axis=0), 1.0, atol=atol)
  gram = m.T @ m
  off = gram[~np.eye(k, dtype=bool)]
  np.testing.assert_allclose(off, -1.0 / (k - 1), atol=atol)
  np.testing.assert_allclose(m.sum(axis=1), 0.0, atol=atol * np.sqrt(k))
  assert np.linalg.matrix_rank(m, tol=1e-4) == k - 1


@pytest.mark.parametrize("k,d", SIZES)
def test_etf_properties(k, d):
  m = np.asarray(etf_lib.simplex_etf(k, d, seed=3))
  _check_etf(m, k, d, atol=2e-6)


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
def test_etf_large_imagenet_size():
  k, d = 1000, 4096
  m = np.asarray(etf_lib.simplex_etf(k, d, seed=0))
  _check_etf(m, k, d, atol=2e-6)


def test_float64_precision_and_gram_helper():
  with jax.enable_x64(True):
    m = np.asarray(etf_lib.simplex_etf(7, 6, seed=1, dtype=np.float64))
    assert m.dtype == np.float64
    _check_etf(m, 7, 6, atol=1e-12)
    gram = 7 / 6 * (np.eye(7) - np.full((7, 7), 1 / 7))
    np.testing.assert_allclose(m.T @ m, gram, atol=1e-12)


def test_deterministic_in_seed_and_different_across_seeds():
  a = etf_lib.simplex_etf(10, 64, seed=5)
  b = etf_lib.simplex_etf(10, 64, seed=5)
  c = etf_lib.simplex_etf(10, 64, seed=6)
  chex.assert_trees_all_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.1
  # Also for the d = K - 1 construction.
  assert not np.allclose(etf_lib.simplex_etf(10, 9, seed=0),
                         etf_lib.simplex_etf(10, 9, seed=1))


def test_dtype():
  assert etf_lib.simplex_etf(4, 8, dtype=np.float16).dtype == np.float16


@pytest.mark.parametrize("k,d", [(10, 8), (100, 64), (1000, 512)])
def test_too_small_feature_dim_raises(k, d):
  with pytest.raises(ValueError) as e:
    etf_lib.simplex_etf(k, d)
  msg = str(e.value)
  assert f"num_classes={k}" in msg and f"feature_dim={d}" in msg
  assert f">= {k - 1}" in msg


def test_too_few_classes_raises():
  with pytest.raises(ValueError, match="num_classes >= 2"):
    etf_lib.simplex_etf(1, 8)


@pytest.mark.parametrize("k,d", [(2, 2), (10, 10), (10, 64), (100, 128)])
def test_uniform01_rotation_is_an_etf(k, d):
  m = np.asarray(etf_lib.simplex_etf(k, d, seed=3, rotation="uniform01"))
  _check_etf(m, k, d, atol=2e-6)


def test_uniform01_is_the_references_draw():
  """numpy's QR of a uniform [0, 1) d x K matrix, centred and scaled."""
  k, d = 10, 64
  a = np.random.default_rng(7).random((d, k))
  u, _ = np.linalg.qr(a)
  want = np.sqrt(k / (k - 1)) * u @ (np.eye(k) - np.ones((k, k)) / k)
  got = np.asarray(etf_lib.simplex_etf(k, d, seed=7, rotation="uniform01"),
                   np.float64)
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_orientation_bias_of_the_two_rotations():
  """uniform01 puts class 0 near -(1, ..., 1)/sqrt(d); gaussian does not."""
  k, d = 10, 64
  ones = np.ones(d) / np.sqrt(d)

  def cos0(rotation):
    return np.array([
        np.asarray(etf_lib.simplex_etf(k, d, seed=s, rotation=rotation))[:, 0]
        @ ones for s in range(100)])

  uni, gau = cos0("uniform01"), cos0("gaussian")
  assert -0.9 < uni.mean() < -0.7 and uni.max() < -0.5, uni.mean()
  assert abs(gau.mean()) < 0.05 and np.abs(gau).max() < 0.6, gau.mean()


def test_uniform01_needs_d_at_least_k_and_names_the_fix():
  with pytest.raises(ValueError, match="etf_rotation='gaussian'"):
    etf_lib.simplex_etf(10, 9, rotation="uniform01")
  with pytest.raises(ValueError, match="Unknown ETF rotation"):
    etf_lib.simplex_etf(10, 9, rotation="haar")
