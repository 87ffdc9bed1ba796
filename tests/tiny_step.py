"""The small train-step setup shared by the step tests and their subprocesses.

ResNet-8 on 10 classes (16x16 images, a long-tailed count profile) with the
default optimizer and the reference DR loss (per-batch lengths, mixup 1.0):
big enough to exercise every piece of the real `train_step`, small enough to
compile in seconds. Built by `nc_jax.builder.build`, like training.
"""

from __future__ import annotations

from nc_jax.configs import cifar_lt
from nc_jax import builder
from nc_jax import data as data_lib
from nc_jax import sharding

IMAGE_SHAPE = (16, 16, 3)
COUNTS = tuple(data_lib.long_tail_counts(100, 0.1, num_classes=10))
STEPS_PER_EPOCH, TOTAL_STEPS = 10, 100


def tiny_config(method: str = "etf_dr", conv_impl: str = "auto", **overrides):
  """The default (unlocked) config with ResNet-8, `method` and overrides."""
  c = cifar_lt.get_config(f"method={method}")
  c.unlock()
  c.backbone = "resnet8"
  c.conv_impl = conv_impl
  c.loss.drw_epoch = 5  # inside the TOTAL_STEPS / STEPS_PER_EPOCH epochs
  c.optim.decay_epochs = ()  # the recipe's 160 and 180 lie past the end
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def tiny_build(method: str = "etf_dr", conv_impl: str = "auto", *,
               mesh=None, **overrides) -> builder.Built:
  """`builder.build` of `tiny_config(method, conv_impl, **overrides)`."""
  return builder.build(
      tiny_config(method, conv_impl, **overrides), num_classes=10,
      image_shape=IMAGE_SHAPE, mean=(0.5,) * 3, std=(0.25,) * 3,
      class_counts=COUNTS, steps_per_epoch=STEPS_PER_EPOCH,
      total_steps=TOTAL_STEPS, mesh=mesh or sharding.make_mesh())
