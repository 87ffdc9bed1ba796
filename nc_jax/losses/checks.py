"""Argument checks shared by the losses, run at trace time.

Shapes and dtypes are static under `jax.jit`, so every check here raises
before compilation; value checks (signs, zeros) run only on concrete inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

def check_float(name: str, x: jax.Array) -> None:
  """TypeError unless `x` has a floating dtype."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}"
        ". Cast it, e.g. x.astype(jnp.float32).")


def check_int(name: str, x: jax.Array) -> None:
  """TypeError unless `x` has an integer dtype."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise TypeError(
        f"{name} must hold integer class indices, got dtype "
        f"{jnp.result_type(x)}.")


def check_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
  """ValueError unless `x` has `rank` axes, laid out as `layout` ("(B, d)")."""
  if jnp.ndim(x) != rank:
    raise ValueError(
        f"{name} must have shape {layout}, got shape {jnp.shape(x)}.")


def check_features_targets(features: jax.Array, targets: jax.Array) -> None:
  """Float `(B, d)` features and float targets of the same shape."""
  check_float("features", features)
  check_float("targets", targets)
  check_rank("features", features, 2, "(B, d)")
  if jnp.shape(targets) != jnp.shape(features):
    raise ValueError(
        f"targets must have the shape of features {jnp.shape(features)}, got "
        f"{jnp.shape(targets)}. Gather one target vector per example, e.g. "
        "etf_targets(etf, labels).")


def check_labels(labels: jax.Array, batch: int, name: str = "labels") -> None:
  """`labels` must be integer `(batch,)`."""
  check_int(name, labels)
  check_rank(name, labels, 1, "(B,)")
  if labels.shape[0] != batch:
    raise ValueError(
        f"{name} has {labels.shape[0]} entries but the batch has {batch} "
        "rows; they must match.")


def is_concrete(x) -> bool:
  """False for a tracer (a value known only at run time)."""
  # Value checks need numbers; under jit the counts or options may be traced,
  # and then only their shapes can be checked.
  return not isinstance(x, jax.core.Tracer)


def class_counts_array(class_counts, num_classes: int | None, *,
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
  if is_concrete(class_counts) and is_concrete(counts):
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


def log_prior(counts: jax.Array) -> jax.Array:
  """`(K,)` log label prior `log(n_j / sum(n))`."""
  # log(pi_j) = log(n_j) - log(sum n), in float32 like the logits' loss.
  return jnp.log(counts) - jnp.log(jnp.sum(counts))


def check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
  """Float `(B, K)` logits and integer `(B,)` labels."""
  check_float("logits", logits)
  check_rank("logits", logits, 2, "(B, K)")
  check_labels(labels, logits.shape[0])


def check_tau(tau) -> None:
  """ValueError for a concrete negative temperature."""
  if is_concrete(tau) and float(tau) < 0:
    raise ValueError(f"tau must be non-negative, got {tau}.")
