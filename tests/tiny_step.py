"""The small train-step setup shared by the step tests and their subprocesses.

ResNet-8 on 10 classes with the default optimizer and the reference DR loss
(per-batch lengths, mixup 1.0): big enough to exercise every piece of the
real `train_step`, small enough to compile in seconds.
"""

from __future__ import annotations

from experiments.configs import cifar_lt
from nc_jax import models, optim
from nc_jax import steps as steps_lib


def tiny_step_setup(method: str = "etf_dr", conv_impl: str = "auto"):
  """Returns `(model, tx, schedule, step_config)` for `method`."""
  m = steps_lib.get_method(method)
  model = models.create_model("resnet8", num_classes=10, head=m.head,
                              conv_impl=conv_impl)
  tx, schedule = optim.make_optimizer(cifar_lt.get_config().optim, 10, 100)
  cfg = steps_lib.StepConfig(
      method=m, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
      mixup_alpha=1.0, given_ew=True, dr_form="reference", e_w=1.0, e_h=1.0,
      reg_lam=0.0)
  return model, tx, schedule, cfg
