"""Backbones and heads, assembled by name: `create_model(name, ...)`.

A model is an `ImageClassifier`: a backbone (images -> pooled features) and a
head (features -> logits). Both are looked up in explicit registries:

  BACKBONES  resnet8 / resnet20 (64-d; small CIFAR ResNets for tests and
             smoke runs), resnet32 (64-d), resnet32_c100 (128-d), densenet_bc (510-d),
             resnet50 (4096-d, the reference's widened layer4;
             `wide_layer4=False` for 2048-d), resnet50_standard (2048-d,
             torchvision's widths; what `nc_jax.pretrained` loads
             ImageNet weights into)
  HEADS      linear (learnable, or frozen with `freeze_classifier=True`),
             cosine (LDAM's normalised linear layer, cosine logits),
             etf (fixed simplex ETF given at call time; option
             `l2_normalize`)

Usage:
  model = create_model("resnet32", num_classes=10, head="etf")
  etf = nc_jax.etf.replica_etfs(10, model.feature_dim, seed=0)
  variables = model.init(key, images, train=False, classifier=etf)
  logits, feats = model.apply(variables, images, train=False, classifier=etf)
  (logits, feats), updates = model.apply(
      variables, images, train=True, mutable=["batch_stats"], classifier=etf)

Heads with learnable weights take no `classifier` argument.

Layers are given, not chosen: a model takes its BatchNorm as the option
`norm` (a factory with `nc_jax.models.layers.batch_norm`'s signature, the
default) and the CIFAR ResNets their convolution as `conv` (a factory with
`nc_jax.models.conv.Conv`'s, the default). Which a run uses is decided
outside the models, by `nc_jax.kernels`, and passed in by the builder.

References:
  Yang, Chen, Li, Xie, Lin, Tao. Inducing Neural Collapse in Imbalanced
  Learning: Do We Really Need a Learnable Classifier at the End of Deep Neural
  Network? NeurIPS 2022. arXiv:2203.09081.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models import densenet, heads, resnet, resnet_cifar
from nc_jax.models.heads import CosineHead, ETFHead, LinearHead

# name -> factory(*, **backbone_options) returning a backbone Module with a
# `feature_dim` property. Keyword-only parameters of the factory are the
# backbone's options.
BACKBONES: Mapping[str, Callable[..., nn.Module]] = {
    "resnet8": resnet_cifar.resnet8,
    "resnet20": resnet_cifar.resnet20,
    "resnet32": resnet_cifar.resnet32,
    "resnet32_c100": resnet_cifar.resnet32_c100,
    "densenet_bc": densenet.densenet_bc,
    "resnet50": resnet.resnet50,
    "resnet50_standard": resnet.resnet50_standard,
}

# name -> factory(num_classes, feature_dim, *, **head_options).
HEADS: Mapping[str, Callable[..., nn.Module]] = {
    "linear": heads.linear_head,
    "cosine": heads.cosine_head,
    "etf": heads.etf_head,
}

# Heads whose classifier is fixed and passed in (`classifier=`), not learnt.
FIXED_CLASSIFIER_HEADS = frozenset({"etf"})


class ImageClassifier(nn.Module):
  """Backbone followed by a classifier head.

  Attributes:
    backbone: images `(B, H, W, 3)` -> features `(B, d)`; has `feature_dim`.
    head: a `LinearHead`, `CosineHead` or `ETFHead` for `(d, num_classes)`.

  Variables: `params/{backbone,head}/...`, `batch_stats/{backbone,head}/...`
  and, for a frozen linear head, `frozen/head/{kernel,bias}`.
  """
  backbone: nn.Module
  head: nn.Module

  @property
  def num_classes(self) -> int:
    return self.head.num_classes

  @property
  def feature_dim(self) -> int:
    """d, the width of the features that enter the classifier."""
    return self.backbone.feature_dim

  @property
  def head_name(self) -> str:
    return self.head.head_name

  def __call__(self, images: jax.Array, train: bool = False,
               classifier: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Classifies a batch of images.

    Args:
      images: `(B, H, W, 3)` NHWC float images (normalised by the caller).
      train: BatchNorm uses batch statistics and updates `batch_stats`
        (pass `mutable=['batch_stats']` to `apply`); eval uses running ones.
      classifier: the `(d, K)` fixed classifier for heads in
        `FIXED_CLASSIFIER_HEADS` (the ETF); None for the others.

    Returns:
      `(logits, features)`: `(B, num_classes)` and `(B, feature_dim)`, both
      float32. `features` are what the classifier sees: for `etf`, after
      BatchNorm and L2 normalisation; for `cosine`, L2-normalised; for
      `linear`, the pooled backbone output.
    """
    return self.head(self.backbone(images, train=train), train=train,
                     classifier=classifier)


def _keyword_options(factory: Callable[..., Any]) -> dict[str, Any]:
  """Keyword-only parameters of a registry factory and their defaults."""
  return {p.name: p.default
          for p in inspect.signature(factory).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


def backbone_options(name: str) -> dict[str, Any]:
  """The keyword options of backbone `name` and their defaults."""
  if name not in BACKBONES:
    raise ValueError(f"Unknown backbone {name!r}; valid names: "
                     f"{', '.join(sorted(BACKBONES))}.")
  return _keyword_options(BACKBONES[name])


def takes_conv(name: str) -> bool:
  """Whether backbone `name` takes its convolution as an option (`conv`).

  The CIFAR ResNets do; the others use `flax.linen.Conv`.

  Raises:
    ValueError: unknown backbone.
  """
  return "conv" in backbone_options(name)


def create_model(name: str, *, num_classes: int, head: str,
                 **options: Any) -> ImageClassifier:
  """Builds a classifier from the registries.

  Args:
    name: backbone name, a key of `BACKBONES`.
    num_classes: K.
    head: head name, a key of `HEADS` (`linear` or `etf`).
    **options: backbone options (`dtype` for all, the compute dtype, e.g.
      `jnp.bfloat16`; parameters stay float32 and outputs are float32;
      `norm` for all, the BatchNorm factory, see
      `nc_jax.models.layers.batch_norm`; `conv` for the CIFAR ResNets, the
      convolution factory, see `nc_jax.models.conv.Conv`; `wide_layer4`
      for `resnet50`) and head options (`freeze_classifier` for `linear`;
      `l2_normalize` and `norm` for `etf`). `norm` goes to the backbone and
      to the head. An option that belongs to the other head is accepted and
      ignored (so one config can drive both heads; none of them changes the
      chosen head's meaning).

  Returns:
    An unbound `ImageClassifier` with `num_classes`, `feature_dim` and
    `head_name` attributes.

  Raises:
    ValueError: for an unknown backbone, head or option (listing the valid
      ones), or (from `nc_jax.etf`) when the etf head's feature dimension is
      below `num_classes - 1`.
  """
  if name not in BACKBONES:
    raise ValueError(f"Unknown backbone {name!r}; valid names: "
                     f"{', '.join(sorted(BACKBONES))}.")
  if head not in HEADS:
    raise ValueError(f"Unknown head {head!r}; valid heads: "
                     f"{', '.join(sorted(HEADS))}.")
  backbone_factory, head_factory = BACKBONES[name], HEADS[head]
  backbone_keys = set(_keyword_options(backbone_factory))
  head_keys = set(_keyword_options(head_factory))
  other_head_keys = {k for f in HEADS.values() for k in _keyword_options(f)}
  backbone_opts, head_opts = {}, {}
  for key, value in options.items():
    if key in backbone_keys:
      backbone_opts[key] = value
    if key in head_keys:
      head_opts[key] = value
    if key not in backbone_keys | head_keys | other_head_keys:
      valid = sorted(backbone_keys | head_keys)
      raise ValueError(
          f"Unknown option {key!r} for backbone {name!r} with head {head!r};"
          f" valid options: {', '.join(valid)}.")
  backbone = backbone_factory(**backbone_opts)
  return ImageClassifier(
      backbone=backbone,
      head=head_factory(num_classes, backbone.feature_dim, **head_opts))


def classifier_weights(module: ImageClassifier,
                       variables: Mapping[str, Any],
                       classifier: jax.Array | None = None) -> jax.Array:
  """The classifier matrix `(d, K)` that the logits are computed with.

  Differentiable in `variables`, so a loss may use it (e.g. a learnt head's
  class vectors).

  Args:
    module: a model from `create_model`.
    variables: its variables (as returned by `init`, or a train state's).
    classifier: the fixed `(d, K)` matrix passed to an `etf` head's calls;
      required for it, ignored by the others.

  Returns:
    For `etf`, `classifier` itself (the head has no weights of its own);
    for `linear`, the kernel from `params` or, when frozen, from `frozen`;
    for `cosine`, the kernel with unit-norm columns. Float32.
  """
  head = module.head
  if isinstance(head, ETFHead):
    if classifier is None:
      raise ValueError("The etf head's classifier is the fixed ETF passed to "
                       "it; give it as classifier=.")
    return jnp.asarray(classifier, jnp.float32)
  if isinstance(head, LinearHead):
    collection = "frozen" if head.freeze else "params"
    return jnp.asarray(variables[collection]["head"]["kernel"], jnp.float32)
  if isinstance(head, CosineHead):
    return heads.normalized_columns(variables["params"]["head"]["kernel"])
  raise TypeError(f"No classifier weights for head {type(head).__name__}.")


__all__ = [
    "BACKBONES", "FIXED_CLASSIFIER_HEADS", "HEADS", "ImageClassifier",
    "backbone_options", "create_model", "takes_conv",
    "classifier_weights",
]
