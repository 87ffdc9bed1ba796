"""Learning-rate schedules at their boundaries, at step granularity.

The reference recipe (MiSLAS's per-epoch schedule, 200 epochs): epoch e
(1-based) of the warm-up gets lr * e / 5 for e = 1..5; then lr until epoch
160; x0.1 after epoch 160 (epochs 161-180 at 0.01 for lr 0.1) and x0.01
after 180 (epochs 181-200 at 0.001). Epoch e covers the 0-based steps
(e - 1) * spe ... e * spe - 1, and the lr of step s is what that step's
update uses. The ImageNet-LT preset decays by a cosine per step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax.configs import cifar_lt
from nc_jax import optim
from nc_jax import schedule_fit

SPE = 96  # CIFAR-10-LT r = 0.01 at batch 128: 12406 images, 96 steps


def _epoch_steps(epoch: int, spe: int = SPE) -> tuple[int, int]:
  """(first, last) 0-based step of 1-based `epoch`."""
  return (epoch - 1) * spe, epoch * spe - 1


def _reference_lr(epoch: int) -> float:
  if epoch <= 5:
    return 0.1 * epoch / 5
  if epoch <= 160:
    return 0.1
  if epoch <= 180:
    return 0.01
  return 0.001


def _lr(schedule, step: int) -> float:
  return float(schedule(jnp.asarray(step, jnp.int32)))


@pytest.fixture(scope="module")
def reference():
  c = cifar_lt.get_config("cifar10_r0.01_etf_dr")
  total = optim.duration_steps(c, "num", SPE)
  assert total == 200 * SPE
  tx, schedule = optim.make_optimizer(c.optim, SPE, total)
  return c, tx, schedule, total


@pytest.mark.parametrize("epoch", [1, 2, 4, 5, 6, 7, 159, 160, 161, 162, 179,
                                   180, 181, 182, 199, 200])
def test_reference_step_schedule_at_boundary_epochs(reference, epoch):
  _, _, schedule, _ = reference
  first, last = _epoch_steps(epoch)
  want = _reference_lr(epoch)
  assert _lr(schedule, first) == pytest.approx(want, rel=1e-6)
  assert _lr(schedule, last) == pytest.approx(want, rel=1e-6)


def test_reference_schedule_changes_exactly_at_epoch_boundaries(reference):
  _, _, schedule, total = reference
  lrs = np.asarray(jax.vmap(schedule)(jnp.arange(total)))
  per_epoch = lrs.reshape(200, SPE)
  # Constant within every epoch...
  np.testing.assert_array_equal(per_epoch,
                                np.broadcast_to(per_epoch[:, :1], (200, SPE)))
  # ...and the reference's value per epoch.
  np.testing.assert_allclose(per_epoch[:, 0],
                             [_reference_lr(e) for e in range(1, 201)],
                             rtol=1e-6)
  # Epochs 161-180 at 0.01, 181-200 at 0.001: 20 epochs each.
  assert np.sum(np.isclose(per_epoch[:, 0], 0.01)) == 20
  assert np.sum(np.isclose(per_epoch[:, 0], 0.001)) == 20


def test_the_optimizer_applies_the_schedule_per_step():
  # The SGD step's own count drives the schedule: with momentum and weight
  # decay off, update_s = -lr(s) * g. Two steps per epoch, so every step is
  # the first or the last of its epoch.
  c = cifar_lt.get_config("cifar10_r0.01_etf_dr")
  c.unlock()
  c.optim.momentum = 0.0
  c.optim.weight_decay = 0.0
  spe = 2
  tx, schedule = optim.make_optimizer(c.optim, spe, 200 * spe)
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.full((3,), 2.0)}
  state = tx.init(params)
  for step in range(14):  # epochs 1-7: through the warm-up and past it
    updates, state = tx.update(grads, state, params)
    epoch = step // spe + 1
    np.testing.assert_allclose(updates["w"], -2.0 * _reference_lr(epoch),
                               rtol=1e-6)
    assert _lr(schedule, step) == pytest.approx(_reference_lr(epoch))


def test_quick_preset_schedule():
  c = cifar_lt.get_config("quick")
  spe = 96
  _, schedule = optim.make_optimizer(c.optim, spe, 16 * spe)
  for epoch, want in ((1, 0.1), (12, 0.1), (13, 0.01), (14, 0.01),
                      (15, 0.001), (16, 0.001)):
    first, last = _epoch_steps(epoch, spe)
    assert _lr(schedule, first) == pytest.approx(want, rel=1e-6), epoch
    assert _lr(schedule, last) == pytest.approx(want, rel=1e-6), epoch


def _cosine(base: float, step: int, total: int) -> float:
  return 0.5 * base * (1 + math.cos(math.pi * step / total))


def test_cosine_preset_at_its_boundaries():
  c = cifar_lt.get_config("imagenet_lt")
  assert c.optim.schedule == "cosine" and c.num_epochs == 90
  spe = 100
  total = optim.duration_steps(c, "num", spe)
  assert total == 90 * spe
  _, schedule = optim.make_optimizer(c.optim, spe, total)
  base = c.optim.lr
  # No warm-up: the first step of the first epoch runs at the full rate.
  assert _lr(schedule, 0) == pytest.approx(base, rel=1e-6)
  # First and last step of the first, middle and last epochs.
  for epoch in (1, 2, 45, 46, 89, 90):
    for step in _epoch_steps(epoch, spe):
      # (float32: cos near pi is exact to ~1e-7 absolute, not relative.)
      assert _lr(schedule, step) == pytest.approx(
          _cosine(base, step, total), rel=1e-5, abs=1e-7 * base), step
  assert _lr(schedule, total // 2) == pytest.approx(base / 2, rel=1e-6)
  # The last step is the smallest (positive) rate; it reaches 0 at `total`.
  last = _lr(schedule, total - 1)
  assert 0 < last < 1e-6 * base * 100
  assert _lr(schedule, total) == pytest.approx(0.0, abs=1e-12)
  lrs = np.asarray(jax.vmap(schedule)(jnp.arange(total)))
  assert np.all(np.diff(lrs) <= 0)  # never increases


def test_cosine_with_warmup_epochs():
  c = cifar_lt.get_config("imagenet_lt")
  c.unlock()
  c.optim.warmup_epochs = 5
  spe, total = 10, 90 * 10
  _, schedule = optim.make_optimizer(c.optim, spe, total)
  base, warm = c.optim.lr, 5 * spe
  # Linear from 0 over the first 5 epochs, per step, then the cosine from
  # the peak over the remaining steps.
  assert _lr(schedule, 0) == pytest.approx(0.0, abs=1e-12)
  for step in (1, spe - 1, spe, warm - 1):
    assert _lr(schedule, step) == pytest.approx(base * step / warm, rel=1e-5)
  assert _lr(schedule, warm) == pytest.approx(base, rel=1e-6)
  assert _lr(schedule, warm + (total - warm) // 2) == pytest.approx(
      base / 2, rel=1e-5)
  assert _lr(schedule, total - 1) < 1e-3 * base


def test_schedule_errors_name_the_fix():
  c = cifar_lt.get_config("cifar10_r0.01_etf_dr")
  c.unlock()
  c.optim.warmup_epochs = None
  c.optim.warmup_steps = 10
  with pytest.raises(ValueError, match="give\\s+optim.warmup_epochs"):
    optim.check_ranges(c.optim)
  c.optim.warmup_steps = None
  c.optim.schedule = "linear"
  with pytest.raises(ValueError, match="Unknown optim.schedule 'linear'"):
    optim.make_optimizer(c.optim, SPE, 200 * SPE)


def test_backbone_lr_scale_is_a_pytorch_parameter_group():
  """SGD (Nesterov momentum, coupled weight decay) with the backbone's
  updates scaled by 0.1 equals two numpy SGDs, the backbone's at a tenth of
  the head's rate (PyTorch's param groups, as the CUB recipe uses)."""
  config = cifar_lt.get_config("cub200_ce").optim
  lr, mom, wd, scale = 0.01, 0.9, 5e-4, 0.1
  tx, _ = optim.make_optimizer(config, steps_per_epoch=10, total_steps=100)
  rng = np.random.default_rng(0)
  params = {"backbone": {"w": rng.normal(size=(3, 2)).astype(np.float32)},
            "head": {"w": rng.normal(size=(2,)).astype(np.float32)}}
  state, p = tx.init(params), jax.tree.map(jnp.asarray, params)
  ref = {k: dict(v) for k, v in params.items()}
  buf = jax.tree.map(np.zeros_like, params)
  for _ in range(4):
    grads = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(
        np.float32), params)
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    for group, rate in (("backbone", lr * scale), ("head", lr)):
      g = grads[group]["w"] + wd * ref[group]["w"]
      buf[group]["w"] = mom * buf[group]["w"] + g
      ref[group]["w"] = ref[group]["w"] - rate * (g + mom * buf[group]["w"])
  for group in ("backbone", "head"):
    np.testing.assert_allclose(p[group]["w"], ref[group]["w"], rtol=1e-5,
                               atol=1e-7)
  assert (config.nesterov, config.backbone_lr_scale) == (True, scale)
  bad = cifar_lt.get_config("cub200_ce").optim
  bad.backbone_lr_scale = 0.0
  with pytest.raises(ValueError, match="backbone_lr_scale must be"):
    optim.check_ranges(bad)


# ------------------------------------------- a run shorter than its recipe


def test_a_short_run_scales_the_recipes_schedule_like_the_paper_table():
  """epochs=N scales warm-up and decays by N / 200, rounded down (decays at
  epoch 0 or at the end dropped), and DRW's epoch for a method using it."""
  c = cifar_lt.get_config("cifar10_r0.01_ce,epochs=20")
  assert c.optim.fit_from_epochs == 200.0
  fitted, note = schedule_fit.fit_schedule(c, 20.0)
  assert fitted.optim.warmup_epochs == 0  # int(5 * 0.1)
  assert fitted.optim.decay_epochs == (16, 18)
  assert fitted.loss.drw_epoch == 160  # ce does not use it
  assert fitted.optim.fit_to_run == () and fitted.optim.fit_from_epochs is None
  assert note.startswith("schedule scaled to 20 epochs, 0.1 of the recipe's "
                         "200 epochs: warm-up epochs 0 (recipe 5); decays "
                         "after epochs 16, 18 (recipe 160, 180)")
  # The request itself is not changed.
  assert c.optim.decay_epochs == (160, 180) and c.optim.warmup_epochs == 5
  ldam, note = schedule_fit.fit_schedule(
      cifar_lt.get_config("cifar10_r0.01_ce,method=ldam_drw,epochs=100"),
      100.0, epoch_options=("drw_epoch",))
  assert (ldam.optim.warmup_epochs, ldam.optim.decay_epochs,
          ldam.loss.drw_epoch) == (2, (80, 90), 80)
  assert "re-weighting from epoch 80 (recipe 160)" in note


def test_a_run_of_a_few_steps_drops_what_cannot_fit():
  c = cifar_lt.get_config("quick,steps=20")
  fitted, note = schedule_fit.fit_schedule(c, 20 / SPE)
  assert (fitted.optim.warmup_epochs, fitted.optim.decay_epochs) == (0, ())
  assert note.startswith("schedule scaled to 20 steps (0.208 epochs)")
  # The fitted schedule passes the checks against the run's length.
  optim.check_schedule(fitted.optim, total_epochs=20 / SPE,
                       steps_per_epoch=SPE)
  with pytest.raises(ValueError, match="is not shorter than the run"):
    optim.check_schedule(c.optim, total_epochs=20 / SPE, steps_per_epoch=SPE)


@pytest.mark.parametrize("arg,total", [
    ("cifar10_r0.01_etf_dr", 3.0),          # no length in the argument
    ("cifar10_r0.01_etf_dr,epochs=200", 200.0),  # as long as the recipe
    ("cifar10_r0.01_etf_dr,epochs=300", 300.0),  # longer: kept
])
def test_the_schedule_is_kept_unless_a_shorter_length_asks(arg, total):
  c = cifar_lt.get_config(arg)
  fitted, note = schedule_fit.fit_schedule(c, total)
  assert note is None
  assert (fitted.optim.warmup_epochs, fitted.optim.decay_epochs) == (5, (160,
                                                                          180))
  # What the run records says what it trains: the request is answered.
  assert fitted.optim.fit_to_run == () and fitted.optim.fit_from_epochs is None
  if not c.optim.fit_to_run:
    assert fitted is c


def test_a_field_the_user_changed_is_not_scaled():
  """From Python, as from the command line: a schedule field that is no
  longer the recipe's value was set by the user and is kept."""
  c = cifar_lt.get_config("cifar10_r0.01_etf_dr,steps=300")
  c.optim.warmup_epochs = 1
  fitted, note = schedule_fit.fit_schedule(c, 300 / SPE)
  assert fitted.optim.warmup_epochs == 1
  assert fitted.optim.decay_epochs == (2,)  # still the recipe's: scaled
  assert "warm-up" not in note and "decays after epochs 2" in note


def test_fitting_twice_is_fitting_once():
  c = cifar_lt.get_config("cifar10_r0.01_etf_dr,epochs=10")
  once, _ = schedule_fit.fit_schedule(c, 10.0)
  twice, note = schedule_fit.fit_schedule(once, 10.0)
  assert twice is once and note is None


def test_a_field_left_out_of_fit_to_run_is_kept_as_given():
  """What nc-jax-train does with a field given by --config.FIELD=."""
  c = cifar_lt.get_config("cifar10_r0.01_etf_dr,epochs=10")
  c.optim.fit_to_run = ("optim.decay_epochs",)
  fitted, _ = schedule_fit.fit_schedule(c, 10.0)
  assert fitted.optim.warmup_epochs == 5 and fitted.optim.decay_epochs == (8, 9)
  with pytest.raises(ValueError, match="set explicitly and is kept as given"):
    optim.check_schedule(fitted.optim, total_epochs=3.0, steps_per_epoch=SPE,
                         scaled=True)
