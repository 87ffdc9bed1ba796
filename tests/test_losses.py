"""Losses against plain-numpy references, finite differences and invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from nc_jax import etf as etf_lib
from nc_jax import losses


# ----------------------------------------------------------- numpy references
def np_dr(h, t, *, reg_lam=0.0, hn=None, tn=None):
  """Reference DR; `hn`, `tn` override the (gradient-free) norms."""
  h = np.asarray(h, np.float64)
  t = np.asarray(t, np.float64)
  dot = (h * t).sum(-1)
  if hn is None:
    hn = np.maximum(np.sqrt((h ** 2).sum(-1)), 1e-8)
  if tn is None:
    tn = np.sqrt((t ** 2).sum(-1))
  loss = 0.5 * (dot - tn * hn) ** 2 / hn
  return loss + reg_lam * np.sqrt((h ** 2).sum(-1))


def np_dr_paper(h, t, e_w, e_h):
  s = np.sqrt(e_w * e_h)
  return ((np.asarray(h, np.float64) * t).sum(-1) - s) ** 2 / (2 * s)


def np_lengths(labels, k):
  labels = np.asarray(labels)
  uniq, count = np.unique(labels, return_counts=True)
  gamma = len(labels) / len(uniq)
  out = np.ones(k)
  for c, n in zip(uniq, count):
    out[c] = np.sqrt(gamma / n)
  return out


def np_ce(logits, labels):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


def _random_batch(seed, b=16, d=12, k=5):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((b, d)).astype(np.float32)
  labels = rng.integers(0, k, size=b).astype(np.int32)
  m = np.asarray(etf_lib.simplex_etf(k, d, seed=seed))
  return h, labels, m


class DotRegressionTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, 2)
  def test_matches_numpy(self, seed):
    h, labels, m = _random_batch(seed)
    lengths = np_lengths(labels, m.shape[1])
    t = (m[:, labels] * lengths[labels]).T.astype(np.float32)
    got = self.variant(losses.dot_regression_loss)(h, t)
    chex.assert_shape(got, (h.shape[0],))
    np.testing.assert_allclose(got, np_dr(h, t), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_reg_lam(self):
    h, labels, m = _random_batch(4)
    t = m[:, labels].T
    fn = self.variant(lambda h, t: losses.dot_regression_loss(h, t, reg_lam=0.01))
    np.testing.assert_allclose(fn(h, t), np_dr(h, t, reg_lam=0.01), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_paper_form(self):
    h, labels, m = _random_batch(5)
    t = 2.0 * m[:, labels].T
    fn = self.variant(
        lambda h, t: losses.dot_regression_loss(h, t, e_w=4.0, e_h=9.0))
    np.testing.assert_allclose(fn(h, t), np_dr_paper(h, t, 4.0, 9.0), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.05)
  def test_gradient_matches_finite_differences(self, reg_lam):
    """The reference's gradient is that of the loss with both norms frozen."""
    h, labels, m = _random_batch(7, b=6, d=8, k=4)
    t = (m[:, labels] * np_lengths(labels, 4)[labels]).T
    hn0 = np.sqrt((h.astype(np.float64) ** 2).sum(-1))
    tn0 = np.sqrt((t.astype(np.float64) ** 2).sum(-1))

    def frozen(hh):  # numpy reference with norms fixed at h0, reg term live
      return np_dr(hh, t, hn=hn0, tn=tn0, reg_lam=reg_lam).sum()

    eps = 1e-6
    fd = np.zeros(h.shape, np.float64)
    h64 = h.astype(np.float64)
    for idx in np.ndindex(*h.shape):
      e = np.zeros_like(h64)
      e[idx] = eps
      fd[idx] = (frozen(h64 + e) - frozen(h64 - e)) / (2 * eps)

    grad = self.variant(jax.grad(
        lambda hh: losses.dot_regression_loss(hh, t, reg_lam=reg_lam).sum()))(h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5)
    # Closed form: -(|t||h| - <h,t>) t / |h|, plus reg_lam * h / |h|.
    closed = (-(tn0 * hn0 - (h64 * t).sum(-1)) / hn0)[:, None] * t
    closed += reg_lam * h64 / hn0[:, None]
    np.testing.assert_allclose(grad, closed, rtol=1e-4, atol=1e-5)

  def test_gradient_differs_from_full_autodiff(self):
    """Stopping the norms matters: the un-stopped loss has another gradient."""
    h, labels, m = _random_batch(8)
    t = m[:, labels].T

    def unstopped(hh):
      hn = jnp.linalg.norm(hh, axis=-1)
      tn = jnp.linalg.norm(t, axis=-1)
      return (0.5 * ((hh * t).sum(-1) - tn * hn) ** 2 / hn).sum()

    g_ref = jax.grad(lambda hh: losses.dot_regression_loss(hh, t).sum())(h)
    assert np.abs(g_ref - jax.grad(unstopped)(h)).max() > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_loss_and_gradient_on_etf_vertices(self):
    k, d = 10, 64
    m = etf_lib.simplex_etf(k, d, seed=2)
    labels = jnp.asarray([0, 0, 0, 1, 2, 3, 9, 9, 5, 7], jnp.int32)
    lengths = losses.batch_class_lengths(labels, k)
    h = m[:, labels].T  # every feature on its class's vertex

    def total(hh):
      t = losses.etf_targets(m, labels, lengths=lengths)
      return losses.dot_regression_loss(hh, t).sum()

    loss = self.variant(lambda hh: losses.dot_regression_loss(
        hh, losses.etf_targets(m, labels, lengths=lengths)))(h)
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)
    np.testing.assert_allclose(self.variant(jax.grad(total))(h), 0.0, atol=1e-6)
    # Scaling a feature along its vertex keeps it at the optimum too.
    np.testing.assert_allclose(
        losses.dot_regression_loss(3.0 * h, m[:, labels].T), 0.0, atol=1e-6)

  def test_zero_feature_is_finite(self):
    h = jnp.zeros((2, 4))
    t = jnp.ones((2, 4))
    out = losses.dot_regression_loss(h, t)
    assert np.all(np.isfinite(out))
    assert np.all(np.isfinite(jax.grad(
        lambda x: losses.dot_regression_loss(x, t).sum())(h)))

  def test_bad_inputs_raise(self):
    h = jnp.ones((4, 3))
    with self.assertRaisesRegex(ValueError, "shape of features"):
      losses.dot_regression_loss(h, jnp.ones((4, 2)))
    with self.assertRaisesRegex(ValueError, r"\(B, d\)"):
      losses.dot_regression_loss(jnp.ones((4,)), jnp.ones((4,)))
    with self.assertRaisesRegex(TypeError, "floating"):
      losses.dot_regression_loss(jnp.ones((4, 3), jnp.int32), h)
    with self.assertRaisesRegex(ValueError, "both e_w and e_h"):
      losses.dot_regression_loss(h, h, e_w=1.0)
    with self.assertRaisesRegex(ValueError, "positive"):
      losses.dot_regression_loss(h, h, e_w=0.0, e_h=1.0)


class ClassLengthsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, 2, 3)
  def test_matches_numpy(self, seed):
    rng = np.random.default_rng(seed)
    k = 10
    # Long-tailed draw so some classes are absent.
    p = 0.5 ** np.arange(k)
    labels = rng.choice(k, size=32, p=p / p.sum()).astype(np.int32)
    fn = self.variant(losses.batch_class_lengths, static_argnums=1)
    got = fn(labels, k)
    chex.assert_shape(got, (k,))
    np.testing.assert_allclose(got, np_lengths(labels, k), rtol=1e-6)

  def test_single_class_and_balanced(self):
    np.testing.assert_allclose(
        losses.batch_class_lengths(jnp.zeros(8, jnp.int32), 3), [1, 1, 1])
    np.testing.assert_allclose(
        losses.batch_class_lengths(jnp.arange(6, dtype=jnp.int32) % 3, 3),
        [1, 1, 1])

  def test_unit_features_give_weighted_cosine_form(self):
    """0.5 * (gamma / n_c) * (cos - 1)^2 for unit-norm features."""
    h, labels, m = _random_batch(11, b=20, d=8, k=4)
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    lengths = losses.batch_class_lengths(jnp.asarray(labels), 4)
    t = losses.etf_targets(jnp.asarray(m), jnp.asarray(labels), lengths=lengths)
    got = losses.dot_regression_loss(jnp.asarray(h), t)
    counts = np.bincount(labels, minlength=4)
    gamma = len(labels) / np.count_nonzero(counts)
    cos = (h * m[:, labels].T).sum(-1)
    want = 0.5 * gamma / counts[labels] * (cos - 1) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

  def test_bad_labels(self):
    with self.assertRaisesRegex(TypeError, "integer"):
      losses.batch_class_lengths(jnp.ones(4), 3)
    with self.assertRaisesRegex(ValueError, r"\(B,\)"):
      losses.batch_class_lengths(jnp.ones((2, 2), jnp.int32), 3)


class TargetsCrossEntropyMixupTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_etf_targets(self):
    _, labels, m = _random_batch(1)
    lengths = np.linspace(0.5, 2.0, m.shape[1]).astype(np.float32)
    got = self.variant(losses.etf_targets)(m, labels, lengths=lengths)
    np.testing.assert_allclose(got, (m[:, labels] * lengths[labels]).T,
                               rtol=1e-6)
    with self.assertRaisesRegex(ValueError, r"\(K,\)"):
      losses.etf_targets(m, labels, lengths=np.ones(3, np.float32))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1)
  def test_cross_entropy(self, seed):
    h, labels, m = _random_batch(seed)
    logits = h @ m
    got = self.variant(losses.cross_entropy)(logits, labels)
    chex.assert_shape(got, (h.shape[0],))
    np.testing.assert_allclose(got, np_ce(logits, labels), rtol=1e-5, atol=1e-6)

  def test_cross_entropy_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, "entries"):
      losses.cross_entropy(jnp.ones((4, 3)), jnp.zeros(5, jnp.int32))
    with self.assertRaisesRegex(TypeError, "integer"):
      losses.cross_entropy(jnp.ones((4, 3)), jnp.zeros(4))
    with self.assertRaisesRegex(TypeError, "floating"):
      losses.cross_entropy(jnp.ones((4, 3), jnp.int32), jnp.zeros(4, jnp.int32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_mixup_loss(self):
    h, labels, m = _random_batch(3)
    perm = np.random.default_rng(0).permutation(len(labels))
    logits = h @ m
    la = losses.cross_entropy(logits, labels)
    lb = losses.cross_entropy(logits, labels[perm])
    got = self.variant(losses.mixup_loss)(la, lb, 0.3)
    want = 0.3 * np_ce(logits, labels) + 0.7 * np_ce(logits, labels[perm])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "equal shapes"):
      losses.mixup_loss(la, lb[:3], 0.3)
    with self.assertRaisesRegex(ValueError, "scalar"):
      losses.mixup_loss(la, lb, jnp.ones(2))
