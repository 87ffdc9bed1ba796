"""The compiled train and eval steps, pure functions of (state, batch).

`make_train_step` and `make_eval_step` return functions for ONE replica;
`compile_steps` wraps them for S replicas (vmap over a stacked state, one
program for all seeds) and jit-compiles them over the data-parallel mesh:
state replicated, batch split along its leading axis, old state donated.

Methods (the paper's three, plus the reference code's frozen baseline):

| method     | head            | loss                                      |
|------------|-----------------|-------------------------------------------|
| etf_dr     | fixed ETF       | dot regression, per-batch class lengths   |
| etf_ce     | fixed ETF       | softmax CE on h @ M                       |
| ce         | learnable Dense | softmax CE                                |
| ce_frozen  | frozen Dense    | softmax CE (reference CIFAR baseline)     |
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
from nc_jax import metrics as metrics_lib
from nc_jax import sharding


@dataclasses.dataclass(frozen=True)
class Method:
  head: str  # "etf" or "linear"
  loss: str  # "dr" or "ce"
  freeze_classifier: bool = False


METHODS: dict[str, Method] = {
    "etf_dr": Method(head="etf", loss="dr"),
    "etf_ce": Method(head="etf", loss="ce"),
    "ce": Method(head="linear", loss="ce"),
    "ce_frozen": Method(head="linear", loss="ce", freeze_classifier=True),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(
        f"Unknown method {name!r}; choose one of {', '.join(METHODS)} "
        "(--config.method=...).")
  return METHODS[name]


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
  """Static choices the compiled steps close over."""
  method: Method
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  mixup_alpha: float
  given_ew: bool
  dr_form: str  # "reference" or "paper"
  e_w: float
  e_h: float
  reg_lam: float
  compute_dtype: Any = jnp.float32


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


def _etf_logits(features: jax.Array, etf: jax.Array) -> jax.Array:
  """`h @ M` in full float32 (accelerators may otherwise round to TF32)."""
  return jnp.dot(features.astype(jnp.float32), etf.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


def _per_example_loss(cfg: StepConfig, logits, features, classifier, labels,
                      lengths):
  if cfg.method.loss == "ce":
    return losses.cross_entropy(logits, labels)
  if cfg.dr_form == "paper":
    targets = jnp.sqrt(cfg.e_w) * losses.etf_targets(classifier, labels)
    return losses.dot_regression_loss(features, targets, e_w=cfg.e_w,
                                      e_h=cfg.e_h, reg_lam=cfg.reg_lam)
  targets = losses.etf_targets(classifier, labels, lengths=lengths)
  return losses.dot_regression_loss(features, targets, reg_lam=cfg.reg_lam)


def make_train_step(model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: StepConfig) -> Callable:
  """Returns `train_step(state, batch, etf) -> (state, metrics)` (1 replica).

  `batch` holds uint8 `image` `(B, H, W, C)` (already cropped/flipped) and
  int32 `label` `(B,)`; `etf` is the `(d, K)` constant (ignored by the linear
  heads).
  """

  def train_step(state: TrainState, batch, etf):
    rng = jax.random.fold_in(state.rng, state.step)
    x = normalize(batch["image"], cfg.mean, cfg.std, cfg.compute_dtype)
    labels = batch["label"]
    if cfg.mixup_alpha > 0:
      x, perm, lam = mixup(rng, x, cfg.mixup_alpha)
      labels_b = labels[perm]
    else:
      lam, labels_b = jnp.float32(1.0), labels
    # The reference computes class lengths from the unmixed batch labels.
    lengths = (losses.batch_class_lengths(labels, cfg.num_classes)
               if cfg.given_ew else None)

    def loss_fn(params):
      (logits, features), new_model_state = model.apply(
          {"params": params, **state.model_state}, x, train=True,
          mutable=["batch_stats"])
      if cfg.method.head == "etf":
        logits = _etf_logits(features, etf)
      la = _per_example_loss(cfg, logits, features, etf, labels, lengths)
      if cfg.mixup_alpha > 0:
        lb = _per_example_loss(cfg, logits, features, etf, labels_b, lengths)
        per_example = losses.mixup_loss(la, lb, lam)
      else:
        per_example = la
      return jnp.mean(per_example), (new_model_state, logits, features)

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


def make_eval_step(model, cfg: StepConfig, *, with_features: bool = False
                   ) -> Callable:
  """Returns `eval_step(state, batch, etf) -> counts` (1 replica).

  `counts` are `nc_jax.metrics.batch_counts` of the batch (padding rows
  masked out); with `with_features` the `(B, d)` features also come back,
  for neural-collapse statistics.
  """

  def eval_step(state: TrainState, batch, etf):
    x = normalize(batch["image"], cfg.mean, cfg.std, cfg.compute_dtype)
    logits, features = model.apply(
        {"params": state.params, **state.model_state}, x, train=False)
    if cfg.method.head == "etf":
      logits = _etf_logits(features, etf)
    out = metrics_lib.batch_counts(logits, batch["label"], batch["mask"],
                                   num_classes=cfg.num_classes)
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
    outs = [fn(jax.tree.map(lambda a: a[r], state), batch, etf[r])
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


def compile_steps(train_step: Callable, eval_step: Callable, mesh: Mesh, *,
                  num_replicas: int, replica_mode: str = "auto"
                  ) -> tuple[Callable, Callable]:
  """jit over the mesh, batching replicas by `vmap` or unrolling them.

  State and ETF are replicated, batches split over the data axis; the
  train step donates its input state so parameters are updated in place.
  With `num_replicas > 1` every leaf of state and ETF has a leading replica
  axis; `replica_mode` ("auto", "vmap", "unroll"; see
  `resolve_replica_mode`) picks how the replicas share the program.
  """
  if num_replicas > 1:
    if resolve_replica_mode(replica_mode) == "vmap":
      train_step = jax.vmap(train_step, in_axes=(0, None, 0))
      eval_step = jax.vmap(eval_step, in_axes=(0, None, 0))
    else:
      train_step = _unrolled(train_step, num_replicas)
      eval_step = _unrolled(eval_step, num_replicas)
  rep = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  train = jax.jit(train_step, in_shardings=(rep, data, rep),
                  out_shardings=(rep, rep), donate_argnums=(0,))
  evaluate = jax.jit(eval_step, in_shardings=(rep, data, rep))
  return train, evaluate


def init_state(model, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape: tuple[int, int, int]) -> TrainState:
  """Initialises one replica from `rng` (raw uint32 key)."""
  k_init, k_state = jax.random.split(rng)
  variables = model.init(k_init, jnp.zeros((1, *image_shape), jnp.float32),
                         train=False)
  variables = flax.core.unfreeze(variables)
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=variables, opt_state=tx.init(params),
                    rng=k_state)
