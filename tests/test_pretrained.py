"""Loading torchvision-layout ResNet-50 weights (`nc_jax.pretrained`).

The reference is an independent PyTorch forward pass written here with
`torch.nn.functional` (torchvision is not a dependency): a random state dict
in torchvision's exact names and shapes, with non-trivial BatchNorm running
statistics, must give the same logits through nc_jax's `resnet50_standard`
after loading it from a `.pth` and from a `.safetensors` file.
"""

from __future__ import annotations

import math
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F

from nc_jax import models, pretrained
from nc_jax.models import layers
from nc_jax.pretrained import PretrainedError

KEY = jax.random.key(0, impl="unsafe_rbg")  # Cheap to compile (test_models).
NUM_CLASSES = 1000  # torchvision's fc, so the file has its exact shapes.
STAGES = (3, 4, 6, 3)
PLANES = (64, 128, 256, 512)
TORCH_BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, as torchvision uses.


def _torchvision_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
  """Random weights named and shaped as torchvision's `resnet50()`.

  BN statistics are far from 0/1, so a mix-up of mean/var, scale/bias or a
  missing running-statistics load shows in the logits.
  """
  g = torch.Generator().manual_seed(seed)
  sd: dict[str, torch.Tensor] = {}

  def conv(name: str, out: int, inp: int, k: int) -> None:
    std = math.sqrt(2.0 / (out * k * k))  # Kaiming fan-out, as torchvision.
    sd[f"{name}.weight"] = torch.randn(out, inp, k, k, generator=g) * std

  def bn(name: str, c: int) -> None:
    sd[f"{name}.weight"] = 0.5 + torch.rand(c, generator=g)
    sd[f"{name}.bias"] = 0.2 * torch.randn(c, generator=g)
    sd[f"{name}.running_mean"] = 0.3 * torch.randn(c, generator=g)
    sd[f"{name}.running_var"] = 0.5 + 1.5 * torch.rand(c, generator=g)
    sd[f"{name}.num_batches_tracked"] = torch.tensor(1234)

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  inplanes = 64
  for s, (blocks, planes) in enumerate(zip(STAGES, PLANES)):
    for j in range(blocks):
      p = f"layer{s + 1}.{j}"
      conv(f"{p}.conv1", planes, inplanes, 1)
      bn(f"{p}.bn1", planes)
      conv(f"{p}.conv2", planes, planes, 3)
      bn(f"{p}.bn2", planes)
      conv(f"{p}.conv3", 4 * planes, planes, 1)
      bn(f"{p}.bn3", 4 * planes)
      if j == 0:
        conv(f"{p}.downsample.0", 4 * planes, inplanes, 1)
        bn(f"{p}.downsample.1", 4 * planes)
      inplanes = 4 * planes
  sd["fc.weight"] = torch.randn(NUM_CLASSES, 2048, generator=g) / 2048**0.5
  sd["fc.bias"] = 0.1 * torch.randn(NUM_CLASSES, generator=g)
  return sd


def _torch_forward(sd: dict[str, torch.Tensor], x: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
  """torchvision's ResNet-50 in eval mode: NCHW images -> (logits, feats)."""

  def bn(h: torch.Tensor, name: str) -> torch.Tensor:
    return F.batch_norm(h, sd[f"{name}.running_mean"],
                        sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=TORCH_BN_EPS)

  x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
  x = F.max_pool2d(x, 3, 2, 1)
  for s, blocks in enumerate(STAGES):
    for j in range(blocks):
      p = f"layer{s + 1}.{j}"
      stride = 2 if s > 0 and j == 0 else 1  # v1.5: on the 3x3 conv.
      out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
      out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride,
                               padding=1), f"{p}.bn2"))
      out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
      shortcut = x
      if f"{p}.downsample.0.weight" in sd:
        shortcut = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"],
                               stride=stride), f"{p}.downsample.1")
      x = F.relu(out + shortcut)
  feats = F.adaptive_avg_pool2d(x, 1).flatten(1)
  return F.linear(feats, sd["fc.weight"], sd["fc.bias"]), feats


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  """The state dict, both files, the model, its variables and the images."""
  sd = _torchvision_state_dict()
  tmp = tmp_path_factory.mktemp("pretrained")
  torch.save(sd, tmp / "resnet50.pth")
  arrays = {k: v.numpy() for k, v in sd.items()}
  safetensors.numpy.save_file(arrays, str(tmp / "resnet50.safetensors"))
  model = models.create_model("resnet50_standard", num_classes=NUM_CLASSES,
                              head="linear")
  rng = np.random.default_rng(1)
  images = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
  # The loader reads only shapes and dtypes, so stand-in "initialised"
  # variables (a distinctive constant) spare compiling model.init; the head
  # must come back holding them.
  shapes = jax.eval_shape(lambda x: model.init(KEY, x, train=False), images)
  variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.25, s.dtype), shapes)
  # One jitted apply, shared by both file formats (one compilation).
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return dict(sd=sd, arrays=arrays, tmp=tmp, model=model, images=images,
              shapes=shapes, variables=variables, apply=apply)


def test_state_dict_is_torchvisions_layout(case):
  # torchvision's resnet50 has 25,557,032 parameters, 53 BatchNorms.
  sd = case["sd"]
  n_params = sum(v.numel() for k, v in sd.items()
                 if k.endswith((".weight", ".bias")))
  assert n_params == 25_557_032
  assert sum(k.endswith(".running_var") for k in sd) == 53
  # The BatchNorm epsilons agree, so the comparison below needs no fudge.
  assert layers.BN_EPSILON == TORCH_BN_EPS


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loaded_model_matches_torch_forward(case, suffix):
  images, sd = case["images"], case["sd"]
  variables = pretrained.load_backbone_variables(
      case["tmp"] / f"resnet50{suffix}", model_variables=case["variables"])
  # The head keeps its initialised variables; compare logits through the
  # file's fc by putting it there.
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(variables["params"]["head"][name],
                                  case["variables"]["params"]["head"][name])
  head = {"kernel": jnp.asarray(sd["fc.weight"].numpy().T),
          "bias": jnp.asarray(sd["fc.bias"].numpy())}
  variables = {**variables, "params": {**variables["params"], "head": head}}
  logits, feats = case["apply"](variables, images)
  with torch.no_grad():
    want_logits, want_feats = _torch_forward(
        sd, torch.from_numpy(images).permute(0, 3, 1, 2))
  want_logits, want_feats = want_logits.numpy(), want_feats.numpy()
  scale = np.abs(want_logits).max()
  err = np.abs(np.asarray(logits) - want_logits).max()
  print(f"{suffix}: max |logit diff| / max |logit| = {err / scale:.3g}")
  assert scale > 1e-3  # Not a degenerate (all-zero) network.
  assert err <= 1e-4 * scale
  feat_err = np.abs(np.asarray(feats) - want_feats).max()
  assert feat_err <= 1e-4 * np.abs(want_feats).max()


def test_given_variables_are_not_modified(case):
  before = np.asarray(case["variables"]["params"]["backbone"]["conv1"]
                      ["kernel"]).copy()
  out = pretrained.backbone_variables_from_state_dict(
      case["arrays"], model_variables=case["variables"])
  np.testing.assert_array_equal(
      case["variables"]["params"]["backbone"]["conv1"]["kernel"], before)
  np.testing.assert_array_equal(
      out["params"]["backbone"]["conv1"]["kernel"],
      case["arrays"]["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      out["batch_stats"]["backbone"]["layer2_0"]["downsample_bn"]["var"],
      case["arrays"]["layer2.0.downsample.1.running_var"])
  frozen = pretrained.backbone_variables_from_state_dict(
      case["arrays"], model_variables=flax.core.freeze(case["variables"]))
  assert isinstance(frozen, flax.core.FrozenDict)


def _shapes(name: str, size: int = 32):
  """Abstract variables of backbone `name` with a linear head."""
  model = models.create_model(name, num_classes=10, head="linear")
  return jax.eval_shape(lambda x: model.init(KEY, x, train=False),
                        np.zeros((1, size, size, 3), np.float32))


def _load_error(arrays, variables, match: str) -> str:
  with pytest.raises(PretrainedError, match=match) as info:
    pretrained.backbone_variables_from_state_dict(arrays,
                                                  model_variables=variables)
  return str(info.value)


def test_missing_tensor_is_named(case):
  arrays = dict(case["arrays"])
  del arrays["layer3.2.bn2.running_mean"]
  path = case["tmp"] / "missing.safetensors"
  safetensors.numpy.save_file(arrays, str(path))
  with pytest.raises(PretrainedError,
                     match=r"1 missing: layer3\.2\.bn2\.running_mean\b"):
    pretrained.load_backbone_variables(path,
                                       model_variables=case["variables"])


def test_unexpected_tensor_is_named(case):
  arrays = dict(case["arrays"], **{"layer1.0.se.fc1.weight": np.zeros(3)})
  msg = _load_error(arrays, case["variables"],
                    r"1 unexpected: layer1\.0\.se\.fc1\.weight")
  assert "missing" not in msg and "wrong shape" not in msg


def test_misshaped_tensor_is_named(case):
  arrays = dict(case["arrays"])
  arrays["layer2.1.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  _load_error(arrays, case["variables"],
              r"1 of the wrong shape: layer2\.1\.conv2\.weight \(file "
              r"\(128, 128, 1, 1\), model \(128, 128, 3, 3\)\)")


def test_standard_file_into_wide_model_is_misshaped(case):
  # The 2048-d file into the reference's 4096-d backbone: same names,
  # layer4 shapes differ (20 tensors in layer4.0, 15 in each later block).
  with pytest.raises(PretrainedError) as info:
    pretrained.load_backbone_variables(case["tmp"] / "resnet50.pth",
                                       model_variables=_shapes("resnet50"))
  msg = str(info.value)
  assert "50 of the wrong shape: layer4.0.bn1.bias (file (512,), model " \
         "(1024,))" in msg
  assert "and 40 more" in msg and "missing" not in msg
  assert "'resnet50_standard'" in msg
  assert str(case["tmp"] / "resnet50.pth") in msg


def test_ignored_and_abstract_variables(case):
  # fc.* and num_batches_tracked are not needed; shapes suffice as input.
  arrays = {k: v for k, v in case["arrays"].items()
            if not k.startswith("fc.") and "num_batches" not in k}
  out = pretrained.backbone_variables_from_state_dict(
      arrays, model_variables=case["shapes"])
  assert isinstance(out["params"]["head"]["kernel"], jax.ShapeDtypeStruct)
  assert out["params"]["backbone"]["bn1"]["scale"].dtype == jnp.float32


def test_other_backbones_are_refused(case):
  # The CIFAR ResNets share torchvision's module names, not its shapes.
  _load_error(case["arrays"], _shapes("resnet8"),
              r"of the wrong shape: bn1\.bias \(file \(64,\), model "
              r"\(16,\)\).*'resnet50_standard'")
  _load_error(case["arrays"], _shapes("densenet_bc"),
              "backbone is not nc_jax's ImageNet ResNet")
  with pytest.raises(PretrainedError, match="'params' and 'batch_stats'"):
    pretrained.backbone_variables_from_state_dict(
        case["arrays"], model_variables={"params": {}})


def test_nonexistent_path(tmp_path):
  with pytest.raises(PretrainedError, match="No pretrained-weights file at "
                     ".*nope.pth.*never downloads"):
    pretrained.load_backbone_variables(tmp_path / "nope.pth",
                                       model_variables={})


def test_unknown_extension(tmp_path):
  path = tmp_path / "weights.npz"
  path.write_bytes(b"0")
  with pytest.raises(PretrainedError, match=r"Unknown pretrained-weights "
                     r"file type '\.npz'.*\.pth.*\.safetensors"):
    pretrained.read_state_dict(path)


def test_not_a_state_dict(tmp_path):
  path = tmp_path / "ckpt.pth"
  torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "epoch": 3},
             path)
  with pytest.raises(PretrainedError,
                     match="entries state_dict, epoch are not tensors"):
    pretrained.read_state_dict(path)


def test_missing_safetensors_package(tmp_path, monkeypatch):
  path = tmp_path / "w.safetensors"
  path.write_bytes(b"0")
  monkeypatch.setitem(sys.modules, "safetensors", None)
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(PretrainedError, match=r"needs the safetensors package:"
                     r" pip install safetensors"):
    pretrained.read_state_dict(path)


def test_missing_torch(tmp_path, monkeypatch):
  path = tmp_path / "w.pth"
  path.write_bytes(b"0")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(PretrainedError, match=r"needs torch: pip install torch"
                     r".*nc_jax\[pretrained-torch\]"):
    pretrained.read_state_dict(path)


@pytest.mark.slow
def test_every_replica_starts_from_the_file(case):
  """`pretrained.into_state` with num_seeds=2: both replicas' backbones and
  BatchNorm statistics are the file's; their heads keep their own draws."""
  from nc_jax.configs import cifar_lt  # pylint: disable=g-import-not-at-top
  from nc_jax import builder, sharding  # pylint: disable=g-import-not-at-top
  path = case["tmp"] / "resnet50.safetensors"
  config = cifar_lt.get_config("cub200_ce,steps=2")
  config.unlock()
  config.update(dict(pretrained=str(path), num_seeds=2, batch_size=2))
  config.optim.decay_epochs = ()
  config.lock()
  built = builder.build(config, num_classes=200, image_shape=(64, 64, 3),
                        mean=(0.5,) * 3, std=(0.25,) * 3,
                        class_counts=[1] * 200, steps_per_epoch=1,
                        total_steps=2, mesh=sharding.make_mesh())
  fresh = built.init_state()
  state = pretrained.into_state(built.pretrained, fresh, num_replicas=2)
  want = case["arrays"]["layer2.1.conv2.weight"].transpose(
      2, 3, 1, 0)
  got = np.asarray(state.params["backbone"]["layer2_1"]["conv2"]["kernel"])
  np.testing.assert_array_equal(got, np.stack([want, want]))
  var = np.asarray(
      state.model_state["batch_stats"]["backbone"]["bn1"]["var"])
  np.testing.assert_array_equal(
      var, np.stack([case["arrays"]["bn1.running_var"]] * 2))
  head = jax.tree.leaves(state.params["head"])[0]
  np.testing.assert_array_equal(head, jax.tree.leaves(fresh.params["head"])[0])
  assert not np.array_equal(head[0], head[1])


@pytest.mark.parametrize("name,content,match", [
    ("w.pth", b"not weights at all", "not a PyTorch file"),
    ("w.safetensors", b"\xff" * 8 + b"{}", "not a safetensors file"),
    ("w.safetensors", b"", "not a safetensors file"),
])
def test_a_wrong_file_is_refused_before_the_run_starts(tmp_path, name,
                                                       content, match):
  """`check_request` (run before the workdir is written) reads the first
  bytes: a file of another kind stops the run there."""
  path = tmp_path / name
  path.write_bytes(content)
  config = ml_collections.ConfigDict({"pretrained": str(path),
                                      "pretrained_required": False})
  with pytest.raises(PretrainedError, match=match):
    pretrained.check_request(config)


def test_real_files_pass_the_header_check(tmp_path):
  torch_path = tmp_path / "w.pth"
  torch.save({"w": torch.zeros(2)}, torch_path)
  st_path = tmp_path / "w.safetensors"
  safetensors.numpy.save_file({"w": np.zeros(2, np.float32)}, str(st_path))
  for path in (torch_path, st_path):
    assert pretrained.check_file(path) == path
