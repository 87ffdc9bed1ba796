"""DenseNet-BC for 32x32-class inputs (three dense blocks).

Huang et al.'s CIFAR DenseNet, as in the widely used PyTorch port the
reference's DenseNet experiments follow: a 3x3 stem conv with `2k` channels,
three dense blocks separated by transitions, a final BN-ReLU and global
average pooling. With bottlenecks (the "B") each layer is
`BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k)` and its output is concatenated to
its input; with compression (the "C") each transition is
`BN-ReLU-Conv1x1(floor(theta * C))-AvgPool2x2`. Every conv is bias-free.

The paper's DenseNet rows use depth 150, growth k = 12, theta = 0.5:
floor((150 - 4) / 6) = 24 layers per block, so the channels run
24 -> 24 + 24*12 = 312 -> 156 -> 444 -> 222 -> 510: 510-d features.

Initialisation as the reference (`models/densenet.py`, `DenseNet3`): every
conv kernel is drawn from N(0, 2 / fan_out) with fan_out = kh * kw * out
(`KAIMING_NORMAL_FAN_OUT`), every BatchNorm starts at scale 1, bias 0. The
backbone has no linear layer; the reference's separate DenseNet classifier
(`Classifier`) is Kaiming-normal fan-in with PyTorch's default bias, which
is what `heads.LinearHead` does. Dropout (0 in the reference configs) is
omitted.

References:
  Huang, Liu, van der Maaten, Weinberger. Densely Connected Convolutional
  Networks. CVPR 2017. (Sec. 3 and Table 2, DenseNet-BC.)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models.layers import KAIMING_NORMAL_FAN_OUT, batch_norm

Dtype = Any

NUM_BLOCKS = 3


def layers_per_block(depth: int, bottleneck: bool) -> int:
  """Dense layers per block: floor((depth - 4) / 3), halved with bottlenecks.

  The 4 is the stem conv, two transition convs and the classifier; a
  bottleneck layer holds two convs. The division truncates, as the
  reference's `int((depth - 4) / 3 / 2)`: depth 150 gives 146 / 6 = 24.33,
  so 24 layers (the nominal depth is not exact, as in the reference).

  Raises:
    ValueError: if the depth leaves no layer per block.
  """
  convs_per_layer = 2 if bottleneck else 1
  n = (depth - 4) // (NUM_BLOCKS * convs_per_layer)
  if n < 1:
    raise ValueError(
        f"DenseNet depth {depth} is too shallow: need depth >= "
        f"{4 + NUM_BLOCKS * convs_per_layer} (bottleneck={bottleneck}).")
  return n


def channel_plan(depth: int, growth_rate: int, reduction: float,
                 bottleneck: bool) -> list[tuple[int, int]]:
  """Input and output channels of each dense block, by arithmetic.

  Returns:
    `[(in_0, out_0), (in_1, out_1), (in_2, out_2)]`; the transition after
    block i maps `out_i` to `in_{i+1} = floor(reduction * out_i)`, and
    `out_2` is the feature dimension.
  """
  n = layers_per_block(depth, bottleneck)
  plan, channels = [], 2 * growth_rate
  for block in range(NUM_BLOCKS):
    out = channels + n * growth_rate
    plan.append((channels, out))
    if block < NUM_BLOCKS - 1:
      channels = int(math.floor(out * reduction))
  return plan


class DenseLayer(nn.Module):
  """One dense layer; returns its input with `growth_rate` channels appended.

  Attributes:
    growth_rate: k, channels added.
    bottleneck: insert `BN-ReLU-Conv1x1(4k)` before the 3x3 conv.
    dtype: compute dtype.
    norm: the BatchNorm factory (`nc_jax.models.layers.batch_norm`'s).
  """
  growth_rate: int
  bottleneck: bool = True
  dtype: Dtype = jnp.float32
  norm: Callable[..., nn.Module] = batch_norm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """`(B, H, W, C)` -> `(B, H, W, C + k)`."""
    out = x
    if self.bottleneck:
      out = self.norm(train, activation="relu",
                       dtype=self.dtype, name="bn1")(out)
      out = nn.Conv(4 * self.growth_rate, (1, 1), use_bias=False,
                    kernel_init=KAIMING_NORMAL_FAN_OUT, dtype=self.dtype,
                    name="conv1")(out)
    out = self.norm(train, activation="relu",
                     dtype=self.dtype, name="bn2")(out)
    out = nn.Conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)),
                  use_bias=False, kernel_init=KAIMING_NORMAL_FAN_OUT,
                  dtype=self.dtype, name="conv2")(out)
    return jnp.concatenate([x, out.astype(x.dtype)], axis=-1)


class Transition(nn.Module):
  """BN-ReLU-Conv1x1-AvgPool2x2: compresses channels, halves resolution.

  Attributes:
    features: output channels.
    dtype: compute dtype.
    norm: the BatchNorm factory (`nc_jax.models.layers.batch_norm`'s).
  """
  features: int
  dtype: Dtype = jnp.float32
  norm: Callable[..., nn.Module] = batch_norm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """`(B, H, W, C)` -> `(B, floor(H/2), floor(W/2), features)`."""
    x = self.norm(train, activation="relu",
                   dtype=self.dtype, name="bn")(x)
    x = nn.Conv(self.features, (1, 1), use_bias=False,
                kernel_init=KAIMING_NORMAL_FAN_OUT, dtype=self.dtype,
                name="conv")(x)
    # 'VALID' floors odd sizes, like PyTorch's avg_pool2d(x, 2).
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class DenseNet(nn.Module):
  """The three-block CIFAR DenseNet backbone (no classifier).

  Attributes:
    depth: nominal depth; blocks get `floor((depth - 4) / 6)` bottleneck
      layers (`floor((depth - 4) / 3)` plain ones).
    growth_rate: k.
    reduction: compression theta of the transitions.
    bottleneck: use bottleneck layers (DenseNet-B).
    dtype: compute dtype (parameters stay float32).
    norm: the BatchNorm factory (`nc_jax.models.layers.batch_norm`'s
      signature).
  """
  depth: int = 150
  growth_rate: int = 12
  reduction: float = 0.5
  bottleneck: bool = True
  dtype: Dtype = jnp.float32
  norm: Callable[..., nn.Module] = batch_norm

  @property
  def feature_dim(self) -> int:
    """Width of the pooled features, known without initialising (510)."""
    return channel_plan(self.depth, self.growth_rate, self.reduction,
                        self.bottleneck)[-1][1]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Extracts features.

    Args:
      x: `(B, H, W, 3)` NHWC images; H, W >= 4 (two 2x2 pools).
      train: BatchNorm uses (and updates) batch statistics when True.

    Returns:
      `(B, feature_dim)` float32 globally average-pooled features.
    """
    plan = channel_plan(self.depth, self.growth_rate, self.reduction,
                        self.bottleneck)
    n = layers_per_block(self.depth, self.bottleneck)
    x = x.astype(self.dtype)
    x = nn.Conv(2 * self.growth_rate, (3, 3), padding=((1, 1), (1, 1)),
                use_bias=False, kernel_init=KAIMING_NORMAL_FAN_OUT,
                dtype=self.dtype, name="conv1")(x)
    for block in range(NUM_BLOCKS):
      for j in range(n):
        x = DenseLayer(self.growth_rate, self.bottleneck, dtype=self.dtype,
                       norm=self.norm,
                       name=f"block{block + 1}_{j}")(x, train)
      if block < NUM_BLOCKS - 1:
        x = Transition(plan[block + 1][0], dtype=self.dtype,
                       norm=self.norm,
                       name=f"trans{block + 1}")(x, train)
    x = self.norm(train, activation="relu",
                   dtype=self.dtype, name="bn")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def densenet_bc(*, dtype: Dtype = jnp.float32,
                norm: Callable[..., nn.Module] = batch_norm) -> DenseNet:
  """DenseNet-BC, depth 150, growth 12, reduction 0.5: 510-d features."""
  return DenseNet(depth=150, growth_rate=12, reduction=0.5, bottleneck=True,
                  dtype=dtype, norm=norm)
