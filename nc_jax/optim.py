"""Optimiser, learning-rate schedules and the one duration helper.

The reference recipe is PyTorch's SGD: momentum 0.9 (no dampening, no
Nesterov) with weight decay *added to the gradient* of every parameter
(`g <- g + wd * p`, then the momentum buffer), which is
`optax.chain(add_decayed_weights(wd), sgd(lr, momentum))`. The learning rate
follows MiSLAS's per-epoch schedule: linear warm-up over the first epochs
(epoch e in 1..W gets `lr * e / W`), then steps of x0.1 after given epochs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:  # the configs are ml_collections' (the `train` extra)
  from ml_collections import ConfigDict


def duration_steps(config: ConfigDict,
                   name: str,
                   steps_per_epoch: int,
                   *,
                   default: int | None = None) -> int | None:
  """Reads `{name}_epochs` or `{name}_steps` from `config` as a step count.

  Every duration in the configs (training length, warm-up, evaluation and
  checkpoint periods) goes through here, so any of them can be given in
  epochs (fractions allowed) or in steps. Setting both is an error; None or
  0 means unset.

  Args:
    config: the config holding the fields.
    name: prefix, e.g. "num" reads `num_epochs` / `num_steps`.
    steps_per_epoch: steps in one pass over the training set.
    default: returned when neither field is set.

  Returns:
    The duration in steps (at least 1 when set), or `default`.
  """
  epochs = config.get(f"{name}_epochs")
  steps = config.get(f"{name}_steps")
  # None or 0 means "not set": the command line cannot pass None, so
  # switching a duration from epochs to steps there zeroes the other field.
  epochs = epochs if epochs else None
  steps = steps if steps else None
  if epochs is not None and steps is not None:
    raise ValueError(
        f"Both {name}_epochs={epochs} and {name}_steps={steps} are set; set "
        f"only one: zero the other (--config.{name}_epochs=0), or for the "
        "training length pass epochs=N or steps=N in the config argument "
        "(e.g. nc_jax/configs/cifar_lt.py:quick,steps=500).")
  if epochs is not None and epochs < 0 or steps is not None and steps < 0:
    raise ValueError(f"{name}_epochs / {name}_steps must not be negative.")
  if steps is not None:
    return int(steps)
  if epochs is not None:
    return max(1, int(round(float(epochs) * steps_per_epoch)))
  return default


def step_schedule(base_lr: float,
                  steps_per_epoch: int,
                  *,
                  warmup_epochs: int,
                  decay_epochs: Sequence[int],
                  decay_factor: float) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """The reference's piecewise-constant per-epoch schedule.

  With `e = step // steps_per_epoch + 1` (1-based epoch): `base_lr * e / W`
  for `e <= W` (W = warmup_epochs), then `base_lr * decay_factor ** j`
  where j counts the entries of `decay_epochs` strictly below `e`
  (defaults 160, 180: x0.1 from epoch 161, x0.01 from epoch 181).
  """
  decay = jnp.asarray(sorted(decay_epochs) or [10 ** 9], jnp.int32)
  has_decay = bool(decay_epochs)

  def schedule(step):
    epoch = step // steps_per_epoch + 1
    lr = base_lr * jnp.power(
        decay_factor, jnp.sum(epoch > decay) if has_decay else 0)
    if warmup_epochs > 0:
      lr = jnp.where(epoch <= warmup_epochs,
                     base_lr * epoch / warmup_epochs, lr)
    return jnp.asarray(lr, jnp.float32)

  return schedule


def cosine_schedule(base_lr: float, total_steps: int, *, warmup_steps: int = 0,
                    end_lr: float = 0.0) -> optax.Schedule:
  """Per-step cosine decay to `end_lr`, after an optional linear warm-up."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup_steps else base_lr,
      peak_value=base_lr,
      warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=end_lr)


SCHEDULES = ("step", "cosine")


def check_ranges(config: ConfigDict) -> None:
  """Refuses optimiser settings out of their range, before any work.

  Args:
    config: the `optim` sub-config.

  Raises:
    ValueError: naming the field, the accepted range and the fix.
  """
  lr = config.lr
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
    raise ValueError(
        f"optim.lr must be a finite number > 0 (0.1 in the recipe), got {lr}"
        + (": a negative rate climbs the loss" if lr < 0 else "") + ".")
  m = config.momentum
  if not 0 <= m < 1:
    raise ValueError(f"optim.momentum must lie in [0, 1) (0.9 in the recipe; "
                     f"0 = plain SGD), got {m}: at 1 or above the velocity "
                     "grows without bound.")
  if not config.weight_decay >= 0:
    raise ValueError(f"optim.weight_decay must be >= 0 (2e-4 in the recipe), "
                     f"got {config.weight_decay}.")
  scale = config.get("backbone_lr_scale", 1.0)
  if not (isinstance(scale, (int, float)) and math.isfinite(scale)
          and scale > 0):
    raise ValueError(
        f"optim.backbone_lr_scale must be a finite number > 0 (1 = the same "
        f"rate as the head; 0.1 in the fine-tuning recipes), got {scale}.")
  if config.schedule not in SCHEDULES:
    raise ValueError(f"Unknown optim.schedule {config.schedule!r}; choose one "
                     f"of {SCHEDULES}.")
  if config.schedule == "step" and config.get("warmup_steps") is not None:
    raise ValueError(
        "The step schedule warms up per epoch, as the reference; give "
        "optim.warmup_epochs, not optim.warmup_steps.")
  if not 0 < config.decay_factor <= 1:
    raise ValueError(f"optim.decay_factor must lie in (0, 1] (0.1 in the "
                     f"recipe), got {config.decay_factor}.")
  decay = tuple(config.decay_epochs or ())
  if any(not isinstance(e, int) or e < 1 for e in decay) or any(
      b <= a for a, b in zip(decay, decay[1:])):
    raise ValueError(
        f"optim.decay_epochs must be increasing whole epochs >= 1 ((160, 180) "
        f"in the recipe), got {decay}.")
  warmup = config.get("warmup_epochs") or 0
  if warmup < 0 or (config.get("warmup_steps") or 0) < 0:
    raise ValueError("optim.warmup_epochs / warmup_steps must be >= 0.")


def check_schedule(config: ConfigDict, *, total_epochs: float,
                   steps_per_epoch: int, scaled: bool = False) -> None:
  """Refuses a schedule that does not fit the run's length.

  Args:
    config: the `optim` sub-config (as the run trains it, after
      `fit_schedule`).
    total_epochs: the run's length in epochs.
    steps_per_epoch: steps in one epoch.
    scaled: `fit_schedule` scaled the schedule to the run: what still does
      not fit was set explicitly (the message says so).

  Raises:
    ValueError: a warm-up not shorter than the run, or a decay at or past
      its end, naming the fix.
  """
  fix = ("Shorten the schedule to the run (--config.optim.warmup_epochs=N, "
         "--config.optim.decay_epochs='(a, b)', or '()' for none), train "
         "longer, or give the length in the config argument (e.g. "
         "cifar10_r0.01_etf_dr,epochs=20 or ,steps=300), which scales the "
         "recipe's schedule to it.")
  if scaled:
    fix = ("The run's length scaled the recipe's other schedule fields; "
           "this one was set explicitly and is kept as given: "
           "choose a value that fits (--config.optim.warmup_epochs=N, "
           "--config.optim.decay_epochs='(a, b)', or '()' for none) or train "
           "longer.")
  warmup = config.get("warmup_epochs") or 0
  if warmup and warmup >= total_epochs:
    raise ValueError(
        f"optim.warmup_epochs={warmup} is not shorter than the run "
        f"({total_epochs:g} epochs): the learning rate would never reach "
        f"optim.lr. {fix}")
  wsteps = config.get("warmup_steps") or 0
  if wsteps and wsteps >= total_epochs * steps_per_epoch:
    raise ValueError(
        f"optim.warmup_steps={wsteps} is not shorter than the run "
        f"({round(total_epochs * steps_per_epoch)} steps). {fix}")
  decay = tuple(config.decay_epochs or ())
  late = [e for e in decay if e >= total_epochs]
  if config.schedule == "step" and late:
    raise ValueError(
        f"optim.decay_epochs={decay} has {late} at or past the end of the run "
        f"({total_epochs:g} epochs): those decays would never happen. {fix}")


def make_schedule(config: ConfigDict, steps_per_epoch: int,
                  total_steps: int) -> optax.Schedule:
  """Builds the schedule named by `config.schedule` from `config`."""
  warmup = duration_steps(config, "warmup", steps_per_epoch, default=0)
  if config.schedule == "step":
    warmup_epochs = config.get("warmup_epochs") or 0
    return step_schedule(config.lr, steps_per_epoch,
                         warmup_epochs=int(warmup_epochs),
                         decay_epochs=tuple(config.decay_epochs),
                         decay_factor=config.decay_factor)
  if config.schedule == "cosine":
    return cosine_schedule(config.lr, total_steps, warmup_steps=warmup)
  raise ValueError(
      f"Unknown optim.schedule {config.schedule!r}; choose one of {SCHEDULES}.")


def make_optimizer(config: ConfigDict, steps_per_epoch: int,
                   total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and PyTorch-style (coupled) weight decay.

  Args:
    config: the `optim` sub-config (lr, momentum, weight_decay, nesterov,
      schedule, warmup_epochs, decay_epochs, decay_factor, and
      backbone_lr_scale: the backbone's rate relative to the head's).
    steps_per_epoch: steps in one epoch.
    total_steps: steps of the whole run (for the cosine schedule).

  Returns:
    (optimizer, schedule).
  """
  schedule = make_schedule(config, steps_per_epoch, total_steps)
  parts = [
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum or None,
                nesterov=bool(config.get("nesterov", False))),
  ]
  scale = float(config.get("backbone_lr_scale", 1.0))
  if scale != 1.0:  # (a run without it keeps its optimiser state's layout)
    parts.append(scale_subtree(BACKBONE, scale))
  return optax.chain(*parts), schedule


BACKBONE = "backbone"  # the model's feature extractor (models.ImageClassifier)


def scale_subtree(key: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of the parameters under top-level `key`.

  After SGD with momentum and coupled weight decay, this is exactly a
  PyTorch parameter group whose learning rate is `factor` times the others'
  (each update is the learning rate times a buffer linear in the
  gradients), as fine-tuning recipes give the pretrained backbone a smaller
  rate than the new head. Stateless.
  """
  def update(updates, state, params=None):
    del params
    if key not in updates:
      raise ValueError(f"optim.backbone_lr_scale scales the parameters under "
                       f"{key!r}, which this model does not have (top-level "
                       f"keys: {sorted(updates)}).")
    out = dict(updates)
    out[key] = jax.tree.map(lambda u: u * factor, updates[key])
    return type(updates)(out) if not isinstance(updates, dict) else out, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)
