"""ImageNet-pretrained ResNet-50 weights (torchvision's or timm's) for nc_jax.

Reads a PyTorch `state_dict` file (`.pth`, `.pt`, `.bin`; needs torch) or a
safetensors file (`.safetensors`; needs the `safetensors` package) in
torchvision's ResNet-50 layout, and puts its tensors into the backbone of an
nc_jax model (`resnet50_standard`, or `resnet50` for a file of the wide
4096-d variant). timm's `resnet50` uses the same names as torchvision's
(`conv1`, `bn1`, `layer{1..4}.{j}.conv{1,2,3}` / `bn{1,2,3}`,
`layer{s}.0.downsample.{0,1}`, `fc`), so one mapping reads both. Nothing is
ever downloaded: the caller gives the path of a file it already has.

The mapping, torch name -> nc_jax variable (under the model's `backbone`):

  conv1.weight                   params/conv1/kernel      OIHW -> HWIO
  bn1.{weight,bias}              params/bn1/{scale,bias}
  bn1.running_{mean,var}         batch_stats/bn1/{mean,var}
  layer{s}.{j}.conv{k}.*         .../layer{s}_{j}/conv{k}/...
  layer{s}.{j}.bn{k}.*           .../layer{s}_{j}/bn{k}/...
  layer{s}.{j}.downsample.0.*    .../layer{s}_{j}/downsample_conv/...
  layer{s}.{j}.downsample.1.*    .../layer{s}_{j}/downsample_bn/...

`*.num_batches_tracked` is ignored (nc_jax's BatchNorm has a fixed
momentum), and so is the ImageNet classifier `fc.*`: nc_jax's head is a
fixed ETF or a linear layer of its own for the task's classes, and it keeps
the variables it was initialised with.

Both sides agree on BatchNorm's epsilon (1e-5, `nc_jax.models.layers`), on
the stride sitting on the 3x3 conv (torchvision v1.5) and on the max pool's
padding, so a loaded model computes torchvision's features for the same
images (NHWC here, NCHW there), normalised as the weights expect (for
torchvision's: RGB in [0, 1], then ImageNet's mean and std).

Usage:
  model = create_model("resnet50_standard", num_classes=K, head="linear")
  variables = model.init(key, images, train=False)
  variables = load_backbone_variables("resnet50.pth",
                                      model_variables=variables)
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping

import flax.core
import jax.numpy as jnp
import numpy as np

# File kinds and reading live in weight_files; re-exported here, where
# users and the trainer look for them.
from nc_jax.weight_files import PretrainedError
from nc_jax.weight_files import SAFETENSORS_SUFFIXES
from nc_jax.weight_files import TORCH_SUFFIXES
from nc_jax.weight_files import _listed
from nc_jax.weight_files import check_file
from nc_jax.weight_files import read_state_dict

# nc_jax module (inside a bottleneck) -> torchvision module.
_BLOCK_MODULES = {
    "conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
    "conv3": "conv3", "bn3": "bn3",
    "downsample_conv": "downsample.0", "downsample_bn": "downsample.1",
}
_STEM_MODULES = ("conv1", "bn1")
_BLOCK_NAME = re.compile(r"layer(\d+)_(\d+)")

# (collection, nc_jax variable) -> torchvision parameter or buffer.
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}

_LAYOUT_HINT = (
    "nc_jax reads torchvision's (= timm's) ResNet-50 layout: "
    "'resnet50_standard' takes the standard 2048-d ResNet-50's weights, "
    "'resnet50' the reference's wide 4096-d variant's; fc.* and "
    "*.num_batches_tracked are ignored.")


def _natural_key(name: str) -> list[Any]:
  """Sort key putting layer2 before layer10 and block 2 before block 10."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _backbone_scope(model_variables: Mapping[str, Any]) -> tuple[str, ...]:
  """Where the backbone's variables sit under each collection.

  `("backbone",)` for an `ImageClassifier` (`params/backbone/...`), `()` for
  the variables of a bare `ResNet`.
  """
  params = model_variables.get("params") if isinstance(
      model_variables, Mapping) else None
  if not isinstance(params, Mapping) or "batch_stats" not in model_variables:
    raise PretrainedError(
        "model_variables must be a model's variables as model.init returns "
        "them, with 'params' and 'batch_stats' collections.")
  if "backbone" in params:
    return ("backbone",)
  if "conv1" in params:
    return ()
  raise PretrainedError(
      f"model_variables has no backbone (params holds {sorted(params)}); "
      "give the variables of a model from nc_jax.models.create_model.")


def _leaves(tree: Mapping[str, Any],
            path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, path + (key,))
    else:
      yield path + (key,), value


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
  """The torchvision name of nc_jax variable `collection/path`."""
  *modules, leaf = path
  prefix = None
  if len(modules) == 1 and modules[0] in _STEM_MODULES:
    prefix = modules[0]
  elif len(modules) == 2 and modules[1] in _BLOCK_MODULES:
    match = _BLOCK_NAME.fullmatch(modules[0])
    if match:
      prefix = (f"layer{match[1]}.{match[2]}."
                f"{_BLOCK_MODULES[modules[1]]}")
  if prefix is None or (collection, leaf) not in _LEAVES:
    raise PretrainedError(
        f"The model's backbone is not nc_jax's ImageNet ResNet (it has "
        f"{collection}/{'/'.join(path)}). Pretrained weights load into "
        "'resnet50_standard' (or 'resnet50' for the wide variant).")
  return f"{prefix}.{_LEAVES[collection, leaf]}"


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]
                 ) -> tuple[int, ...]:
  """nc_jax's shape in torch's layout: HWIO kernels are OIHW there."""
  if path[-1] == "kernel":
    h, w, i, o = shape
    return (o, i, h, w)
  return tuple(shape)


def _ignored(name: str) -> bool:
  return name.startswith("fc.") or name.endswith(".num_batches_tracked")


def backbone_variables_from_state_dict(
    state_dict: Mapping[str, Any], *, model_variables: Mapping[str, Any],
    source: str = "The state dict") -> Any:
  """`model_variables` with the backbone's replaced by `state_dict`'s.

  Args:
    state_dict: torchvision-layout tensors by name (numpy arrays, or
      anything `np.asarray` takes), e.g. from `read_state_dict`.
    model_variables: the model's initialised variables (`model.init`, or
      `jax.eval_shape` of it: only shapes and dtypes are read), of an
      `ImageClassifier` (backbone under `params/backbone` and
      `batch_stats/backbone`) or of a bare `ResNet`.
    source: how errors name the state dict (the file's path).

  Returns:
    New variables of the same structure (a `FrozenDict` if given one): every
    backbone conv kernel `(kh, kw, in, out)`, BN `scale` / `bias` `(C,)` and
    BN `mean` / `var` `(C,)` from the state dict, in the model's dtype; all
    other variables (the head's) are the given ones. `model_variables` is
    not modified.

  Raises:
    PretrainedError: the variables are not an ImageNet ResNet's, or the
      state dict has missing, unexpected or mis-shaped tensors (all listed,
      by torch name).
  """
  scope = _backbone_scope(model_variables)
  expected: dict[str, tuple[str, tuple[str, ...], Any]] = {}
  for collection in ("params", "batch_stats"):
    tree = model_variables[collection]
    for key in scope:
      tree = tree[key]
    for path, leaf in _leaves(tree):
      expected[_torch_name(collection, path)] = (collection, path, leaf)

  given = {name for name in state_dict if not _ignored(name)}
  missing = sorted(set(expected) - given, key=_natural_key)
  unexpected = sorted(given - set(expected), key=_natural_key)
  misshaped = []
  for name in sorted(set(expected) & given, key=_natural_key):
    _, path, leaf = expected[name]
    want = _torch_shape(path, tuple(leaf.shape))
    have = tuple(np.shape(state_dict[name]))
    if have != want:
      misshaped.append(f"{name} (file {have}, model {want})")
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {_listed(missing)}")
  if unexpected:
    hint = (" (keys start with 'module.': strip DataParallel's prefix)"
            if all(n.startswith("module.") for n in unexpected) else "")
    problems.append(
        f"{len(unexpected)} unexpected: {_listed(unexpected)}{hint}")
  if misshaped:
    problems.append(f"{len(misshaped)} of the wrong shape: "
                    f"{_listed(misshaped)}")
  if problems:
    raise PretrainedError(
        f"{source} does not fit the model's backbone ({len(expected)} "
        f"tensors expected): {'; '.join(problems)}. {_LAYOUT_HINT}")

  out = flax.core.unfreeze(model_variables)  # Nested dicts, fresh copies.
  for name, (collection, path, leaf) in expected.items():
    value = np.asarray(state_dict[name])
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    node = out[collection]
    for key in scope + path[:-1]:
      node = node[key]
    node[path[-1]] = jnp.asarray(value, dtype=leaf.dtype)
  if isinstance(model_variables, flax.core.FrozenDict):
    return flax.core.freeze(out)
  return out


def load_backbone_variables(path: str | os.PathLike[str], *,
                            model_variables: Mapping[str, Any]) -> Any:
  """Loads a torchvision/timm ResNet-50 weights file into the backbone.

  Args:
    path: a `.pth` / `.pt` / `.bin` PyTorch state_dict or a `.safetensors`
      file, in torchvision's ResNet-50 layout (timm's `resnet50` has the
      same names). Its `fc.*` head and `num_batches_tracked` are ignored.
    model_variables: the model's initialised variables (see
      `backbone_variables_from_state_dict`); the head's are kept.

  Returns:
    The variables with `params/backbone` and `batch_stats/backbone` from the
    file: ready for `model.apply(variables, images)` with images `(B, H, W,
    3)`, giving the file's network's `(B, d)` features.

  Raises:
    PretrainedError: see `read_state_dict` and
      `backbone_variables_from_state_dict`.
  """
  return backbone_variables_from_state_dict(
      read_state_dict(path), model_variables=model_variables,
      source=str(path))


__all__ = [
    "PretrainedError", "SAFETENSORS_SUFFIXES", "TORCH_SUFFIXES", "check_file",
    "backbone_variables_from_state_dict", "load_backbone_variables",
    "read_state_dict",
]


def check_request(config: Any) -> None:
  """A run's `pretrained` field, cheaply. For a run that starts afresh
  only: the file is read at step 0, and a resume restores its checkpoint
  instead (so a resume on a machine without the file works).

  Raises:
    ValueError: no file where the config requires one
      (`pretrained_required`), or a file that does not exist, has an
      unknown suffix or needs a missing package.
  """
  path = config.get("pretrained")
  if not path:
    if config.get("pretrained_required"):
      raise ValueError(
          "This config fine-tunes ImageNet-pretrained weights "
          "(pretrained_required): pass --config.pretrained= the path of a "
          "torchvision ResNet-50 state_dict (.pth) or a timm .safetensors "
          "file, or --config.pretrained_required=False to train from a "
          "random initialisation.")
    return
  check_file(path)


def into_state(path: str | os.PathLike[str], state: Any, *,
               num_replicas: int) -> Any:
  """A fresh train state with the backbone's weights and BatchNorm
  statistics read from `path` (every replica the same; the heads keep
  their own initialisation; the optimiser's state is zeros either way).

  Args:
    path: the weights file (`check_file`'s forms).
    state: a `steps.TrainState` from `Built.init_state()`, its arrays
      stacked over `num_replicas` when that is above 1.
    num_replicas: S.

  Raises:
    PretrainedError: a file that does not fit the backbone.
  """
  import jax  # pylint: disable=g-import-not-at-top
  variables = {"params": state.params, **state.model_state}
  # Replicated arrays: every process reads its own copy and builds the
  # same new ones (also where an array spans processes).
  host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), variables)
  one = host if num_replicas == 1 else jax.tree.map(lambda a: a[0], host)
  loaded = load_backbone_variables(path, model_variables=one)

  def put(new, old):  # one replica's array, broadcast over the S
    full = np.broadcast_to(np.asarray(new, old.dtype), old.shape)
    return jax.make_array_from_callback(old.shape, old.sharding,
                                        lambda index: full[index])
  out = {c: dict(v) for c, v in variables.items()}
  for collection, tree in loaded.items():
    if "backbone" in tree:
      out[collection]["backbone"] = jax.tree.map(
          put, dict(tree["backbone"]), dict(variables[collection]["backbone"]))
  params = out.pop("params")
  return state.replace(params=params, model_state=out)
