"""nc_jax: fixed simplex-ETF classifiers and the dot-regression loss in JAX.

Reimplements Yang et al., "Inducing Neural Collapse in Imbalanced Learning"
(NeurIPS 2022). The library layers are documented in docs/architecture.md.

The public core, for your own models (`from nc_jax import ...`):

  simplex_etf, replica_etfs   the fixed classifier `M`, `(d, K)` (`etf`)
  ETFHead                     the Flax Linen head: BatchNorm, L2
                              normalisation, `h @ M` with `M` given at call
                              time (`nc_jax.models.heads`); its NNX twin,
                              which holds `M` itself, is `nc_jax.nnx.ETFHead`
  dot_regression_loss, ...    the losses, per example (`losses`)
  etf, losses, nc_metrics     the modules; `nc_metrics.compute` gives the
                              neural-collapse statistics

They need only jax, flax, optax, chex and numpy. They load on first use:
`import nc_jax` itself imports nothing, so the entry points can import
`nc_jax.kernels.xla_setup` and tune malloc and XLA's flags before jax
loads (and starts threads), as that module requires.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "simplex_etf": "nc_jax.etf",
    "replica_etfs": "nc_jax.etf",
    "ETFHead": "nc_jax.models.heads",
    **{name: "nc_jax.losses" for name in (
        "balanced_softmax_cross_entropy",
        "batch_class_lengths",
        "class_balanced_weights",
        "class_weighted_mean",
        "cross_entropy",
        "dot_loss",
        "dot_regression_loss",
        "etf_targets",
        "ldam_loss",
        "ldam_margins",
        "logit_adjusted_cross_entropy",
        "mixup_loss",
        "posthoc_logit_adjust",
    )},
}
_SUBMODULES = ("etf", "losses", "nc_metrics")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])

if TYPE_CHECKING:  # what the lazy __getattr__ below provides
  from nc_jax import etf, losses, nc_metrics
  from nc_jax.etf import replica_etfs, simplex_etf
  from nc_jax.losses import (balanced_softmax_cross_entropy,
                             batch_class_lengths, class_balanced_weights,
                             class_weighted_mean, cross_entropy, dot_loss,
                             dot_regression_loss, etf_targets, ldam_loss,
                             ldam_margins, logit_adjusted_cross_entropy,
                             mixup_loss, posthoc_logit_adjust)
  from nc_jax.models.heads import ETFHead


def __getattr__(name: str) -> Any:
  """Loads a public name on first access (PEP 562)."""
  if name in _SUBMODULES:
    return importlib.import_module(f"nc_jax.{name}")
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
  raise AttributeError(f"module 'nc_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
