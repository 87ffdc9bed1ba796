"""Eval metrics against direct numpy computations."""

import jax
import numpy as np
import pytest

from nc_jax import metrics


def _np_reference(logits, labels, groups, bins=15):
  pred = logits.argmax(-1)
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  conf = p.max(-1)
  correct = pred == labels
  ece = 0.0
  edges = np.linspace(0, 1, bins + 1)
  for lo, hi in zip(edges[:-1], edges[1:]):
    sel = (conf > lo) & (conf <= hi)
    if sel.any():
      ece += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
  per_class = [100 * correct[labels == c].mean() for c in range(logits.shape[1])]
  out = {
      "top1": 100 * correct.mean(),
      "top5": 100 * np.mean([l in t for l, t in zip(labels, top5)]),
      "ece": 100 * ece,
      "loss": float(np.mean(-np.log(p[np.arange(len(labels)), labels]))),
      "per_class": per_class,
  }
  for g, cls in groups.items():
    out[g] = np.mean([per_class[c] for c in cls])
  return out


@pytest.mark.parametrize("batch", [7, 50, 128])
def test_streamed_metrics_match_numpy(batch):
  rng = np.random.default_rng(0)
  n, k = 301, 10
  logits = (3 * rng.standard_normal((n, k))).astype(np.float32)
  labels = rng.integers(0, k, n).astype(np.int32)
  groups = {"head": (0, 1, 2), "medium": (3, 4, 5, 6), "tail": (7, 8, 9)}
  acc = metrics.EvalAccumulator()
  fn = jax.jit(lambda l, y, m: metrics.batch_counts(l, y, m, num_classes=k))
  for s in range(0, n, batch):
    lb, yb = logits[s:s + batch], labels[s:s + batch]
    pad = batch - len(yb)
    mask = np.r_[np.ones(len(yb), bool), np.zeros(pad, bool)]
    lb = np.pad(lb, ((0, pad), (0, 0)))
    yb = np.pad(yb, (0, pad))
    acc.add(fn(lb, yb, mask))
  got = metrics.summarize(acc.totals, groups)
  want = _np_reference(logits.astype(np.float64), labels, groups)
  assert got["num_examples"] == n
  for key in ("top1", "top5", "ece", "loss", "head", "medium", "tail"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4,
                               err_msg=key)
  np.testing.assert_allclose(got["per_class"], want["per_class"], atol=1e-6)


def test_perfect_and_absent_classes():
  logits = np.eye(3, dtype=np.float32)[[0, 1, 1]] * 50
  labels = np.array([0, 1, 1], np.int32)
  got = metrics.summarize(
      {k: np.asarray(v, np.float64)
       for k, v in metrics.batch_counts(logits, labels, num_classes=3).items()},
      {"head": (0,), "tail": (2,)})
  assert got["top1"] == 100.0 and got["top5"] == 100.0
  assert got["per_class"][2] is None and got["tail"] is None
  assert got["ece"] < 1e-3


def test_no_examples_raises():
  totals = {k: np.zeros(3) for k in ("count", "correct1", "correct5")}
  with pytest.raises(ValueError, match="No evaluation examples"):
    metrics.summarize(totals)


def test_seeds_aggregate_metrics_but_not_positions():
  """The mean over seeds of each seed's best: top-1 and per-class are
  averaged, the epoch is kept only when the seeds agree (a mean of 16 and
  12 is no epoch the run evaluated)."""
  from nc_jax import evaluators
  best = [{"top1": 27.0, "per_class": [10.0, None], "epoch": 16.0},
          {"top1": 29.0, "per_class": [20.0, None], "epoch": 12.0}]
  mean, std = evaluators.aggregate(best)
  assert mean == {"top1": 28.0, "per_class": [15.0, None], "epoch": None}
  assert std["top1"] == 1.0 and "epoch" not in std
  final = [dict(b, epoch=20.0) for b in best]
  assert evaluators.aggregate(final)[0]["epoch"] == 20.0
