"""ImageNet ResNet-50, with the reference's widened last stage for ImageNet-LT.

The torchvision ("v1.5") bottleneck ResNet: a 7x7 stride-2 stem conv,
BN-ReLU, a 3x3 stride-2 max pool, four stages of [3, 4, 6, 3] bottlenecks
`Conv1x1(p)-BN-ReLU-Conv3x3(p, stride)-BN-ReLU-Conv1x1(4p)-BN` with planes
p = 64, 128, 256, 512, projection shortcuts (`Conv1x1(stride)-BN`) where the
shape changes, global average pooling. The stride of a stage sits on the 3x3
conv (v1.5), not on the first 1x1.

The reference's ImageNet-LT feature extractor (`ResNet_FE`) doubles the last
stage's planes, 512 -> 1024, so the features are 4 * 1024 = 4096-d (about
63M parameters); `wide_layer4=False` (or `resnet50_standard`) gives the
standard 2048-d ResNet-50 (23,508,032 backbone parameters, torchvision's
25,557,032 less its fc), the one ImageNet-pretrained weights exist for
(`nc_jax.pretrained` loads them).

Initialisation as the reference (`models/resnet.py`, `ResNet_FE`, i.e.
torchvision's): every conv kernel is Kaiming-normal fan-out, N(0, 2 /
fan_out) with fan_out = kh * kw * out (`KAIMING_NORMAL_FAN_OUT`); every
BatchNorm starts at scale 1, bias 0; no zero-init of the last BN
(`zero_init_residual=False`). The backbone has no linear layer; the
reference's ImageNet classifier (`Classifier`) is a plain `nn.Linear` with
PyTorch's default init; `heads.LinearHead` draws its kernel Kaiming-normal
instead (a difference of init only) and its bias as PyTorch does
(`layers.torch_linear_bias_init`).

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR
  2016. (Table 1, ResNet-50.)
  Yang et al. NeurIPS 2022, reference code `models/resnet.py` (`ResNet_FE`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models.layers import KAIMING_NORMAL_FAN_OUT, batch_norm

Dtype = Any

EXPANSION = 4  # Output channels of a bottleneck per plane.


def _conv(features: int, kernel: int, stride: int = 1, *,
          dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
  """A bias-free conv with PyTorch's symmetric padding `kernel // 2`."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=KAIMING_NORMAL_FAN_OUT, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """The 1x1-3x3-1x1 residual block with expansion 4.

  Attributes:
    planes: p; the block outputs `4p` channels.
    stride: stride of the 3x3 conv and of the projection shortcut.
    dtype: compute dtype.
    norm: the BatchNorm factory (`nc_jax.models.layers.batch_norm`'s
      signature).
  """
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  norm: Callable[..., nn.Module] = batch_norm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """`(B, H, W, C)` -> `(B, ceil(H/stride), ceil(W/stride), 4 * planes)`."""
    out_planes = self.planes * EXPANSION
    kw = dict(dtype=self.dtype)
    out = _conv(self.planes, 1, name="conv1", **kw)(x)
    out = self.norm(train, activation="relu", name="bn1", **kw)(out)
    out = _conv(self.planes, 3, self.stride, name="conv2", **kw)(out)
    out = self.norm(train, activation="relu", name="bn2", **kw)(out)
    out = _conv(out_planes, 1, name="conv3", **kw)(out)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_planes:
      shortcut = _conv(out_planes, 1, self.stride, name="downsample_conv",
                       **kw)(x)
      shortcut = self.norm(train, name="downsample_bn", **kw)(shortcut)
    # relu(bn3(out) + shortcut): one layer, so that a BatchNorm with its own
    # gradient can fuse the residual and the ReLU into it.
    return self.norm(train, activation="relu", name="bn3", **kw)(
        out, shortcut)


class ResNet(nn.Module):
  """The bottleneck ImageNet ResNet backbone (no classifier).

  Attributes:
    stage_sizes: bottlenecks per stage, `(3, 4, 6, 3)` for ResNet-50.
    planes: planes p per stage; features are `4 * planes[-1]`.
    dtype: compute dtype (parameters stay float32).
    norm: the BatchNorm factory (`nc_jax.models.layers.batch_norm`'s
      signature).

  Submodule names follow torchvision (`conv1`, `bn1`, `layer{1..4}_{j}`).
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  planes: Sequence[int] = (64, 128, 256, 512)
  dtype: Dtype = jnp.float32
  norm: Callable[..., nn.Module] = batch_norm

  @property
  def feature_dim(self) -> int:
    """Width of the pooled features, known without initialising."""
    return int(self.planes[-1]) * EXPANSION

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Extracts features.

    Args:
      x: `(B, H, W, 3)` NHWC images, any spatial size (224 for ImageNet;
        the total stride is 32).
      train: BatchNorm uses (and updates) batch statistics when True.

    Returns:
      `(B, 4 * planes[-1])` float32 globally average-pooled features.
    """
    if len(self.stage_sizes) != len(self.planes):
      raise ValueError(f"stage_sizes {self.stage_sizes} and planes "
                       f"{self.planes} must have the same length.")
    x = x.astype(self.dtype)
    x = _conv(64, 7, 2, dtype=self.dtype, name="conv1")(x)
    x = self.norm(train, activation="relu", dtype=self.dtype, name="bn1")(x)
    # Flax pads max_pool with -inf, like PyTorch's MaxPool2d(3, 2, 1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, planes) in enumerate(zip(self.stage_sizes,
                                                 self.planes)):
      for j in range(blocks):
        stride = 2 if stage > 0 and j == 0 else 1
        x = Bottleneck(planes, stride, dtype=self.dtype, norm=self.norm,
                       name=f"layer{stage + 1}_{j}")(x, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def resnet50(*, wide_layer4: bool = True, dtype: Dtype = jnp.float32,
             norm: Callable[..., nn.Module] = batch_norm) -> ResNet:
  """ResNet-50; `wide_layer4` (default) doubles layer4 to 4096-d features.

  Args:
    wide_layer4: True for the reference's ImageNet-LT backbone (layer4
      planes 1024, 4096-d features), False for the standard 2048-d one.
    dtype: compute dtype.
    norm: the BatchNorm factory.
  """
  last = 1024 if wide_layer4 else 512
  return ResNet(stage_sizes=(3, 4, 6, 3), planes=(64, 128, 256, last),
                dtype=dtype, norm=norm)


def resnet50_standard(*, dtype: Dtype = jnp.float32,
                      norm: Callable[..., nn.Module] = batch_norm) -> ResNet:
  """torchvision's ResNet-50 (2048-d features): `resnet50(wide_layer4=False)`.

  A registry entry of its own, so that the width is fixed by the name (and
  a config cannot ask it for `wide_layer4`): the architecture that
  torchvision's and timm's ImageNet weights fit.

  Args:
    dtype: compute dtype.
    norm: the BatchNorm factory.
  """
  return resnet50(wide_layer4=False, dtype=dtype, norm=norm)
