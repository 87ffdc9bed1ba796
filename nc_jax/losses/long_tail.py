"""Long-tail baseline losses: logit adjustment, balanced softmax, LDAM, DRW.

References (docs/method.md, Long-tail baselines):
  Menon et al., Long-tail learning via logit adjustment, ICLR 2021.
  Ren et al., Balanced Meta-Softmax, NeurIPS 2020.
  Cao et al., Learning Imbalanced Datasets with Label-Distribution-Aware
  Margin Loss (LDAM, DRW), NeurIPS 2019.
  Cui et al., Class-Balanced Loss Based on Effective Number of Samples,
  CVPR 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nc_jax.losses.checks import (check_float, check_labels,
                                  check_logits_labels, check_rank, check_tau,
                                  class_counts_array, is_concrete, log_prior)


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
  check_logits_labels(logits, labels)
  counts = class_counts_array(class_counts, logits.shape[1], allow_zero=False)
  check_tau(tau)
  adjusted = logits.astype(jnp.float32) + tau * log_prior(counts)
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
  check_float("logits", logits)
  check_rank("logits", logits, 2, "(B, K)")
  counts = class_counts_array(class_counts, logits.shape[1], allow_zero=False)
  check_tau(tau)
  return logits.astype(jnp.float32) - tau * log_prior(counts)


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
  check_logits_labels(logits, labels)
  counts = class_counts_array(class_counts, logits.shape[1], allow_zero=False)
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
  counts = class_counts_array(class_counts, None, allow_zero=False)
  if is_concrete(max_margin) and float(max_margin) < 0:
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
  check_logits_labels(logits, labels)
  class_counts_array(class_counts, logits.shape[1], allow_zero=False)
  if is_concrete(scale) and float(scale) <= 0:
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
  counts = class_counts_array(class_counts, None, allow_zero=True)
  if is_concrete(beta) and not 0.0 < float(beta) < 1.0:
    raise ValueError(f"beta must lie in (0, 1), got {beta}.")
  if is_concrete(counts) and not np.any(np.asarray(counts) > 0):
    raise ValueError("class_counts are all zero; no class has examples.")
  present = counts > 0
  # 1 - beta^n cancels catastrophically in float32 for beta near 1 (beta =
  # 0.9999 itself rounds with a relative error of 5e-4 in 1 - beta), so take
  # log(beta) in float64 when it is concrete and use expm1.
  log_beta = (np.log(float(beta)) if is_concrete(beta) else jnp.log(beta))
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
  check_float("per_example", per_example)
  check_rank("per_example", per_example, 1, "(B,)")
  check_labels(labels, per_example.shape[0])
  check_float("class_weights", class_weights)
  check_rank("class_weights", class_weights, 1, "(K,)")
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
