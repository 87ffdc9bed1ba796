"""Losses of the fixed-ETF head: dot regression, its targets, CE and mixup.

References:
  Yang, Chen, Li, Xie, Lin, Tao. Inducing Neural Collapse in Imbalanced
  Learning: Do We Really Need a Learnable Classifier at the End of Deep Neural
  Network? NeurIPS 2022. arXiv:2203.09081. (Eq. 6: the dot-regression loss.)
  Zhang, Cisse, Dauphin, Lopez-Paz. mixup: Beyond Empirical Risk
  Minimization. ICLR 2018.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nc_jax.losses.checks import check_features_targets
from nc_jax.losses.checks import check_float
from nc_jax.losses.checks import check_int
from nc_jax.losses.checks import check_labels
from nc_jax.losses.checks import check_rank

# The reference clamps ||h|| from below by this before dividing by it.
NORM_EPS = 1e-8


def dot_regression_loss(features: jax.Array,
                        targets: jax.Array,
                        *,
                        e_w: float | None = None,
                        e_h: float | None = None,
                        reg_lam: float = 0.0) -> jax.Array:
  """Dot-regression (DR) loss, per example.

  Default (the reference code's form, `e_w = e_h = None`): for feature `h` and
  target vector `t` (the true class's ETF column, possibly rescaled, see
  `batch_class_lengths`),

      loss = 0.5 * (<h, t> - ||t|| * ||h||)^2 / ||h||,

  with `||h||` clamped at 1e-8 and both norms treated as constants for the
  gradient (`stop_gradient`), exactly as the released implementation. The
  gradient is then `-(||t|| ||h|| - <h,t>) t / ||h||`: it pulls `h` along its
  own class's vector only and never pushes it away from other classes.

  Paper form (both `e_w` and `e_h` given): Yang et al. (2022) Eq. (6),

      loss = (<h, t> - sqrt(e_w * e_h))^2 / (2 * sqrt(e_w * e_h)),

  where `e_w`, `e_h` are the squared-length constraints of classifier vectors
  and features; nothing is stopped.

  Either form optionally adds `reg_lam * ||h||` (the reference uses
  `reg_lam = 0.01` on ImageNet-LT, 0 elsewhere); its gradient is not stopped.

  Args:
    features: `(B, d)` float features `h`, as they enter the classifier.
    targets: `(B, d)` float target vectors `t` of each example's class.
    e_w: squared classifier length of the paper's form, or None.
    e_h: squared feature length of the paper's form, or None.
    reg_lam: weight of the feature-norm regulariser.

  Returns:
    `(B,)` loss values, unreduced.

  Raises:
    ValueError: for shapes other than two equal `(B, d)`, or only one of
      `e_w`, `e_h` given, or non-positive lengths.
    TypeError: for non-float inputs.

  References:
    Yang et al. 2022, Eq. (6) and the authors' `DRLoss`.
  """
  check_features_targets(features, targets)
  if (e_w is None) != (e_h is None):
    raise ValueError(
        "Give both e_w and e_h (the paper's form) or neither (the reference "
        f"code's form); got e_w={e_w}, e_h={e_h}.")
  dot = jnp.sum(features * targets, axis=-1)
  h_norm = jnp.linalg.norm(features, axis=-1)
  if e_w is None:
    hn = jax.lax.stop_gradient(jnp.maximum(h_norm, NORM_EPS))
    tn = jax.lax.stop_gradient(jnp.linalg.norm(targets, axis=-1))
    loss = 0.5 * (dot - tn * hn) ** 2 / hn
  else:
    if e_w <= 0 or e_h <= 0:
      raise ValueError(f"e_w and e_h must be positive, got {e_w}, {e_h}.")
    scale = jnp.sqrt(e_w * e_h)
    loss = (dot - scale) ** 2 / (2.0 * scale)
  if reg_lam:
    loss = loss + reg_lam * h_norm
  return loss


def batch_class_lengths(labels: jax.Array, num_classes: int) -> jax.Array:
  """Per-class target lengths of the reference's "GivenEw" scheme.

  With `B` examples, `n_c` of them in class `c` and `u` distinct classes in
  the batch, `gamma = B / u` and class `c`'s length is `sqrt(gamma / n_c)`;
  classes absent from the batch keep length 1. Scaling ETF column `c` by
  this length makes the DR loss of unit-norm features
  `0.5 * (gamma / n_c) * (cos - 1)^2`: inverse in-batch class frequency
  weighting. The reference applies it during training only.

  Args:
    labels: `(B,)` integer class indices in `[0, num_classes)`.
    num_classes: K, static under jit.

  Returns:
    `(num_classes,)` float32 lengths.

  References:
    The authors' `DRLoss` with `GivenEw=True` (their default).
  """
  check_int("labels", labels)
  check_rank("labels", labels, 1, "(B,)")
  counts = jnp.zeros((num_classes,), jnp.float32).at[labels].add(1.0)
  present = counts > 0
  gamma = labels.shape[0] / jnp.sum(present)
  return jnp.where(present, jnp.sqrt(gamma / jnp.maximum(counts, 1.0)), 1.0)


def etf_targets(etf: jax.Array,
                labels: jax.Array,
                *,
                lengths: jax.Array | None = None) -> jax.Array:
  """Each example's target vector: its class's ETF column, optionally scaled.

  Args:
    etf: `(d, K)` classifier matrix.
    labels: `(B,)` integer class indices.
    lengths: optional `(K,)` per-class lengths (see `batch_class_lengths`).

  Returns:
    `(B, d)` target vectors.
  """
  check_float("etf", etf)
  check_rank("etf", etf, 2, "(d, K)")
  check_int("labels", labels)
  check_rank("labels", labels, 1, "(B,)")
  cols = jnp.take(etf, labels, axis=1).T
  if lengths is not None:
    if jnp.shape(lengths) != (etf.shape[1],):
      raise ValueError(
          f"lengths must have shape (K,) = ({etf.shape[1]},), got "
          f"{jnp.shape(lengths)}.")
    cols = cols * jnp.take(lengths, labels)[:, None].astype(cols.dtype)
  return cols


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross entropy with integer labels, per example.

  Used for both the learnable baseline and ETF + CE (logits `h @ M`, no bias,
  no temperature, as the reference).

  Args:
    logits: `(B, K)` float logits.
    labels: `(B,)` integer class indices.

  Returns:
    `(B,)` loss values.
  """
  check_float("logits", logits)
  check_rank("logits", logits, 2, "(B, K)")
  check_labels(labels, logits.shape[0])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def mixup_loss(loss_a: jax.Array, loss_b: jax.Array,
               lam: jax.Array | float) -> jax.Array:
  """Combines per-example losses against both mixup partners.

  `lam * L(y_a) + (1 - lam) * L(y_b)`, the form the reference uses for every
  method (CE and DR alike).

  Args:
    loss_a: `(B,)` losses against the unpermuted labels.
    loss_b: `(B,)` losses against the partners' labels.
    lam: scalar mixing weight in [0, 1] (one per batch).

  Returns:
    `(B,)` combined losses.
  """
  check_float("loss_a", loss_a)
  check_float("loss_b", loss_b)
  if jnp.shape(loss_a) != jnp.shape(loss_b):
    raise ValueError(
        f"loss_a and loss_b must have equal shapes, got {jnp.shape(loss_a)} "
        f"and {jnp.shape(loss_b)}.")
  if jnp.ndim(lam) != 0:
    raise ValueError(f"lam must be a scalar, got shape {jnp.shape(lam)}.")
  return lam * loss_a + (1.0 - lam) * loss_b


def dot_loss(features: jax.Array, targets: jax.Array) -> jax.Array:
  """The reference's plain dot loss `-<h, t>`, per example.

  Unbounded below: it only makes sense with features whose norm is kept in
  check elsewhere (the reference offers it as `criterion: dot_loss`).

  Args:
    features: `(B, d)` float features `h`.
    targets: `(B, d)` float target vectors `t` of each example's class.

  Returns:
    `(B,)` loss values `-<h, t>`, unreduced.

  Raises:
    ValueError: for shapes other than two equal `(B, d)`.
    TypeError: for non-float inputs.
  """
  check_features_targets(features, targets)
  return -jnp.sum(features * targets, axis=-1)
