"""Numbers a config accepts only within their range, refused before any work.

Each bad value stops `validation.validate_config` (what `nc-jax-train` runs
first) with one message that names the field; the command line turns it
into one `error:` line with exit status 2 (tests/test_cli.py).
"""

from __future__ import annotations

import math

import pytest

from nc_jax.configs import cifar_lt as cfg_lib
from nc_jax import train
from nc_jax import validation


def _config(arg="", **overrides):
  c = cfg_lib.get_config(arg or "dataset=cifar10")
  c.unlock()
  c.data_dir = "/nonexistent"  # the numbers are checked before the data
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  c.lock()
  return c


@pytest.mark.parametrize("overrides,fragments", [
    ({"optim.lr": -0.1}, ["optim.lr must be a finite number > 0",
                          "climbs the loss"]),
    ({"optim.lr": 0.0}, ["optim.lr must be a finite number > 0"]),
    ({"optim.lr": math.nan}, ["optim.lr=nan is not a finite number"]),
    ({"optim.lr": math.inf}, ["optim.lr=inf is not a finite number"]),
    ({"optim.momentum": 1.5}, ["optim.momentum must lie in [0, 1)"]),
    ({"optim.momentum": 1.0}, ["optim.momentum must lie in [0, 1)"]),
    ({"optim.momentum": -0.1}, ["optim.momentum must lie in [0, 1)"]),
    ({"optim.weight_decay": -2e-4}, ["optim.weight_decay must be >= 0"]),
    ({"optim.decay_factor": 0.0}, ["optim.decay_factor must lie in (0, 1]"]),
    ({"optim.decay_factor": 10.0}, ["optim.decay_factor must lie in (0, 1]"]),
    ({"optim.decay_epochs": (180, 160)}, ["must be increasing"]),
    ({"optim.decay_epochs": (160, 160)}, ["must be increasing"]),
    ({"optim.warmup_epochs": -1}, ["must be >= 0"]),
    ({"mixup_alpha": math.nan}, ["mixup_alpha=nan is not a finite number"]),
    ({"mixup_alpha": -1.0}, ["mixup_alpha must be >= 0"]),
    ({"imb_factor": math.nan}, ["imb_factor=nan is not a finite number"]),
    ({"num_epochs": math.inf}, ["num_epochs=inf is not a finite number"]),
    ({"loss.la_tau": -1.0, "method": "la"}, ["loss.la_tau must be >= 0"]),
    ({"eval_logit_adjust_tau": -0.5}, ["eval_logit_adjust_tau must be >= 0"]),
    ({"loss.e_w": 0.0}, ["loss.e_w and loss.e_h must be > 0"]),
    ({"loss.reg_lam": -0.01}, ["loss.reg_lam must be >= 0"]),
    ({"loss.cb_beta": 1.0, "method": "ldam_drw"},
     ["loss.cb_beta must lie in (0, 1)"]),
    ({"etf_rotation": "haar"}, ["etf_rotation must be one of"]),
    ({"preemption_grace_seconds": 0.0},
     ["preemption_grace_seconds must be > 0"]),
    ({"num_epochs": -1.0}, ["num_epochs must be > 0, got -1"]),
    # Checked by the dataset that reads it (ImageNet-LT's recipe).
    ({"dataset": "imagenet_lt", "backbone": "resnet50", "pipeline": "tfdata",
      "color_jitter": -1.0},
     ["color_jitter must be >= 0"]),
    ({"eval_every_epochs": math.nan}, ["eval_every_epochs=nan is not a finite"]),
    # The fixed ETF must fit the backbone's features: refused before the
    # data is read (data_dir is /nonexistent here).
    ({"dataset": "cifar100", "backbone": "resnet32"},
     ["num_classes=100 needs feature_dim >= 99", "got feature_dim=64"]),
])
def test_impossible_numbers_are_refused(overrides, fragments):
  with pytest.raises(train.ConfigError) as e:
    validation.validate_config(_config(**overrides))
  for f in fragments:
    assert f in str(e.value), (f, str(e.value))


@pytest.mark.parametrize("overrides,fragments", [
    ({"optim.decay_epochs": (160, 250)},
     ["[250] at or past the end of the run (200 epochs)"]),
    ({"optim.warmup_epochs": 300}, ["optim.warmup_epochs=300 is not shorter "
                                    "than the run (200 epochs)"]),
    ({"method": "ldam_drw", "loss.drw_epoch": 200},
     ["loss.drw_epoch=200 is past the end of training (200 epochs)"]),
])
def test_a_schedule_that_does_not_fit_the_run_is_refused(overrides,
                                                          fragments):
  """Checked once the epoch's length is known (96 steps here), before
  anything is written."""
  with pytest.raises(train.ConfigError) as e:
    validation.validate_length(_config(**overrides), steps_per_epoch=96)
  for f in fragments:
    assert f in str(e.value), (f, str(e.value))


def test_the_recipes_pass_the_checks():
  """The presets and variants are within range (the data check aside)."""
  for arg in ("cifar10_r0.01_etf_dr", "cifar100_r0.005_ce", "quick",
              "imagenet_lt", "tiny,steps=4", "quick,method=ldam_drw"):
    with pytest.raises(train.ConfigError, match="/nonexistent"):
      validation.validate_config(_config(arg))


def test_a_short_run_scales_the_schedule_instead_of_refusing_it():
  # epochs=N in the argument: the recipe's 160/180 become 80/90.
  c = _config("cifar10_r0.01_etf_dr,epochs=100")
  fitted, total, note = validation.validate_length(c, steps_per_epoch=96)
  assert total == 9600 and fitted.optim.decay_epochs == (80, 90)
  assert note.startswith("schedule scaled to 100 epochs")


def test_a_schedule_field_set_explicitly_that_cannot_fit_is_refused():
  c = _config("cifar10_r0.01_etf_dr,epochs=100",
              **{"optim.fit_to_run": ("optim.warmup_epochs",)})
  with pytest.raises(train.ConfigError) as e:
    validation.validate_length(c, steps_per_epoch=96)
  assert "[160, 180] at or past the end of the run (100 epochs)" in str(
      e.value)
  assert "set explicitly and is kept as given" in str(e.value)


def test_a_length_given_as_a_field_names_the_argument_that_scales():
  with pytest.raises(train.ConfigError) as e:
    validation.validate_length(_config("cifar10_r0.01_etf_dr",
                                       num_epochs=100.0), steps_per_epoch=96)
  assert "--config.optim.decay_epochs" in str(e.value)
  assert "cifar10_r0.01_etf_dr,epochs=20" in str(e.value)


# ------------------------------------------------------- divergence, data


def test_empty_class_folder_is_refused_naming_it(tiny_image_folder, tmp_path):
  import shutil
  tree = tmp_path / "tree"
  shutil.copytree(tiny_image_folder, tree)
  for f in (tree / "train" / "class_03").iterdir():
    f.unlink()
  with pytest.raises(train.ConfigError) as e:
    validation.validate_config(_config("tiny", data_dir=str(tree)))
  assert f"{tree}/train/class_03/ holds no images" in str(e.value)


@pytest.mark.slow
def test_a_long_tail_that_empties_a_class_is_refused(tiny_image_folder,
                                                     tmp_path):
  from tests.test_train import tiny_config
  config = tiny_config(tiny_image_folder, imb_factor=0.01)  # 40 * 0.01 < 1
  with pytest.raises(train.ConfigError, match="has no image of class"):
    train.train_and_evaluate(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_divergence_never_reaches_a_checkpoint(tiny_image_folder, tmp_path):
  """Parameters blow up between log steps: the save refuses them."""
  from nc_jax import checkpoint as ckpt_lib
  from nc_jax import preemption
  from tests.test_train import tiny_config
  config = tiny_config(tiny_image_folder, arg="steps=6",
                       log_every_steps=1000, checkpoint_every_epochs=0.0,
                       checkpoint_every_steps=1, eval_every_epochs=0.0,
                       eval_every_steps=1000, **{"optim.lr": 1e30})
  with pytest.raises(preemption.Diverged) as e:
    train.train_and_evaluate(config, tmp_path / "w")
  assert e.value.exit_code == 3
  assert "not finite" in str(e.value) and "lower --config.optim.lr" in str(
      e.value)
  saved = ckpt_lib.saved_steps(tmp_path / "w" / "checkpoints")
  assert str(e.value).count("diverged at step") == 1
  step = int(str(e.value).split("diverged at step ")[1].split(":")[0])
  assert all(s < step for s in saved), (saved, step)


def test_an_etf_that_does_not_fit_is_refused_by_the_build():
  """uniform01 needs d >= K: ResNet-8's 64-d features cannot hold the
  reference's draw for 65 classes (the Gaussian one fits). `build` refuses
  it, and `train_and_evaluate` builds before it writes anything."""
  from nc_jax import builder, sharding
  from tests import tiny_step
  config = tiny_step.tiny_config("etf_dr", etf_rotation="uniform01")
  with pytest.raises(ValueError, match="etf_rotation='gaussian'"):
    builder.build(config, num_classes=65, image_shape=(16, 16, 3),
                  mean=(0.5,) * 3, std=(0.25,) * 3, class_counts=[5] * 65,
                  steps_per_epoch=10, total_steps=100,
                  mesh=sharding.make_mesh())
