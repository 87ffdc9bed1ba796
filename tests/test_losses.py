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


# ---------------------------------------------------- long-tail baselines
def np_log_prior(counts):
  n = np.asarray(counts, np.float64)
  return np.log(n / n.sum())


def np_ldam_margins(counts, max_margin=0.5):
  m = 1.0 / np.asarray(counts, np.float64) ** 0.25
  return m * max_margin / m.max()


def np_ldam(logits, labels, counts, max_margin=0.5, scale=30.0):
  z = np.array(logits, np.float64)
  m = np_ldam_margins(counts, max_margin)
  for i, y in enumerate(labels):
    z[i, y] -= m[y]
  return np_ce(scale * z, labels)


def np_cb_weights(counts, beta):
  n = np.asarray(counts, np.float64)
  w = np.zeros_like(n)
  w[n > 0] = (1.0 - beta) / (1.0 - beta ** n[n > 0])
  return w * len(n) / w.sum()


def np_fd_grad(f, x, eps=1e-6):
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    e = np.zeros_like(x)
    e[idx] = eps
    g[idx] = (f(x + e) - f(x - e)) / (2 * eps)
  return g


# A long-tailed CIFAR-like count vector (imbalance 100) for K = 6.
COUNTS = [5000, 1991, 792, 315, 125, 50]


def _lt_batch(seed, b=12, k=6, cosine=False):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((b, k)).astype(np.float32)
  if cosine:
    z = np.tanh(z)  # inside [-1, 1] like cosine logits
  labels = rng.integers(0, k, size=b).astype(np.int32)
  return z, labels


class LongTailLossTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0, 0.0), (1, 1.0), (2, 1.5))
  def test_logit_adjusted_matches_numpy(self, seed, tau):
    z, y = _lt_batch(seed)
    fn = self.variant(lambda z, y: losses.logit_adjusted_cross_entropy(
        z, y, class_counts=COUNTS, tau=tau))
    got = fn(z, y)
    chex.assert_shape(got, (z.shape[0],))
    want = np_ce(z + tau * np_log_prior(COUNTS), y)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_logit_adjusted_uniform_counts_is_plain_ce(self):
    z, y = _lt_batch(3)
    got = losses.logit_adjusted_cross_entropy(
        z, y, class_counts=np.full(6, 17), tau=1.0)
    np.testing.assert_allclose(got, np_ce(z, y), rtol=1e-5, atol=1e-6)
    # And the adjustment does something for skewed counts.
    skewed = losses.logit_adjusted_cross_entropy(z, y, class_counts=COUNTS)
    assert np.abs(np.asarray(skewed) - np_ce(z, y)).max() > 0.1

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1)
  def test_balanced_softmax_matches_numpy(self, seed):
    z, y = _lt_batch(seed)
    fn = self.variant(lambda z, y: losses.balanced_softmax_cross_entropy(
        z, y, class_counts=np.asarray(COUNTS)))
    want = np_ce(z + np.log(np.asarray(COUNTS, np.float64)), y)
    np.testing.assert_allclose(fn(z, y), want, rtol=1e-5, atol=1e-6)

  def test_balanced_softmax_equals_logit_adjustment_tau_one(self):
    z, y = _lt_batch(4)
    bs = losses.balanced_softmax_cross_entropy(
        z, y, class_counts=jnp.asarray(COUNTS))
    la = losses.logit_adjusted_cross_entropy(z, y, class_counts=COUNTS, tau=1.0)
    np.testing.assert_allclose(bs, la, rtol=1e-5, atol=1e-6)
    la2 = losses.logit_adjusted_cross_entropy(z, y, class_counts=COUNTS, tau=2.0)
    assert np.abs(np.asarray(bs) - np.asarray(la2)).max() > 0.1

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.5, 1.0)
  def test_posthoc_logit_adjust(self, tau):
    z, _ = _lt_batch(5, b=64)
    fn = self.variant(lambda z: losses.posthoc_logit_adjust(
        z, class_counts=COUNTS, tau=tau))
    got = fn(z)
    chex.assert_shape(got, z.shape)
    want = z - tau * np_log_prior(COUNTS)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The adjustment moves predictions towards rare classes.
    assert (np.argmax(got, -1) == 5).sum() > (np.argmax(z, -1) == 5).sum()

  def test_ldam_margins(self):
    got = losses.ldam_margins(COUNTS, max_margin=0.5)
    chex.assert_shape(got, (6,))
    np.testing.assert_allclose(got, np_ldam_margins(COUNTS, 0.5), rtol=1e-6)
    np.testing.assert_allclose(np.max(got), 0.5, rtol=1e-6)
    # COUNTS is decreasing, so margins must strictly increase.
    assert np.all(np.diff(np.asarray(got)) > 0)
    # m_j n_j^(1/4) is the same constant C for every class.
    c = np.asarray(got, np.float64) * np.asarray(COUNTS, np.float64) ** 0.25
    np.testing.assert_allclose(c, c[0], rtol=1e-5)
    np.testing.assert_allclose(
        np.max(losses.ldam_margins([3, 3, 3], max_margin=0.3)), 0.3, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0, 0.5, 30.0), (1, 0.3, 10.0))
  def test_ldam_matches_numpy(self, seed, max_margin, scale):
    z, y = _lt_batch(seed, cosine=True)
    fn = self.variant(lambda z, y: losses.ldam_loss(
        z, y, class_counts=COUNTS, max_margin=max_margin, scale=scale))
    got = fn(z, y)
    chex.assert_shape(got, (z.shape[0],))
    np.testing.assert_allclose(got, np_ldam(z, y, COUNTS, max_margin, scale),
                               rtol=1e-5, atol=1e-5)

  def test_ldam_zero_margin_is_scaled_ce(self):
    z, y = _lt_batch(6, cosine=True)
    got = losses.ldam_loss(z, y, class_counts=COUNTS, max_margin=0.0,
                           scale=30.0)
    np.testing.assert_allclose(got, np_ce(30.0 * z, y), rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.9, 0.999, 0.9999)
  def test_class_balanced_weights(self, beta):
    fn = self.variant(lambda: losses.class_balanced_weights(COUNTS, beta=beta))
    got = fn()
    chex.assert_shape(got, (6,))
    np.testing.assert_allclose(got, np_cb_weights(COUNTS, beta), rtol=1e-5)
    np.testing.assert_allclose(np.sum(got), 6.0, rtol=1e-6)
    # Rarer classes weigh more (equal once beta^n underflows, for small beta).
    assert np.all(np.diff(np.asarray(got)) >= 0) and got[-1] > got[0]

  def test_class_balanced_weights_zero_count(self):
    counts = [100, 0, 10]
    got = np.asarray(losses.class_balanced_weights(counts, beta=0.99))
    assert np.all(np.isfinite(got))
    assert got[1] == 0.0
    np.testing.assert_allclose(got, np_cb_weights(counts, 0.99), rtol=1e-5)
    np.testing.assert_allclose(got.sum(), 3.0, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_class_weighted_mean(self):
    rng = np.random.default_rng(0)
    per = rng.random(10).astype(np.float32)
    y = rng.integers(0, 4, size=10).astype(np.int32)
    w = np.asarray([0.5, 1.0, 2.0, 4.0], np.float32)
    mask = np.asarray([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    fn = self.variant(losses.class_weighted_mean)
    wy = w[y].astype(np.float64)
    np.testing.assert_allclose(fn(per, y, w), (wy * per).sum() / wy.sum(),
                               rtol=1e-6)
    got = fn(per, y, w, mask=mask)
    want = (wy * per * mask).sum() / (wy * mask).sum()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(fn(per, y, np.ones(4, np.float32)), per.mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(
        fn(per, y, w, mask=np.zeros(10, bool)), 0.0, atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dot_loss(self):
    h, labels, m = _random_batch(9)
    t = m[:, labels].T
    got = self.variant(losses.dot_loss)(h, t)
    chex.assert_shape(got, (h.shape[0],))
    want = -(h.astype(np.float64) * t).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grad = self.variant(jax.grad(lambda hh: losses.dot_loss(hh, t).sum()))(h)
    np.testing.assert_allclose(grad, -t, rtol=1e-6)

  @parameterized.named_parameters(
      ("logit_adjusted", "la"), ("balanced_softmax", "bs"), ("ldam", "ldam"))
  def test_gradient_matches_finite_differences(self, which):
    z, y = _lt_batch(10, b=4, cosine=True)
    jax_fns = {
        "la": lambda zz: losses.logit_adjusted_cross_entropy(
            zz, y, class_counts=COUNTS, tau=1.5),
        "bs": lambda zz: losses.balanced_softmax_cross_entropy(
            zz, y, class_counts=COUNTS),
        "ldam": lambda zz: losses.ldam_loss(zz, y, class_counts=COUNTS,
                                            scale=5.0),
    }
    np_fns = {
        "la": lambda zz: np_ce(zz + 1.5 * np_log_prior(COUNTS), y),
        "bs": lambda zz: np_ce(zz + np.log(np.asarray(COUNTS, float)), y),
        "ldam": lambda zz: np_ldam(zz, y, COUNTS, scale=5.0),
    }
    wts = np.linspace(0.5, 2.0, len(y))  # distinct weights per example
    grad = jax.jit(jax.grad(lambda zz: (jax_fns[which](zz) * wts).sum()))(z)
    fd = np_fd_grad(lambda zz: (np_fns[which](zz) * wts).sum(), z)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5)

  def test_class_weighted_mean_gradient(self):
    per = np.asarray([0.3, 1.2, 0.7, 2.0], np.float32)
    y = np.asarray([0, 2, 1, 2], np.int32)
    w = np.asarray([1.0, 3.0, 0.5], np.float32)
    mask = np.asarray([True, True, False, True])
    grad = jax.grad(lambda p: losses.class_weighted_mean(
        p, y, w, mask=mask))(per)
    wy = w[y] * mask
    np.testing.assert_allclose(grad, wy / wy.sum(), rtol=1e-6)

  def test_traced_counts_under_jit(self):
    z, y = _lt_batch(11)
    counts = jnp.asarray(COUNTS, jnp.int32)

    @jax.jit
    def f(z, y, counts, tau, beta):
      return (losses.logit_adjusted_cross_entropy(
                  z, y, class_counts=counts, tau=tau),
              losses.balanced_softmax_cross_entropy(z, y, class_counts=counts),
              losses.ldam_loss(jnp.tanh(z), y, class_counts=counts),
              losses.class_balanced_weights(counts, beta=beta))

    la, bs, ldam, cb = f(z, y, counts, 1.0, 0.9999)
    np.testing.assert_allclose(la, np_ce(z + np_log_prior(COUNTS), y),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bs, la, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ldam, np_ldam(np.tanh(z), y, COUNTS),
                               rtol=1e-5, atol=1e-5)
    # Traced beta takes log(beta) in float32: slightly looser.
    np.testing.assert_allclose(cb, np_cb_weights(COUNTS, 0.9999), rtol=1e-3)

  def test_bad_inputs_raise(self):
    z, y = _lt_batch(0)
    la = losses.logit_adjusted_cross_entropy
    with self.assertRaisesRegex(ValueError, "4 entries.*K = 6"):
      la(z, y, class_counts=[1, 2, 3, 4])
    with self.assertRaisesRegex(ValueError, "4 entries.*K = 6"):
      losses.posthoc_logit_adjust(z, class_counts=[1, 2, 3, 4])
    with self.assertRaisesRegex(ValueError, "4 entries.*K = 6"):
      losses.balanced_softmax_cross_entropy(z, y, class_counts=[1, 2, 3, 4])
    with self.assertRaisesRegex(ValueError, "4 entries.*K = 6"):
      losses.ldam_loss(z, y, class_counts=[1, 2, 3, 4])
    with self.assertRaisesRegex(ValueError, r"\(K,\)"):
      la(z, y, class_counts=np.ones((2, 3)))
    with self.assertRaisesRegex(ValueError, "tau"):
      la(z, y, class_counts=COUNTS, tau=-0.5)
    with self.assertRaisesRegex(ValueError, "tau"):
      losses.posthoc_logit_adjust(z, class_counts=COUNTS, tau=-1.0)
    with self.assertRaisesRegex(ValueError, "non-negative"):
      la(z, y, class_counts=[5, 4, -1, 3, 2, 1])
    with self.assertRaisesRegex(ValueError, "positive"):
      losses.balanced_softmax_cross_entropy(
          z, y, class_counts=[5, 4, 0, 3, 2, 1])
    with self.assertRaisesRegex(ValueError, "positive"):
      losses.ldam_margins([5, 0, 3])
    with self.assertRaisesRegex(ValueError, "max_margin"):
      losses.ldam_margins([5, 4, 3], max_margin=-0.1)
    with self.assertRaisesRegex(ValueError, "scale"):
      losses.ldam_loss(z, y, class_counts=COUNTS, scale=0.0)
    with self.assertRaisesRegex(ValueError, r"\(B, K\)"):
      la(z[0], y, class_counts=COUNTS)
    with self.assertRaisesRegex(ValueError, "entries"):
      losses.ldam_loss(z, y[:3], class_counts=COUNTS)
    with self.assertRaisesRegex(TypeError, "integer"):
      losses.balanced_softmax_cross_entropy(
          z, y.astype(np.float32), class_counts=COUNTS)
    with self.assertRaisesRegex(TypeError, "floating"):
      la(z.astype(np.int32), y, class_counts=COUNTS)
    for beta in (0.0, 1.0, 1.5, -0.2):
      with self.assertRaisesRegex(ValueError, "beta"):
        losses.class_balanced_weights(COUNTS, beta=beta)
    with self.assertRaisesRegex(ValueError, "all zero"):
      losses.class_balanced_weights([0, 0, 0])
    with self.assertRaisesRegex(ValueError, "non-negative"):
      losses.class_balanced_weights([3, -1, 2])
    per = np.ones(12, np.float32)
    w = np.ones(6, np.float32)
    with self.assertRaisesRegex(ValueError, "entries"):
      losses.class_weighted_mean(per, y[:5], w)
    with self.assertRaisesRegex(ValueError, r"\(B,\)"):
      losses.class_weighted_mean(per[None], y, w)
    with self.assertRaisesRegex(ValueError, r"\(K,\)"):
      losses.class_weighted_mean(per, y, w[None])
    with self.assertRaisesRegex(ValueError, "mask"):
      losses.class_weighted_mean(per, y, w, mask=np.ones(3, bool))
    with self.assertRaisesRegex(TypeError, "floating"):
      losses.class_weighted_mean(per, y, np.ones(6, np.int32))
    with self.assertRaisesRegex(ValueError, "shape of features"):
      losses.dot_loss(np.ones((4, 3), np.float32), np.ones((4, 2), np.float32))
    with self.assertRaisesRegex(TypeError, "floating"):
      losses.dot_loss(np.ones((4, 3), np.int32), np.ones((4, 3), np.float32))
