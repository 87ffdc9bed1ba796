"""Losses for classifiers with a fixed simplex-ETF head, written like optax's.

Every loss returns per-example values of shape `(B,)` and never reduces: the
caller averages (the reference code takes the batch mean). Options are
keyword-only. Mismatched shapes raise `ValueError` and non-float features or
non-integer labels raise `TypeError`, at trace time, so mistakes surface
before any compilation.

References:
  Yang, Chen, Li, Xie, Lin, Tao. Inducing Neural Collapse in Imbalanced
  Learning: Do We Really Need a Learnable Classifier at the End of Deep Neural
  Network? NeurIPS 2022. arXiv:2203.09081. (Eq. 6: the dot-regression loss.)
  Zhang, Cisse, Dauphin, Lopez-Paz. mixup: Beyond Empirical Risk
  Minimization. ICLR 2018.
  Long-tail baselines (docs/method.md, Long-tail baselines): Menon et al.,
  Long-tail learning via logit adjustment, ICLR 2021; Ren et al., Balanced
  Meta-Softmax, NeurIPS 2020; Cao et al., Learning Imbalanced Datasets with
  Label-Distribution-Aware Margin Loss (LDAM, DRW), NeurIPS 2019; Cui et al.,
  Class-Balanced Loss Based on Effective Number of Samples, CVPR 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The reference clamps ||h|| from below by this before dividing by it.
NORM_EPS = 1e-8


def _check_float(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}"
        ". Cast it, e.g. x.astype(jnp.float32).")


def _check_int(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise TypeError(
        f"{name} must hold integer class indices, got dtype "
        f"{jnp.result_type(x)}.")


def _check_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(
        f"{name} must have shape {layout}, got shape {jnp.shape(x)}.")


def _check_labels(labels: jax.Array, batch: int, name: str = "labels") -> None:
  _check_int(name, labels)
  _check_rank(name, labels, 1, "(B,)")
  if labels.shape[0] != batch:
    raise ValueError(
        f"{name} has {labels.shape[0]} entries but the batch has {batch} "
        "rows; they must match.")


def _is_concrete(x) -> bool:
  # Value checks need numbers; under jit the counts or options may be traced,
  # and then only their shapes can be checked.
  return not isinstance(x, jax.core.Tracer)


def _class_counts(class_counts, num_classes: int | None, *,
                  allow_zero: bool) -> jax.Array:
  """`class_counts` as a validated `(K,)` float32 array."""
  counts = jnp.asarray(class_counts)
  if jnp.ndim(counts) != 1:
    raise ValueError(
        f"class_counts must have shape (K,), got shape {jnp.shape(counts)}.")
  if num_classes is not None and counts.shape[0] != num_classes:
    raise ValueError(
        f"class_counts has {counts.shape[0]} entries but logits have "
        f"K = {num_classes} classes; they must match.")
  if _is_concrete(class_counts) and _is_concrete(counts):
    values = np.asarray(counts)
    if np.any(values < 0) or not np.all(np.isfinite(values)):
      raise ValueError(
          f"class_counts must be finite and non-negative, got {values}.")
    if not allow_zero and np.any(values == 0):
      raise ValueError(
          "class_counts must be positive here: a class with no training "
          "examples has log-prior -inf (or an infinite LDAM margin). Got "
          f"zero count(s) for class(es) {np.flatnonzero(values == 0)}.")
  return counts.astype(jnp.float32)


def _log_prior(counts: jax.Array) -> jax.Array:
  # log(pi_j) = log(n_j) - log(sum n), in float32 like the logits' loss.
  return jnp.log(counts) - jnp.log(jnp.sum(counts))


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
  _check_float("logits", logits)
  _check_rank("logits", logits, 2, "(B, K)")
  _check_labels(labels, logits.shape[0])


def _check_tau(tau) -> None:
  if _is_concrete(tau) and float(tau) < 0:
    raise ValueError(f"tau must be non-negative, got {tau}.")


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
  _check_float("features", features)
  _check_float("targets", targets)
  _check_rank("features", features, 2, "(B, d)")
  if jnp.shape(targets) != jnp.shape(features):
    raise ValueError(
        f"targets must have the shape of features {jnp.shape(features)}, got "
        f"{jnp.shape(targets)}. Gather one target vector per example, e.g. "
        "etf_targets(etf, labels).")
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
  _check_int("labels", labels)
  _check_rank("labels", labels, 1, "(B,)")
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
  _check_float("etf", etf)
  _check_rank("etf", etf, 2, "(d, K)")
  _check_int("labels", labels)
  _check_rank("labels", labels, 1, "(B,)")
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
  _check_float("logits", logits)
  _check_rank("logits", logits, 2, "(B, K)")
  _check_labels(labels, logits.shape[0])
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
  _check_float("loss_a", loss_a)
  _check_float("loss_b", loss_b)
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
  _check_float("features", features)
  _check_float("targets", targets)
  _check_rank("features", features, 2, "(B, d)")
  if jnp.shape(targets) != jnp.shape(features):
    raise ValueError(
        f"targets must have the shape of features {jnp.shape(features)}, got "
        f"{jnp.shape(targets)}.")
  return -jnp.sum(features * targets, axis=-1)


def logit_adjusted_cross_entropy(logits: jax.Array,
                                 labels: jax.Array,
                                 *,
                                 class_counts,
                                 tau: float = 1.0) -> jax.Array:
  """Logit-adjusted cross entropy `CE(z + tau * log(pi), y)`, per example.

  `pi_j = n_j / sum(n)` is the training label prior. Adding its log during
  training makes the plain argmax of `z` approximate the balanced-error
  classifier, so no adjustment is needed at test time.

  Args:
    logits: `(B, K)` float logits `z`.
    labels: `(B,)` integer class indices.
    class_counts: `(K,)` training counts `n_j` (sequence, numpy or jax
      array); all must be positive (checked when concrete).
    tau: non-negative temperature of the adjustment; 0 gives plain CE.

  Returns:
    `(B,)` float32 loss values, unreduced.

  Raises:
    ValueError: for mismatched shapes, `class_counts` not of length K,
      negative or zero counts, or `tau < 0`.
    TypeError: for non-float logits or non-integer labels.

  References:
    Menon et al., ICLR 2021, Eq. (10) (the logit-adjusted loss).
  """
  _check_logits_labels(logits, labels)
  counts = _class_counts(class_counts, logits.shape[1], allow_zero=False)
  _check_tau(tau)
  adjusted = logits.astype(jnp.float32) + tau * _log_prior(counts)
  return optax.softmax_cross_entropy_with_integer_labels(adjusted, labels)


def posthoc_logit_adjust(logits: jax.Array,
                         *,
                         class_counts,
                         tau: float = 1.0) -> jax.Array:
  """Post-hoc logit adjustment `z - tau * log(pi)`, for evaluation.

  For a model trained with plain CE, whose logits absorb the training prior:
  predict the argmax of the returned logits to target the balanced error.

  Args:
    logits: `(B, K)` float logits `z`.
    class_counts: `(K,)` positive training counts `n_j`.
    tau: non-negative strength of the adjustment.

  Returns:
    `(B, K)` float32 adjusted logits.

  Raises:
    ValueError: for logits not `(B, K)`, `class_counts` not of length K,
      negative or zero counts, or `tau < 0`.
    TypeError: for non-float logits.

  References:
    Menon et al., ICLR 2021, Eq. (9).
  """
  _check_float("logits", logits)
  _check_rank("logits", logits, 2, "(B, K)")
  counts = _class_counts(class_counts, logits.shape[1], allow_zero=False)
  _check_tau(tau)
  return logits.astype(jnp.float32) - tau * _log_prior(counts)


def balanced_softmax_cross_entropy(logits: jax.Array,
                                   labels: jax.Array,
                                   *,
                                   class_counts) -> jax.Array:
  """Balanced softmax cross entropy `CE(z + log(n), y)`, per example.

  Adding `log(n)` rather than `log(pi)` differs by the constant `log(sum n)`,
  which cancels in the softmax: this equals
  `logit_adjusted_cross_entropy(..., tau=1)`.

  Args:
    logits: `(B, K)` float logits `z`.
    labels: `(B,)` integer class indices.
    class_counts: `(K,)` positive training counts `n_j`.

  Returns:
    `(B,)` float32 loss values, unreduced.

  Raises:
    ValueError: for mismatched shapes, `class_counts` not of length K, or
      negative or zero counts.
    TypeError: for non-float logits or non-integer labels.

  References:
    Ren et al., NeurIPS 2020 (Balanced Softmax, Eq. (4)).
  """
  _check_logits_labels(logits, labels)
  counts = _class_counts(class_counts, logits.shape[1], allow_zero=False)
  adjusted = logits.astype(jnp.float32) + jnp.log(counts)
  return optax.softmax_cross_entropy_with_integer_labels(adjusted, labels)


def ldam_margins(class_counts, *, max_margin: float = 0.5) -> jax.Array:
  """LDAM per-class margins `m_j = C / n_j^(1/4)`, largest equal `max_margin`.

  Rarer classes get larger margins; `C` is fixed by the largest margin (the
  rarest class's) being `max_margin`, as the authors' code does.

  Args:
    class_counts: `(K,)` positive training counts `n_j`.
    max_margin: the rarest class's margin, non-negative (0.5 in the paper).

  Returns:
    `(K,)` float32 margins.

  Raises:
    ValueError: for counts not of shape `(K,)`, negative or zero counts, or
      `max_margin < 0`.

  References:
    Cao et al., NeurIPS 2019, Eq. (13), and the authors' `LDAMLoss`.
  """
  counts = _class_counts(class_counts, None, allow_zero=False)
  if _is_concrete(max_margin) and float(max_margin) < 0:
    raise ValueError(f"max_margin must be non-negative, got {max_margin}.")
  inv = counts ** -0.25
  return inv * (max_margin / jnp.max(inv))


def ldam_loss(logits: jax.Array,
              labels: jax.Array,
              *,
              class_counts,
              max_margin: float = 0.5,
              scale: float = 30.0) -> jax.Array:
  """LDAM loss `CE(scale * (z - m_y e_y), y)`, per example, unweighted.

  Only the true class's logit is lowered by its margin `m_y` (see
  `ldam_margins`) before scaling. `logits` must be cosine logits: the
  caller computes them from L2-normalised features against L2-normalised
  class weights, so they lie in [-1, 1] and `scale` sets the softmax
  temperature (the margins are meaningless for unnormalised logits). DRW's
  class weights enter through `class_weighted_mean`, not here.

  Args:
    logits: `(B, K)` float cosine logits `z`.
    labels: `(B,)` integer class indices.
    class_counts: `(K,)` positive training counts `n_j`.
    max_margin: the rarest class's margin (0.5 in the paper).
    scale: positive logit scale `s` (30 in the authors' code).

  Returns:
    `(B,)` float32 loss values, unreduced.

  Raises:
    ValueError: for mismatched shapes, `class_counts` not of length K,
      negative or zero counts, `max_margin < 0` or `scale <= 0`.
    TypeError: for non-float logits or non-integer labels.

  References:
    Cao et al., NeurIPS 2019, and the authors' `LDAMLoss`.
  """
  _check_logits_labels(logits, labels)
  _class_counts(class_counts, logits.shape[1], allow_zero=False)
  if _is_concrete(scale) and float(scale) <= 0:
    raise ValueError(f"scale must be positive, got {scale}.")
  margins = ldam_margins(class_counts, max_margin=max_margin)
  onehot = jax.nn.one_hot(labels, logits.shape[1], dtype=jnp.float32)
  batch_margins = jnp.take(margins, labels)[:, None]
  shifted = logits.astype(jnp.float32) - onehot * batch_margins
  return optax.softmax_cross_entropy_with_integer_labels(
      scale * shifted, labels)


def class_balanced_weights(class_counts, *, beta: float = 0.9999) -> jax.Array:
  """Effective-number class weights `(1 - beta) / (1 - beta^n_j)`, sum K.

  A class with zero training examples gets weight 0 (its formula is 0/0):
  it never occurs as a label, so its weight never enters a loss, and the
  weights of the present classes sum to K.

  Args:
    class_counts: `(K,)` non-negative training counts `n_j`, not all zero.
    beta: in (0, 1); 0.9999 in the DRW recipe. As beta -> 0 the weights
      become uniform, as beta -> 1 inverse-frequency.

  Returns:
    `(K,)` float32 weights summing to K.

  Raises:
    ValueError: for counts not of shape `(K,)`, negative or all-zero
      counts, or beta outside (0, 1).

  References:
    Cui et al., CVPR 2019, Eq. (5); used by DRW (Cao et al., NeurIPS 2019).
  """
  counts = _class_counts(class_counts, None, allow_zero=True)
  if _is_concrete(beta) and not 0.0 < float(beta) < 1.0:
    raise ValueError(f"beta must lie in (0, 1), got {beta}.")
  if _is_concrete(counts) and not np.any(np.asarray(counts) > 0):
    raise ValueError("class_counts are all zero; no class has examples.")
  present = counts > 0
  # 1 - beta^n cancels catastrophically in float32 for beta near 1 (beta =
  # 0.9999 itself rounds with a relative error of 5e-4 in 1 - beta), so take
  # log(beta) in float64 when it is concrete and use expm1.
  log_beta = (np.log(float(beta)) if _is_concrete(beta) else jnp.log(beta))
  effective = -jnp.expm1(counts * jnp.asarray(log_beta, jnp.float32))
  raw = jnp.where(present, (1.0 - beta) / jnp.where(present, effective, 1.0),
                  0.0)
  return raw * (counts.shape[0] / jnp.sum(raw))


def class_weighted_mean(per_example: jax.Array,
                        labels: jax.Array,
                        class_weights: jax.Array,
                        *,
                        mask: jax.Array | None = None) -> jax.Array:
  """Batch mean weighted by each example's class weight, PyTorch's way.

  `sum_i w_{y_i} l_i / sum_i w_{y_i}` over the rows kept by `mask`, the
  reduction of `torch.nn.functional.cross_entropy(..., weight=w)`; DRW uses
  it with `class_balanced_weights` for the batch loss. Dividing by the
  summed weights (not B) keeps the loss scale independent of the batch's
  class mix. Uniform weights give the plain (masked) mean.

  Args:
    per_example: `(B,)` float per-example losses `l_i`.
    labels: `(B,)` integer class indices `y_i`.
    class_weights: `(K,)` float non-negative class weights `w`.
    mask: optional `(B,)` bool, False for padding rows.

  Returns:
    Scalar float32; 0 when no kept row has positive weight.

  Raises:
    ValueError: for `per_example` or `labels` not `(B,)` or of different
      lengths, or `class_weights` not `(K,)`, or `mask` not `(B,)`.
    TypeError: for non-float losses or weights, or non-integer labels.
  """
  _check_float("per_example", per_example)
  _check_rank("per_example", per_example, 1, "(B,)")
  _check_labels(labels, per_example.shape[0])
  _check_float("class_weights", class_weights)
  _check_rank("class_weights", class_weights, 1, "(K,)")
  w = jnp.take(class_weights, labels).astype(jnp.float32)
  if mask is not None:
    if jnp.shape(mask) != jnp.shape(labels):
      raise ValueError(
          f"mask must have shape {jnp.shape(labels)}, got {jnp.shape(mask)}.")
    w = w * mask.astype(jnp.float32)
  total = jnp.sum(w)
  # Guard an empty (all padding) batch: 0 instead of 0/0 keeps grads finite.
  return jnp.where(total > 0,
                   jnp.sum(w * per_example.astype(jnp.float32)) /
                   jnp.where(total > 0, total, 1.0), 0.0)
