"""Classification metrics for long-tailed evaluation, streamed over batches.

The compiled eval step reduces each batch to a few small count arrays
(`batch_counts`): per-class example and correct counts for top-1 and top-5,
and per-confidence-bin sums for the expected calibration error. The host
adds them up (`EvalAccumulator`) and `summarize` turns the totals into
top-1, top-5, per-class, head/medium/tail accuracy and ECE. Counts add
exactly, so the result does not depend on batch size, padding or device
count.

References:
  Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks.
  ICML 2017 (ECE with equal-width confidence bins; 15 bins).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ECE_BINS = 15


def batch_counts(logits: jax.Array,
                 labels: jax.Array,
                 mask: jax.Array | None = None,
                 *,
                 num_classes: int,
                 num_bins: int = ECE_BINS,
                 per_example_loss: jax.Array | None = None
                 ) -> dict[str, jax.Array]:
  """Reduces one batch to additive counts (jit-friendly).

  Args:
    logits: `(B, K)` float logits.
    labels: `(B,)` integer labels.
    mask: optional `(B,)` bool, False for padding rows.
    num_classes: K (static).
    num_bins: number of equal-width confidence bins for the ECE (static).
    per_example_loss: optional `(B,)` loss summed into `loss_sum` instead of
      the cross entropy of `logits` (a method's own eval loss).

  Returns:
    dict of float32 arrays: `count`, `correct1`, `correct5` of shape `(K,)`
    (per true class), `bin_count`, `bin_conf`, `bin_correct` of shape
    `(num_bins,)`, and the scalar `loss_sum` of the cross entropy.
  """
  logits = logits.astype(jnp.float32)
  if mask is None:
    mask = jnp.ones(labels.shape, bool)
  w = mask.astype(jnp.float32)
  pred = jnp.argmax(logits, axis=-1)
  correct1 = (pred == labels).astype(jnp.float32)
  k5 = min(5, num_classes)
  _, top5 = jax.lax.top_k(logits, k5)
  correct5 = jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  conf = jnp.max(probs, axis=-1)
  # Bin i holds confidences in (i/n, (i+1)/n]; conf > 0 always (softmax).
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0,
                  num_bins - 1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  if per_example_loss is not None:
    nll = per_example_loss.astype(jnp.float32)

  def per(idx, values, n):
    return jnp.zeros((n,), jnp.float32).at[idx].add(values * w)

  return {
      "count": per(labels, jnp.ones_like(w), num_classes),
      "correct1": per(labels, correct1, num_classes),
      "correct5": per(labels, correct5, num_classes),
      "bin_count": per(bins, jnp.ones_like(w), num_bins),
      "bin_conf": per(bins, conf, num_bins),
      "bin_correct": per(bins, correct1, num_bins),
      "loss_sum": jnp.sum(nll * w),
  }


@dataclasses.dataclass
class EvalAccumulator:
  """Host-side running totals of `batch_counts` (float64)."""
  totals: dict[str, np.ndarray] | None = None

  def add(self, counts: Mapping[str, jax.Array]) -> None:
    host = {k: np.asarray(jax.device_get(v), np.float64)
            for k, v in counts.items()}
    if self.totals is None:
      self.totals = host
    else:
      for k, v in host.items():
        self.totals[k] = self.totals[k] + v


def summarize(totals: Mapping[str, np.ndarray],
              class_groups: Mapping[str, Sequence[int]] | None = None
              ) -> dict[str, object]:
  """Turns summed counts into the reported metrics.

  Args:
    totals: summed `batch_counts` outputs.
    class_groups: e.g. {"head": (0, 1, 2), "medium": ..., "tail": ...}; each
      group's accuracy is the mean of its classes' accuracies (the reference's
      many/medium/few-shot convention). Absent groups are omitted.

  Returns:
    dict with `top1`, `top5`, `ece`, `loss`, `num_examples` (floats, accuracies
    in percent), `per_class` (list of percent accuracies, NaN-free: classes
    with no test example get null) and one key per class group.
  """
  count = totals["count"]
  n = float(count.sum())
  if n == 0:
    raise ValueError("No evaluation examples were counted.")
  out: dict[str, object] = {
      "top1": 100.0 * float(totals["correct1"].sum()) / n,
      "top5": 100.0 * float(totals["correct5"].sum()) / n,
      "loss": float(totals["loss_sum"]) / n,
      "num_examples": int(round(n)),
  }
  gaps = np.abs(totals["bin_conf"] - totals["bin_correct"])
  out["ece"] = 100.0 * float(gaps.sum()) / n
  per_class = np.where(count > 0, totals["correct1"] / np.maximum(count, 1),
                       np.nan) * 100.0
  out["per_class"] = [None if np.isnan(a) else float(a) for a in per_class]
  for name, classes in (class_groups or {}).items():
    accs = [per_class[c] for c in classes if count[c] > 0]
    out[name] = float(np.mean(accs)) if accs else None
  return out
