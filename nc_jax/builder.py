"""One builder: config -> model, fixed ETF, optimiser, compiled steps, state.

Training (`nc_jax.train`), the benchmark (`experiments/benchmark.py`) and the
tests (`tests/tiny_step.py`) all call `build`, so the three can never
disagree on how a method is assembled, and `steps.StepConfig` is made here
only. The data-dependent facts (class counts, epoch length, image shape,
normalisation) are arguments: the builder reads no data. As Flax's examples
separate `create_model` from `create_train_state`, `build_model` is the
model-and-evaluation part alone (model, ETF, eval step: what a trained run
needs, `nc_jax.runs`), and `build` adds the training part (optimiser, train
step, initial state).

    built = build(config, num_classes=10, image_shape=(32, 32, 3),
                  mean=..., std=..., class_counts=train_input.counts,
                  steps_per_epoch=96, total_steps=19200, mesh=mesh)
    state = built.init_state()
    state, metrics = built.train_step(state, batch, built.etf)
    counts = built.eval_step(state, eval_batch, built.etf)

The model's layers (which convolution and BatchNorm compute it) are
decided once, by `nc_jax.kernels`, before the model is made: `build` takes
the caller's `kernels.Layers` (training resolves them while it validates
the config, to check and record them) or resolves them from the config and
the mesh, and hands their factories to the model, which never decides
anything itself. The builder checks nothing: `nc_jax.validation` has
checked the config before it gets here.

The ETF has one owner: `build` makes it from `config.etf_seed` (replica r
uses `etf_seed + r`, `nc_jax.etf.replica_etfs`), and that array is what the
train step's loss, the logits of both steps and `Built.classifiers` (the
neural-collapse metrics) all see. It is never in the train state, so the
optimiser cannot touch it; a resumed run rebuilds the identical matrix from
the seed that `config.json` pins.
"""

from __future__ import annotations

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from nc_jax import etf as etf_lib
from nc_jax import kernels
from nc_jax import methods as methods_lib
from nc_jax import models
from nc_jax import optim
from nc_jax import schedule_fit
from nc_jax import sharding
from nc_jax import steps as steps_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class BuiltModel:
  """What `build_model` returns: the model and what evaluates it.

  Attributes:
    method: the `methods.Method`.
    model: the unbound `models.ImageClassifier`.
    etf: the fixed classifiers, replicated over the mesh, `(d, K)` or
      `(S, d, K)`; None when the head learns its classifier. Pass it as the
      steps' third argument.
    step_config: the `steps.StepConfig` the steps close over.
    eval_step: compiled `(state, batch, etf) -> counts` (plus `features`
      when built with `with_features`); reads only `state.params` and
      `state.model_state`.
    num_replicas: S.
    layers: the `kernels.Layers` the model runs.
  """
  method: methods_lib.Method
  model: models.ImageClassifier
  etf: jax.Array | None
  step_config: steps_lib.StepConfig
  eval_step: Callable
  num_replicas: int
  layers: kernels.Layers

  def classifiers(self, state: steps_lib.TrainState) -> np.ndarray:
    """The `(d, K)` (or `(S, d, K)`) classifier the logits use, as numpy."""
    if self.etf is not None:
      return np.asarray(jax.device_get(self.etf))

    def one(params, model_state):
      return models.classifier_weights(self.model,
                                       {"params": params, **model_state})
    if self.num_replicas == 1:
      return np.asarray(one(state.params, state.model_state))
    return np.asarray(jax.vmap(one)(state.params, state.model_state))


@dataclasses.dataclass(frozen=True)
class Built(BuiltModel):
  """What `build` returns: `BuiltModel`'s fields and the training part.

  Attributes:
    tx, schedule: the optimiser and its learning-rate schedule.
    train_step: compiled `(state, batch, etf) -> (state, metrics)`; donates
      the state.
    train_chunk: compiled k steps per call over k stacked batches
      (`steps.compile_train_chunk`; compiled on first use, k > 1 only).
    init_state: `() -> TrainState`, the initial state (stacked over S),
      replicated over the mesh; replica r draws from
      `fold_in(PRNGKey(config.seed), r)`.
  """
  tx: optax.GradientTransformation | None = None
  schedule: optax.Schedule | None = None
  train_step: Callable | None = None
  train_chunk: Callable | None = None
  init_state: Callable[[], steps_lib.TrainState] | None = None
  pretrained: str | None = None


def step_config(config: ConfigDict, method: methods_lib.Method, *,
                num_classes: int, mean: Sequence[float],
                std: Sequence[float], class_counts: Sequence[int] | None,
                steps_per_epoch: int | None = None) -> steps_lib.StepConfig:
  """The `StepConfig` of `config` (the only place one is made).

  `class_counts` None (unknown) evaluates without a loss; `steps_per_epoch`
  None makes a config that only evaluates.

  Raises:
    ValueError: class counts not of length K; post-hoc adjustment with
      a class that has no training examples (its log-prior is -inf) or
      with unknown counts.
  """
  tau = float(config.eval_logit_adjust_tau)
  counts = None
  if class_counts is not None:
    counts = tuple(int(c) for c in class_counts)
    if len(counts) != num_classes:
      raise ValueError(f"class_counts has {len(counts)} entries for "
                       f"{num_classes} classes.")
  if tau > 0 and counts is None:
    raise ValueError(
        f"eval_logit_adjust_tau={tau} needs the training class counts, "
        "which are unknown here (results.json or train_subset.json gives "
        "them).")
  if tau > 0 and min(counts) <= 0:
    raise ValueError(
        "eval_logit_adjust_tau > 0 needs every class in the training subset "
        f"(log-prior of an empty class is -inf); counts: {list(counts)}. Set "
        "--config.eval_logit_adjust_tau=0.")
  return steps_lib.StepConfig(
      method=method, num_classes=num_classes, mean=tuple(mean),
      std=tuple(std), mixup_alpha=float(config.mixup_alpha),
      steps_per_epoch=None if steps_per_epoch is None else int(
          steps_per_epoch),
      class_counts=counts,
      options=methods_lib.LossOptions(config.loss.to_dict()),
      eval_logit_adjust_tau=tau,
      compute_dtype=DTYPES[config.compute_dtype],
      ece_bins=int(config.ece_bins))


def model_for(config: ConfigDict, method: methods_lib.Method, *,
              num_classes: int,
              layers: kernels.Layers) -> models.ImageClassifier:
  """The classifier of `config` with the method's head, given `layers`."""
  opts: dict[str, Any] = {"dtype": DTYPES[config.compute_dtype],
                          # Ignored by heads other than etf.
                          "l2_normalize": bool(config.l2_normalize),
                          **layers.model_options(config.backbone),
                          **method.head_options}
  return models.create_model(config.backbone, num_classes=num_classes,
                             head=method.head, **opts)


def build_model(config: ConfigDict, *, num_classes: int,
                mean: Sequence[float], std: Sequence[float],
                class_counts: Sequence[int] | None, mesh: Mesh,
                layers: kernels.Layers | None = None,
                steps_per_epoch: int | None = None,
                with_features: bool | None = None,
                for_loading: bool = False) -> BuiltModel:
  """The model, its fixed ETF and its compiled eval step; no optimiser.

  What a trained run needs to be evaluated or used (`nc_jax.runs`), and the
  first half of `build`.

  Args:
    config: the run's config.
    num_classes: K.
    mean, std: per-channel normalisation (0-1 scale).
    class_counts: the K training counts; None when unknown (the eval step
      then reports no loss, and `eval_logit_adjust_tau` is refused).
    mesh: the data-parallel mesh.
    layers: the layers to give the model; None resolves them here
      (`nc_jax.kernels.resolve` on the backend and the mesh's devices).
    steps_per_epoch: for `build`'s train step; None here.
    with_features: the eval step also returns the features; None follows
      `config.nc_metrics`.
    for_loading: a trained model (`kernels.resolve`'s): an implementation
      that cannot run here falls back to one that can.

  Raises:
    ValueError: for a config that cannot work (the message names the fix).
  """
  method = methods_lib.get_method(config.method)
  s = int(config.num_seeds)
  if layers is None:
    layers = kernels.resolve(config, device_count=mesh.devices.size,
                             for_loading=for_loading)
  model = model_for(config, method, num_classes=num_classes, layers=layers)
  etf = None
  if method.fixed_classifier:
    etf = jax.device_put(
        etf_lib.replica_etfs(num_classes, model.feature_dim,
                             seed=int(config.etf_seed), num_replicas=s,
                             rotation=config.etf_rotation),
        sharding.replicated_sharding(mesh))
  cfg = step_config(config, method, num_classes=num_classes, mean=mean,
                    std=std, class_counts=class_counts,
                    steps_per_epoch=steps_per_epoch)
  if with_features is None:
    with_features = bool(config.nc_metrics)
  eval_step = steps_lib.compile_eval_step(
      steps_lib.make_eval_step(model, cfg, with_features=with_features),
      mesh, num_replicas=s, replica_mode=config.seeds_mode)
  return BuiltModel(method=method, model=model, etf=etf, step_config=cfg,
                    eval_step=eval_step, num_replicas=s, layers=layers)


def build(config: ConfigDict, *, num_classes: int,
          image_shape: tuple[int, int, int], mean: Sequence[float],
          std: Sequence[float], class_counts: Sequence[int],
          steps_per_epoch: int, total_steps: int, mesh: Mesh,
          layers: kernels.Layers | None = None) -> Built:
  """Assembles everything a run needs from `config`; see the module doc.

  `build_model`'s part, then the optimiser, the train step and the initial
  state.

  Args:
    config: the run's config (method, backbone, loss, optim, seeds, ...).
    num_classes: K.
    image_shape: `(H, W, C)` of the batches.
    mean, std: per-channel normalisation (0-1 scale).
    class_counts: K per-class counts of the training subset.
    steps_per_epoch: steps in one epoch.
    total_steps: steps of the whole run.
    mesh: the data-parallel mesh.
    layers: the layers to give the model; None resolves them here.

  Returns:
    A `Built`.

  Raises:
    ValueError: for a config that cannot work (the message names the fix).
  """
  # A config asking for its recipe's schedule scaled to a shorter run gets
  # it here too (`validation.validate_length` gives training the same).
  method = methods_lib.get_method(config.method)
  config, _ = schedule_fit.fit_schedule(config, total_steps / max(steps_per_epoch, 1),
                                 epoch_options=method.epoch_options)
  part = build_model(config, num_classes=num_classes, mean=mean, std=std,
                     class_counts=class_counts, mesh=mesh, layers=layers,
                     steps_per_epoch=steps_per_epoch)
  s, model, rep = part.num_replicas, part.model, sharding.replicated_sharding(
      mesh)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch,
                                      total_steps)
  one_step = steps_lib.make_train_step(model, tx, schedule, part.step_config)
  train_step = steps_lib.compile_train_step(
      one_step, mesh, num_replicas=s, replica_mode=config.seeds_mode)
  train_chunk = steps_lib.compile_train_chunk(
      one_step, mesh, num_replicas=s, replica_mode=config.seeds_mode)

  def init_one(key):
    return steps_lib.init_state(model, tx, key, tuple(image_shape))

  def init_state() -> steps_lib.TrainState:
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(config.seed), r)
                      for r in range(s)])
    init = jax.jit(init_one if s == 1 else jax.vmap(init_one),
                   out_shardings=rep)
    return init(keys[0] if s == 1 else keys)

  return Built(**{f.name: getattr(part, f.name)
                  for f in dataclasses.fields(BuiltModel)},
               tx=tx, schedule=schedule, train_step=train_step,
               train_chunk=train_chunk, init_state=init_state,
               pretrained=config.get("pretrained"))
