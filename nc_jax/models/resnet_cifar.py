"""CIFAR ResNets with option-A (parameter-free) shortcuts.

The 6n+2-layer CIFAR ResNet of He et al. (2016, Sec. 4.2), as written in the
LDAM-DRW / MiSLAS `resnet_cifar.py` that the reference code builds on:
a 3x3 stem conv, three stages of n BasicBlocks (the first block of stages 2
and 3 halves the resolution), global average pooling. ResNet-32 is n = 5.

Shortcuts that change shape are "option A": subsample `x[:, ::2, ::2, :]` and
zero-pad the channels (half the padding before the existing channels, half
after, as the reference's `F.pad(..., (planes//4, planes//4))`), so they add
no parameters. Every conv is bias-free and followed by BatchNorm.

Parameter counts (backbone only, `params` collection, i.e. conv kernels plus
BatchNorm scale and bias):
  widths (16, 32, 64)  -> 463,504, 64-d features   (`resnet32`)
  widths (32, 64, 128) -> 1,848,608, 128-d features (`resnet32_c100`)

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR
  2016. (Sec. 4.2, option A.)
  Cao, Wei, Gaidon, Arechiga, Ma. Learning Imbalanced Datasets with
  Label-Distribution-Aware Margin Loss. NeurIPS 2019. (`resnet_cifar.py`.)
  Zhong, Cui, Liu, Jia. Improving Calibration for Long-Tailed Recognition
  (MiSLAS). CVPR 2021.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models.conv import Conv
from nc_jax.models.layers import KAIMING_NORMAL, batch_norm

Dtype = Any


def conv3x3(features: int, stride: int = 1, *, dtype: Dtype = jnp.float32,
            conv: Callable[..., nn.Module] = Conv,
            name: str | None = None) -> nn.Module:
  """A bias-free 3x3 conv with PyTorch's symmetric padding of 1.

  Explicit padding, not 'SAME': for stride 2 on an even size, 'SAME' pads
  only after the image, which shifts every sampled window by one pixel
  relative to the reference. `conv` is the convolution factory
  (`nc_jax.models.conv.Conv`'s signature); the parameters are the same
  whichever computes it.
  """
  return conv(features, (3, 3), strides=(stride, stride),
              padding=((1, 1), (1, 1)), kernel_init=KAIMING_NORMAL,
              dtype=dtype, name=name)


def option_a_shortcut(x: jax.Array, planes: int, stride: int) -> jax.Array:
  """Parameter-free shortcut: spatial subsample, then zero-pad channels.

  Args:
    x: `(B, H, W, C)`.
    planes: output channels, `>= C`.
    stride: spatial subsampling factor.

  Returns:
    `(B, ceil(H/stride), ceil(W/stride), planes)`; the input channels sit in
    the middle, `(planes - C) // 2` zero channels before them. This matches
    the stride-2, pad-1 conv's output size for any H, W.
  """
  in_planes = x.shape[-1]
  if planes < in_planes:
    raise ValueError(
        f"An option-A shortcut can only widen: {in_planes} -> {planes}.")
  x = x[:, ::stride, ::stride, :]
  before = (planes - in_planes) // 2
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0),
                     (before, planes - in_planes - before)))


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

  Attributes:
    planes: output channels.
    stride: stride of the first conv (and of the shortcut's subsampling).
    dtype: compute dtype.
    conv: the convolution factory (`nc_jax.models.conv.Conv`'s signature).
    norm: the BatchNorm factory (`nc_jax.models.layers.batch_norm`'s).
  """
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  conv: Callable[..., nn.Module] = Conv
  norm: Callable[..., nn.Module] = batch_norm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """`(B, H, W, C)` -> `(B, ceil(H/stride), ceil(W/stride), planes)`."""
    out = conv3x3(self.planes, self.stride, dtype=self.dtype, conv=self.conv,
                  name="conv1")(x)
    out = self.norm(train, activation="relu", dtype=self.dtype,
                    name="bn1")(out)
    out = conv3x3(self.planes, dtype=self.dtype, conv=self.conv,
                  name="conv2")(out)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = option_a_shortcut(x, self.planes, self.stride)
    # relu(bn2(out) + shortcut): one layer, so that a BatchNorm with its own
    # gradient can fuse the residual and the ReLU into it.
    return self.norm(train, activation="relu", dtype=self.dtype,
                     name="bn2")(out, shortcut)


class ResNetCifar(nn.Module):
  """The CIFAR ResNet backbone (no classifier): images to pooled features.

  Attributes:
    widths: channels of the three stages; the stem has `widths[0]`.
    blocks_per_stage: n; depth is 6n + 2 (n = 5 gives ResNet-32).
    dtype: compute dtype (parameters stay float32).
    conv: the convolution factory (`nc_jax.models.conv.Conv`'s signature).
    norm: the BatchNorm factory (`nc_jax.models.layers.batch_norm`'s).

  Submodule names follow the PyTorch reference (`conv1`, `bn1`,
  `layer{1,2,3}_{j}`) so that ported weights map one to one.
  """
  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 5
  dtype: Dtype = jnp.float32
  conv: Callable[..., nn.Module] = Conv
  norm: Callable[..., nn.Module] = batch_norm

  @property
  def feature_dim(self) -> int:
    """Width of the pooled features, known without initialising."""
    return int(self.widths[-1])

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Extracts features.

    Args:
      x: `(B, H, W, 3)` NHWC images, any spatial size.
      train: BatchNorm uses (and updates) batch statistics when True.

    Returns:
      `(B, widths[-1])` float32, globally average-pooled features (spatial
      size is free because the pool is global, not the reference's fixed
      8x8 `avg_pool2d`, which is the same thing on 32x32 inputs).
    """
    x = x.astype(self.dtype)
    x = conv3x3(self.widths[0], dtype=self.dtype, conv=self.conv,
                name="conv1")(x)
    x = self.norm(train, activation="relu", dtype=self.dtype, name="bn1")(x)
    for stage, planes in enumerate(self.widths):
      for j in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and j == 0 else 1
        x = BasicBlock(planes, stride, dtype=self.dtype, conv=self.conv,
                       norm=self.norm, name=f"layer{stage + 1}_{j}")(x, train)
    # Pool in float32: a bfloat16 mean over many positions loses precision.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


Factory = Callable[..., nn.Module]


def resnet32(*, dtype: Dtype = jnp.float32, conv: Factory = Conv,
             norm: Factory = batch_norm) -> ResNetCifar:
  """ResNet-32, widths 16/32/64, 64-d features (CIFAR-10, SVHN, STL-10)."""
  return ResNetCifar(widths=(16, 32, 64), blocks_per_stage=5, dtype=dtype,
                     conv=conv, norm=norm)


def resnet32_c100(*, dtype: Dtype = jnp.float32, conv: Factory = Conv,
                  norm: Factory = batch_norm) -> ResNetCifar:
  """ResNet-32, widths 32/64/128, 128-d features (the reference's CIFAR-100)."""
  return ResNetCifar(widths=(32, 64, 128), blocks_per_stage=5, dtype=dtype,
                     conv=conv, norm=norm)


def resnet8(*, dtype: Dtype = jnp.float32, conv: Factory = Conv,
            norm: Factory = batch_norm) -> ResNetCifar:
  """ResNet-8 (one block per stage), 16/32/64: for tests and smoke runs."""
  return ResNetCifar(widths=(16, 32, 64), blocks_per_stage=1, dtype=dtype,
                     conv=conv, norm=norm)


def resnet20(*, dtype: Dtype = jnp.float32, conv: Factory = Conv,
             norm: Factory = batch_norm) -> ResNetCifar:
  """ResNet-20 (three blocks per stage), 16/32/64."""
  return ResNetCifar(widths=(16, 32, 64), blocks_per_stage=3, dtype=dtype,
                     conv=conv, norm=norm)
