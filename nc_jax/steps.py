"""The compiled train and eval steps, pure functions of (state, batch, etf).

`make_train_step` and `make_eval_step` return functions for ONE replica;
`compile_steps` wraps them for S replicas (vmap over a stacked state, or
unrolled; one program for all seeds) and jit-compiles them over the
data-parallel mesh: state replicated, batch split along its leading axis,
old state donated. `nc_jax.builder.build` is the one place that assembles
them from a config.

What a step computes is decided by its `StepConfig`, above all the method
(`nc_jax.methods`: a head plus a loss). The train step normalises the uint8
batch, applies mixup (one lambda per batch, rng folded with the step), runs
the model, packs logits, features, labels, the classifier, the training
subset's class counts, the batch's class lengths, the step and the epoch
into a `methods.LossContext`, and asks the method for the batch loss; with
mixup it combines `lam * L(y_a) + (1 - lam) * L(y_b)` for every method that
does not handle mixup itself. The eval step reduces each batch to counts,
after the method's eval logit scale and the optional post-hoc logit
adjustment `z - tau * log(pi)` (`eval_logit_adjust_tau`).

The fixed ETF is the third argument of both steps, `(d, K)` per replica (or
None for heads that learn their classifier). It is built once, from the
config's `etf_seed`, by the builder, and is never part of the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from nc_jax import losses
from nc_jax import methods as methods_lib
from nc_jax import metrics as metrics_lib
from nc_jax import models
from nc_jax import sharding


class TrainState(struct.PyTreeNode):
  """Everything that changes during training (one replica, or S stacked).

  The ETF is not here: it is a constant rebuilt from the config's seed and
  passed to the steps separately, so the optimizer can never touch it.
  """
  step: jax.Array  # int32 scalar
  params: Any
  model_state: Any  # batch_stats (and the frozen classifier, if any)
  opt_state: Any
  rng: jax.Array  # uint32 (2,) raw key; per-step keys fold in the step


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static choices the compiled steps close over (built by the builder).

  Attributes:
    method: the training method (head + loss).
    num_classes: K.
    mean, std: per-channel normalisation of the uint8 images.
    mixup_alpha: Beta(alpha, alpha) mixup; 0 turns it off.
    steps_per_epoch: steps in one epoch (the loss context's epoch); None
      for a config that only evaluates (`builder.build_model`).
    class_counts: K per-class counts of the training subset; None where
      they are unknown (a model loaded without them), which evaluates
      without a loss.
    options: the loss hyper-parameters (`config.loss`).
    eval_logit_adjust_tau: post-hoc logit adjustment at evaluation (0: off).
    compute_dtype: the backbone's compute dtype.
    ece_bins: equal-width confidence bins of the ECE.
  """
  method: methods_lib.Method
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  mixup_alpha: float
  steps_per_epoch: int | None
  class_counts: tuple[int, ...] | None
  options: methods_lib.LossOptions = dataclasses.field(
      default_factory=methods_lib.LossOptions)
  eval_logit_adjust_tau: float = 0.0
  compute_dtype: Any = jnp.float32
  ece_bins: int = metrics_lib.ECE_BINS


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 `(B, H, W, C)` -> float, `(x / 255 - mean) / std` per channel."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def mixup(rng: jax.Array, x: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One lambda ~ Beta(alpha, alpha) per batch, partner = a permutation.

  Returns:
    (mixed inputs, permutation `(B,)`, lambda scalar).
  """
  k_lam, k_perm = jax.random.split(rng)
  lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
  perm = jax.random.permutation(k_perm, x.shape[0])
  mixed = lam.astype(x.dtype) * x + (1 - lam).astype(x.dtype) * x[perm]
  return mixed, perm, lam


def _classifier_input(cfg: StepConfig, etf):
  """What the model's `classifier=` gets: the ETF for fixed heads, else None."""
  return etf if cfg.method.fixed_classifier else None


def make_train_step(model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: StepConfig) -> Callable:
  """Returns `train_step(state, batch, etf) -> (state, metrics)` (1 replica).

  `batch` holds uint8 `image` `(B, H, W, C)` (already cropped/flipped) and
  int32 `label` `(B,)`; `etf` is the `(d, K)` fixed classifier, or None for
  heads that learn theirs.
  """
  method = cfg.method
  if cfg.steps_per_epoch is None or cfg.class_counts is None:
    raise ValueError("A train step needs the StepConfig's steps_per_epoch "
                     "and class_counts (builder.build makes it so).")
  counts = tuple(float(c) for c in cfg.class_counts)

  def train_step(state: TrainState, batch, etf):
    rng = jax.random.fold_in(state.rng, state.step)
    x = normalize(batch["image"], cfg.mean, cfg.std, cfg.compute_dtype)
    labels = batch["label"]
    mixing = cfg.mixup_alpha > 0
    if mixing:
      x, perm, lam = mixup(rng, x, cfg.mixup_alpha)
      partner = labels[perm]
    else:
      lam, partner = jnp.float32(1.0), labels
    # The reference computes class lengths from the unmixed batch labels.
    lengths = losses.batch_class_lengths(labels, cfg.num_classes)

    def loss_fn(params):
      variables = {"params": params, **state.model_state}
      (logits, features), new_model_state = model.apply(
          variables, x, train=True, mutable=["batch_stats"],
          classifier=_classifier_input(cfg, etf))
      classifier = (etf if method.fixed_classifier
                    else models.classifier_weights(model, variables))
      ctx = methods_lib.LossContext(
          logits=logits, features=features, labels=labels,
          classifier=classifier,
          class_counts=jnp.asarray(counts, jnp.float32), lengths=lengths,
          step=state.step, epoch=state.step // cfg.steps_per_epoch,
          batch_labels=labels, partner_labels=partner, lam=lam,
          options=cfg.options)
      if mixing and method.combine_mixup:
        loss = losses.mixup_loss(method.loss(ctx),
                                 method.loss(ctx.replace(labels=partner)), lam)
      else:
        loss = method.loss(ctx)
      return loss, (new_model_state, logits, features)

    (loss, (new_ms, logits, features)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = dict(state.model_state)
    model_state.update(new_ms)
    hit = jnp.argmax(logits, -1) == labels
    out = {
        "loss": loss,
        "lr": schedule(state.step),
        "train_acc": 100.0 * jnp.mean(hit.astype(jnp.float32)),
        "feature_norm": jnp.mean(jnp.linalg.norm(
            features.astype(jnp.float32), axis=-1)),
        "grad_norm": optax.tree.norm(grads),
    }
    new_state = state.replace(step=state.step + 1, params=params,
                              model_state=model_state, opt_state=opt_state)
    return new_state, out

  return train_step


def eval_logits(cfg: StepConfig, logits: jax.Array) -> jax.Array:
  """The logits evaluation scores: the method's scale, then the optional
  post-hoc adjustment `z - tau * log(pi)` (Menon et al. 2021, Eq. 9)."""
  if cfg.method.eval_logit_scale is not None:
    logits = logits * cfg.options[cfg.method.eval_logit_scale]
  if cfg.eval_logit_adjust_tau:
    logits = losses.posthoc_logit_adjust(
        logits, class_counts=jnp.asarray(cfg.class_counts, jnp.float32),
        tau=cfg.eval_logit_adjust_tau)
  return logits


def _eval_context(cfg: StepConfig, logits, features, labels, classifier
                  ) -> methods_lib.LossContext:
  """The loss context of an evaluation batch: its labels, no mixup, unit
  class lengths, step 0."""
  k = cfg.num_classes
  labels = labels.astype(jnp.int32)
  zero = jnp.zeros((), jnp.int32)
  return methods_lib.LossContext(
      logits=logits.astype(jnp.float32), features=features.astype(jnp.float32),
      labels=labels, classifier=(jnp.zeros((features.shape[-1], k))
                                 if classifier is None else
                                 classifier.astype(jnp.float32)),
      class_counts=jnp.asarray(cfg.class_counts, jnp.float32),
      lengths=jnp.ones((k,), jnp.float32), step=zero, epoch=zero,
      batch_labels=labels, partner_labels=labels,
      lam=jnp.ones((), jnp.float32), options=cfg.options)


def make_eval_step(model, cfg: StepConfig, *, with_features: bool = False
                   ) -> Callable:
  """Returns `eval_step(state, batch, etf) -> counts` (1 replica).

  `counts` are `nc_jax.metrics.batch_counts` of `eval_logits` (padding rows
  masked out); with `with_features` the `(B, d)` features also come back,
  for neural-collapse statistics.
  """

  def eval_step(state: TrainState, batch, etf):
    x = normalize(batch["image"], cfg.mean, cfg.std, cfg.compute_dtype)
    logits, features = model.apply(
        {"params": state.params, **state.model_state}, x, train=False,
        classifier=_classifier_input(cfg, etf))
    per_example = None
    if cfg.method.eval_loss is not None and cfg.class_counts is not None:
      per_example = cfg.method.eval_loss(_eval_context(
          cfg, logits, features, batch["label"], _classifier_input(cfg, etf)))
    out = metrics_lib.batch_counts(eval_logits(cfg, logits), batch["label"],
                                   batch["mask"], num_classes=cfg.num_classes,
                                   num_bins=cfg.ece_bins,
                                   per_example_loss=per_example)
    if with_features:
      out["features"] = features.astype(jnp.float32)
    return out

  return eval_step


REPLICA_MODES = ("auto", "vmap", "unroll")


def _unrolled(fn: Callable, num_replicas: int) -> Callable:
  """`fn(state, batch, etf)` over stacked replicas, one copy of the graph each.

  The same contract as `jax.vmap(fn, in_axes=(0, None, 0))`, but each
  replica keeps its own ungrouped convolutions: on CPU, vmapped convolutions
  become grouped convolutions, which XLA's CPU backend runs several times
  slower than S separate ones. The replicas are independent, so XLA is free
  to overlap them.
  """

  def run(state, batch, etf):
    outs = [fn(jax.tree.map(lambda a: a[r], state), batch,
               None if etf is None else etf[r])
            for r in range(num_replicas)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return run


def resolve_replica_mode(mode: str, backend: str | None = None) -> str:
  """"auto" -> "unroll" on CPU, "vmap" on accelerators; others unchanged."""
  if mode not in REPLICA_MODES:
    raise ValueError(f"Unknown replica mode {mode!r}; expected one of "
                     f"{REPLICA_MODES}.")
  if mode != "auto":
    return mode
  return "unroll" if (backend or jax.default_backend()) == "cpu" else "vmap"


def _over_replicas(fn: Callable, num_replicas: int, replica_mode: str
                   ) -> Callable:
  """`fn(state, batch, etf)` of one replica -> of `num_replicas` stacked."""
  if num_replicas == 1:
    return fn
  if resolve_replica_mode(replica_mode) == "vmap":
    return jax.vmap(fn, in_axes=(0, None, 0))
  return _unrolled(fn, num_replicas)


def compile_eval_step(eval_step: Callable, mesh: Mesh, *, num_replicas: int,
                      replica_mode: str = "auto") -> Callable:
  """`eval_step` jitted over the mesh: state and ETF replicated, the batch
  split over the data axis; replicas batched as `compile_train_step`'s."""
  return jax.jit(_over_replicas(eval_step, num_replicas, replica_mode),
                 in_shardings=(sharding.replicated_sharding(mesh),
                               sharding.batch_sharding(mesh),
                               sharding.replicated_sharding(mesh)))


def compile_train_step(train_step: Callable, mesh: Mesh, *,
                       num_replicas: int, replica_mode: str = "auto"
                       ) -> Callable:
  """jit over the mesh, batching replicas by `vmap` or unrolling them.

  State and ETF are replicated, batches split over the data axis; the
  train step donates its input state so parameters are updated in place.
  With `num_replicas > 1` every leaf of state and ETF (None for learnt
  heads) has a leading replica axis; `replica_mode` ("auto", "vmap",
  "unroll"; see `resolve_replica_mode`) picks how the replicas share the
  program.
  """
  rep = sharding.replicated_sharding(mesh)
  return jax.jit(_over_replicas(train_step, num_replicas, replica_mode),
                 in_shardings=(rep, sharding.batch_sharding(mesh), rep),
                 out_shardings=(rep, rep), donate_argnums=(0,))


def _scan_steps(fn: Callable) -> Callable:
  """`fn(state, batch, etf) -> (state, metrics)` over k stacked batches.

  Returns `chunk(state, batches, etf, sums, fresh) -> (state, sums, last)`:
  `batches` leaves are `(k, B, ...)` (k global batches, in step order);
  `sums` is the running per-step metric sum of the log interval, which the
  chunk continues (or starts anew from its first step when `fresh`, a
  traced bool scalar), adding in step order exactly as the loop's one-step
  path adds (`sums = out` at an interval's first step, `sums + out` after);
  `last` is the metrics of the chunk's last step (the current `lr`).
  """

  def chunk(state, batches, etf, sums, fresh):
    def body(carry, batch):
      state, acc, _, first = carry
      state, out = fn(state, batch, etf)
      acc = jax.tree.map(lambda a, o: jnp.where(first, o, a + o), acc, out)
      return (state, acc, out, jnp.zeros((), bool)), None
    (state, sums, last, _), _ = jax.lax.scan(
        body, (state, sums, sums, jnp.asarray(fresh, bool)), batches)
    return state, sums, last

  return chunk


def compile_train_chunk(train_step: Callable, mesh: Mesh, *,
                        num_replicas: int, replica_mode: str = "auto"
                        ) -> Callable:
  """k train steps in one compiled call: `jax.lax.scan` of the replicas'
  step (as `compile_train_step` batches them) over k stacked batches.

  The returned `chunk(state, batches, etf, sums, fresh) -> (state, sums,
  last)` (see `_scan_steps`) donates the state and the sums; state, ETF and
  metrics are replicated, the batches `(k, B, ...)` split over the data axis
  along B. k is read from the batches' shape, so each chunk length
  compiles once (`nc_jax.dispatch` keeps their number small).
  """
  rep = sharding.replicated_sharding(mesh)
  return jax.jit(
      _scan_steps(_over_replicas(train_step, num_replicas, replica_mode)),
      in_shardings=(rep, sharding.stacked_batch_sharding(mesh), rep, rep,
                    rep),
      out_shardings=(rep, rep, rep), donate_argnums=(0, 3))


def init_variables(model, rng: jax.Array, image_shape: tuple[int, int, int]
                   ) -> tuple[Any, dict]:
  """`(params, model_state)` of one replica, initialised from `rng`.

  A fixed-classifier head only needs its input's shape at init, so a zero
  placeholder stands in for the ETF: nothing of it is stored.
  """
  classifier = None
  if model.head_name in models.FIXED_CLASSIFIER_HEADS:
    classifier = jnp.zeros((model.feature_dim, model.num_classes), jnp.float32)
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32),
                         train=False, classifier=classifier)
  variables = flax.core.unfreeze(variables)
  params = variables.pop("params")
  return params, variables


def init_state(model, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape: tuple[int, int, int]) -> TrainState:
  """Initialises one replica's train state from `rng` (raw uint32 key)."""
  k_init, k_state = jax.random.split(rng)
  params, model_state = init_variables(model, k_init, image_shape)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=model_state, opt_state=tx.init(params),
                    rng=k_state)
