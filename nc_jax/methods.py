"""Training methods: a classifier head plus a loss, in one explicit registry.

A `Method` names a head of `nc_jax.models.HEADS` and a loss function. The
train step (`nc_jax.steps`) runs the model, packs everything a loss may need
into one `LossContext` and calls `method.loss(ctx)`, which returns the scalar
batch loss. Mixup stays generic: for methods with `combine_mixup=True` (all
built-in ones) the step evaluates the loss once against the batch's labels
and once against the mixup partners' labels and returns
`lam * L(y_a) + (1 - lam) * L(y_b)`, as the reference code does for every
method. A loss with its own idea of mixup sets `combine_mixup=False` and
reads `ctx.partner_labels` and `ctx.lam` itself.

| method    | head   | loss                                                   |
|-----------|--------|--------------------------------------------------------|
| etf_dr    | etf    | dot regression, per-batch class lengths (the paper)    |
| etf_ce    | etf    | softmax CE on `h @ M`                                  |
| etf_dot   | etf    | the reference's plain dot loss `-<h, t>`               |
| ce        | linear | softmax CE (learnable classifier)                      |
| ce_frozen | linear | softmax CE, frozen random classifier (reference CIFAR) |
| la        | linear | logit-adjusted CE `CE(z + tau log pi)`                 |
| bs        | linear | balanced softmax `CE(z + log n)`                       |
| ldam_drw  | cosine | LDAM (s = 30) with deferred class-balanced re-weighting|

LDAM is offered on its own cosine head only: its margins are subtracted
from cosines between normalised features and *learnt* normalised class
vectors; on the fixed ETF head the logits are not cosines unless the
features are normalised, and the loss would fight the fixed geometry the
ETF methods are about, so no such method is registered.

Adding a method is one loss function and one registry entry (see
docs/architecture.md, "Adding a loss"):

    def my_loss(ctx: LossContext) -> jax.Array:
      return jnp.mean(losses.cross_entropy(ctx.logits, ctx.labels))

    register_method("my_ce", Method(head="linear", loss=my_loss))

Hyper-parameters come from the config's `loss` block as `ctx.options`
(a read-only mapping of every `config.loss` field), so a loss with a new
one also adds `c.loss.NAME = default` to the config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from nc_jax import losses
from nc_jax import models


class LossOptions(Mapping[str, Any]):
  """A read-only, hashable mapping of loss hyper-parameters.

  The builder fills it with every field of the config's `loss` block; it is
  static (a compile-time constant of the step), never traced.
  """

  def __init__(self, values: Mapping[str, Any] | None = None):
    self._values = dict(values or {})

  def __getitem__(self, key: str) -> Any:
    try:
      return self._values[key]
    except KeyError:
      raise KeyError(
          f"No loss option {key!r}; the options are the fields of the "
          f"config's loss block: {sorted(self._values)}. Add "
          f"c.loss.{key} = ... to the config.") from None

  def __iter__(self) -> Iterator[str]:
    return iter(self._values)

  def __len__(self) -> int:
    return len(self._values)

  def __hash__(self) -> int:
    return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Mapping) and dict(self) == dict(other)

  def __repr__(self) -> str:
    return f"LossOptions({self._values!r})"


@struct.dataclass
class LossContext:
  """Everything a loss may look at, for one forward pass of one replica.

  Attributes:
    logits: `(B, K)` float32 logits of the head (ETF: `h @ M`; cosine head:
      cosines in [-1, 1]; linear: `h @ W + b`).
    features: `(B, d)` float32 features as they enter the classifier.
    labels: `(B,)` int32 labels this loss term is against: the batch's own,
      or (second mixup term) the partners'.
    classifier: `(d, K)` float32: the fixed ETF for etf heads, the learnt
      weights otherwise (differentiable; unit columns for the cosine head).
    class_counts: `(K,)` float32 per-class counts of the training subset.
    lengths: `(K,)` float32 per-batch class lengths of the reference's
      "GivenEw" scheme (`losses.batch_class_lengths`), from the unmixed
      batch labels.
    step: int32 scalar, the global step being taken (0-based).
    epoch: int32 scalar, `step // steps_per_epoch` (0-based).
    batch_labels: `(B,)` the batch's own (unmixed) labels.
    partner_labels: `(B,)` labels of each row's mixup partner (equal to
      `batch_labels` without mixup).
    lam: float32 scalar mixup weight of `batch_labels` (1 without mixup).
    options: the loss hyper-parameters (`LossOptions`), static.
  """
  logits: jax.Array
  features: jax.Array
  labels: jax.Array
  classifier: jax.Array
  class_counts: jax.Array
  lengths: jax.Array
  step: jax.Array
  epoch: jax.Array
  batch_labels: jax.Array
  partner_labels: jax.Array
  lam: jax.Array
  options: LossOptions = struct.field(pytree_node=False,
                                      default_factory=LossOptions)


LossFn = Callable[[LossContext], jax.Array]
# check(config) raises ValueError naming the fix.
CheckFn = Callable[[Any], None]


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: which head, which loss, and how they combine.

  Attributes:
    head: a key of `nc_jax.models.HEADS` ("etf", "linear", "cosine").
    loss: `loss(ctx: LossContext) -> ()` float32, the batch loss.
    head_options: extra head options (e.g. `freeze_classifier=True`).
    combine_mixup: the step forms `lam * L(y_a) + (1 - lam) * L(y_b)` (two
      calls of `loss`); if False it calls `loss` once and the loss handles
      mixup itself from `ctx.partner_labels` and `ctx.lam`.
    eval_logit_scale: name of a loss option that multiplies the logits at
      evaluation (cosine heads: the loss's scale, so that ECE and the eval
      cross entropy see the logits the loss trained); None for 1.
    check: optional `check(config)` of the method's own options, run by
      config validation before any work; raises ValueError naming the fix.
      (What must fit the run's length, `epoch_options`, is checked there
      too, once the length is known.)
    summary: one line for tables and messages.
    calibrated: whether the softmax of the eval logits is the probability
      the method trained for. False for the fixed-ETF heads, whose logits
      are cosines in [-1, 1]: their softmax cannot approach 1, so an ECE of
      it measures the head's range, not calibration, and is not reported.
    eval_loss: optional per-example loss reported at evaluation,
      `eval_loss(ctx) -> (B,)` with the test labels, no mixup and unit
      class lengths; None for the cross entropy of the eval logits.
    epoch_options: loss options that are epochs of the schedule (LDAM-DRW's
      `drw_epoch`): a run shorter than its recipe scales them with the
      learning-rate schedule (`nc_jax.schedule_fit.fit_schedule`).
  """
  head: str
  loss: LossFn
  head_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  combine_mixup: bool = True
  eval_logit_scale: str | None = None
  check: CheckFn | None = None
  summary: str = ""
  calibrated: bool = True
  eval_loss: Callable[[LossContext], jax.Array] | None = None
  epoch_options: tuple[str, ...] = ()

  @property
  def fixed_classifier(self) -> bool:
    """Whether the head's classifier is the fixed ETF given at call time."""
    return self.head in models.FIXED_CLASSIFIER_HEADS


# ------------------------------------------------------------------ losses


def _dr_targets(ctx: LossContext) -> jax.Array:
  """`(B, d)` ETF targets of `ctx.labels`, scaled by the batch lengths when
  `given_ew` (the reference default)."""
  lengths = ctx.lengths if ctx.options["given_ew"] else None
  return losses.etf_targets(ctx.classifier, ctx.labels, lengths=lengths)


def dot_regression(ctx: LossContext) -> jax.Array:
  """Dot regression (reference or paper form, `loss.dr_form`), batch mean."""
  o = ctx.options
  if o["dr_form"] == "paper":
    targets = math.sqrt(o["e_w"]) * losses.etf_targets(ctx.classifier,
                                                       ctx.labels)
    per = losses.dot_regression_loss(ctx.features, targets, e_w=o["e_w"],
                                     e_h=o["e_h"], reg_lam=o["reg_lam"])
  else:
    per = losses.dot_regression_loss(ctx.features, _dr_targets(ctx),
                                     reg_lam=o["reg_lam"])
  return jnp.mean(per)


def plain_dot(ctx: LossContext) -> jax.Array:
  """The reference's `dot_loss` criterion, `-<h, t>`, batch mean.

  Same targets as DR (per-batch lengths when `given_ew`); like the
  reference, no `reg_lam` term.
  """
  return jnp.mean(losses.dot_loss(ctx.features, _dr_targets(ctx)))


def ce_loss(ctx: LossContext) -> jax.Array:
  """Softmax cross entropy on the head's logits, batch mean."""
  return jnp.mean(losses.cross_entropy(ctx.logits, ctx.labels))


def logit_adjusted(ctx: LossContext) -> jax.Array:
  """`CE(z + tau log pi)` with `tau = loss.la_tau`, batch mean."""
  return jnp.mean(losses.logit_adjusted_cross_entropy(
      ctx.logits, ctx.labels, class_counts=ctx.class_counts,
      tau=ctx.options["la_tau"]))


def balanced_softmax(ctx: LossContext) -> jax.Array:
  """`CE(z + log n)`, batch mean."""
  return jnp.mean(losses.balanced_softmax_cross_entropy(
      ctx.logits, ctx.labels, class_counts=ctx.class_counts))


def drw_class_weights(ctx: LossContext) -> jax.Array:
  """Deferred re-weighting: `(K,)` class weights at `ctx.epoch`.

  Ones before epoch `loss.drw_epoch` (0-based: 160 means from the 161st
  epoch, the one where the step schedule first decays), then
  `class_balanced_weights(class_counts, beta=loss.cb_beta)`. The switch is
  a `where` on the traced epoch, so the step compiles once.
  """
  o = ctx.options
  balanced = losses.class_balanced_weights(ctx.class_counts,
                                           beta=o["cb_beta"])
  return jnp.where(ctx.epoch >= o["drw_epoch"], balanced,
                   jnp.ones_like(balanced))


def ldam_drw(ctx: LossContext) -> jax.Array:
  """LDAM on cosine logits, weighted batch mean with the DRW weights.

  `sum_i w_{y_i} l_i / sum_i w_{y_i}` (PyTorch's `weight=` convention).
  Under mixup the step calls this once per label set, so each of the two
  terms is normalised by its own labels' weights:
  `lam * wmean(l(y_a); w_{y_a}) + (1 - lam) * wmean(l(y_b); w_{y_b})`,
  which is what LDAM-DRW + mixup code bases compute with
  `mixup_criterion(LDAMLoss(weight=w), ...)`.
  """
  o = ctx.options
  per = losses.ldam_loss(ctx.logits, ctx.labels,
                         class_counts=ctx.class_counts,
                         max_margin=o["ldam_max_margin"],
                         scale=o["ldam_scale"])
  return losses.class_weighted_mean(per, ctx.labels, drw_class_weights(ctx))


# ------------------------------------------------------------------ checks


def _check_etf_dr(config: Any) -> None:
  o = config.loss
  if o.dr_form not in ("reference", "paper"):
    raise ValueError("loss.dr_form must be 'reference' or 'paper', got "
                     f"{o.dr_form!r}.")
  if o.dr_form == "paper" and o.given_ew:
    raise ValueError(
        "loss.dr_form='paper' uses fixed lengths e_w, e_h; the per-batch "
        "class lengths belong to the reference form. Set "
        "--config.loss.given_ew=False (or keep dr_form='reference').")
  if not (o.e_w > 0 and o.e_h > 0):
    raise ValueError(f"loss.e_w and loss.e_h must be > 0 (1 in the paper), "
                     f"got {o.e_w}, {o.e_h}.")
  if not o.reg_lam >= 0:
    raise ValueError(f"loss.reg_lam must be >= 0 (0 for CIFAR, 0.01 for "
                     f"ImageNet-LT), got {o.reg_lam}.")


def _check_la(config: Any) -> None:
  tau = config.loss.la_tau
  if not tau >= 0:
    raise ValueError(f"loss.la_tau must be >= 0 (1 in Menon et al.), got "
                     f"{tau}; set --config.loss.la_tau=1.0.")


def _check_ldam_drw(config: Any) -> None:
  o = config.loss
  if not 0.0 < o.cb_beta < 1.0:
    raise ValueError(f"loss.cb_beta must lie in (0, 1) (0.9999 for DRW), got "
                     f"{o.cb_beta}; set --config.loss.cb_beta=0.9999.")
  if not o.ldam_max_margin >= 0:
    raise ValueError(f"loss.ldam_max_margin must be >= 0 (0.5 in LDAM), got "
                     f"{o.ldam_max_margin}.")
  if not o.ldam_scale > 0:
    raise ValueError(f"loss.ldam_scale must be > 0 (30 in LDAM), got "
                     f"{o.ldam_scale}.")
  if o.drw_epoch < 0:
    raise ValueError(f"loss.drw_epoch must be >= 0 (0-based epoch where "
                     f"re-weighting starts), got {o.drw_epoch}.")


def _check_etf_dot(config: Any) -> None:
  if not config.l2_normalize:
    raise ValueError(
        "method=etf_dot needs l2_normalize=True: the plain dot loss -<h, t> "
        "is unbounded below, and only the normalisation keeps ||h|| fixed. "
        "Set --config.l2_normalize=True or use method=etf_dr.")


def dot_regression_eval(ctx: LossContext) -> jax.Array:
  """`(B,)` DR loss against the unscaled ETF columns: what the reference
  reports as the ETF + DR eval loss."""
  return losses.dot_regression_loss(
      ctx.features, losses.etf_targets(ctx.classifier, ctx.labels))


def plain_dot_eval(ctx: LossContext) -> jax.Array:
  """`(B,)` plain dot loss `-<h, m_y>` against the unscaled ETF columns."""
  return losses.dot_loss(ctx.features,
                         losses.etf_targets(ctx.classifier, ctx.labels))


# ---------------------------------------------------------------- registry

METHODS: dict[str, Method] = {
    "etf_dr": Method(head="etf", loss=dot_regression, check=_check_etf_dr,
                     calibrated=False,
                     eval_loss=dot_regression_eval,
                     summary="fixed ETF + dot regression (the paper)"),
    "etf_ce": Method(head="etf", loss=ce_loss, calibrated=False,
                     summary="fixed ETF + cross entropy"),
    "etf_dot": Method(head="etf", loss=plain_dot, check=_check_etf_dot,
                      calibrated=False, eval_loss=plain_dot_eval,
                      summary="fixed ETF + plain dot loss -<h, t>"),
    "ce": Method(head="linear", loss=ce_loss,
                 summary="learnable linear + cross entropy"),
    "ce_frozen": Method(head="linear", loss=ce_loss,
                        head_options={"freeze_classifier": True},
                        summary="frozen random linear + cross entropy"),
    "la": Method(head="linear", loss=logit_adjusted, check=_check_la,
                 summary="learnable linear + logit-adjusted cross entropy"),
    "bs": Method(head="linear", loss=balanced_softmax,
                 summary="learnable linear + balanced softmax"),
    "ldam_drw": Method(head="cosine", loss=ldam_drw, check=_check_ldam_drw,
                       eval_logit_scale="ldam_scale",
                       epoch_options=("drw_epoch",),
                       summary="cosine classifier + LDAM with deferred "
                               "re-weighting"),
}


def get_method(name: str) -> Method:
  """The registered method `name`; ValueError listing the valid names."""
  if name not in METHODS:
    raise ValueError(
        f"Unknown method {name!r}; choose one of {', '.join(METHODS)} "
        "(--config.method=...).")
  return METHODS[name]


def register_method(name: str, method: Method, *,
                    replace: bool = False) -> Method:
  """Adds `method` to `METHODS` under `name` and returns it.

  Raises:
    ValueError: if `name` is taken (unless `replace`), or the head is not
      one of `nc_jax.models.HEADS`.
    TypeError: if `method` is not a `Method`.
  """
  if not isinstance(method, Method):
    raise TypeError(f"register_method needs a Method, got {type(method)}.")
  if method.head not in models.HEADS:
    raise ValueError(f"Method {name!r} names head {method.head!r}; valid "
                     f"heads: {', '.join(sorted(models.HEADS))}.")
  if name in METHODS and not replace:
    raise ValueError(f"A method named {name!r} is already registered; pick "
                     "another name or pass replace=True.")
  METHODS[name] = method
  return method
