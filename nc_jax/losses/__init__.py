"""Losses for classifiers with a fixed simplex-ETF head, written like optax's.

Every loss returns per-example values of shape `(B,)` and never reduces: the
caller averages (the reference code takes the batch mean). Options are
keyword-only. Mismatched shapes raise `ValueError` and non-float features or
non-integer labels raise `TypeError`, at trace time, so mistakes surface
before any compilation.

References (in full in each module):
  Yang et al., NeurIPS 2022 (the DR loss, Eq. 6); Zhang et al., ICLR 2018
  (mixup).
  Long-tail baselines: Menon et al., ICLR 2021; Ren et al., NeurIPS 2020;
  Cao et al., NeurIPS 2019; Cui et al., CVPR 2019 (docs/method.md).

Modules: `etf_losses` (the DR loss, its targets, CE, mixup), `long_tail`
(the baselines' losses and DRW weighting), `checks` (shared argument
checks). Import the losses from here: `from nc_jax import losses`.
"""

from nc_jax.losses.etf_losses import NORM_EPS
from nc_jax.losses.etf_losses import batch_class_lengths
from nc_jax.losses.etf_losses import cross_entropy
from nc_jax.losses.etf_losses import dot_loss
from nc_jax.losses.etf_losses import dot_regression_loss
from nc_jax.losses.etf_losses import etf_targets
from nc_jax.losses.etf_losses import mixup_loss
from nc_jax.losses.long_tail import balanced_softmax_cross_entropy
from nc_jax.losses.long_tail import class_balanced_weights
from nc_jax.losses.long_tail import class_weighted_mean
from nc_jax.losses.long_tail import ldam_loss
from nc_jax.losses.long_tail import ldam_margins
from nc_jax.losses.long_tail import logit_adjusted_cross_entropy
from nc_jax.losses.long_tail import posthoc_logit_adjust

__all__ = [
    "NORM_EPS",
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
]
