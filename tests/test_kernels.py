"""The kernels plugin's one decision: which layers a run's model is given.

Backend-independent: the backend is passed in, so the GPU/TPU decisions are
checked on any machine.
"""

from __future__ import annotations

import types

import pytest

from nc_jax import kernels
from nc_jax.kernels import onednn_build
from nc_jax.kernels import xla_setup

choose = kernels.choose


def _config(backbone="resnet32", conv_impl="auto", norm_impl="auto"):
  return types.SimpleNamespace(backbone=backbone, compute_dtype="float32",
                               conv_impl=conv_impl, norm_impl=norm_impl)


def test_cpu_float32_single_device_gets_the_cpu_kernels():
  k = choose(backbone="resnet32", backend="cpu", device_count=1)
  assert (k.conv, k.norm) == ("onednn", "fused")
  assert k.record() == {"conv_impl": "onednn", "norm_impl": "fused"}
  assert k.describe() == "onednn convolutions, fused BatchNorm"


@pytest.mark.parametrize("backend", ["gpu", "cuda", "rocm", "tpu"])
def test_accelerators_get_the_plain_path(backend):
  for backbone in ("resnet32", "resnet50", "densenet_bc"):
    k = choose(backbone=backbone, backend=backend, device_count=1)
    assert (k.conv, k.norm) == ("xla", "flax"), (backbone, k)
  # Asked for explicitly, the fused BatchNorm runs there too (it is plain
  # jnp with a custom VJP); oneDNN's CPU custom calls cannot.
  assert choose(backbone="resnet32", norm_impl="fused", backend=backend,
                device_count=1).norm == "fused"
  with pytest.raises(ValueError, match=f"the backend is {backend}, not cpu"):
    choose(backbone="resnet32", conv_impl="onednn", backend=backend,
           device_count=1)


def test_xla_convolutions_where_onednn_does_not_apply():
  # bfloat16, several devices, a backbone without the oneDNN path.
  assert choose(backbone="resnet32", compute_dtype="bfloat16", backend="cpu",
                device_count=1).conv == "xla"
  assert choose(backbone="resnet32", backend="cpu",
                device_count=8).conv == "xla"
  for backbone in ("resnet50", "densenet_bc"):
    k = choose(backbone=backbone, backend="cpu", device_count=1)
    assert (k.conv, k.norm) == ("xla", "fused")
  assert choose(backbone="resnet32", conv_impl="xla", norm_impl="flax",
                backend="cpu", device_count=1).record() == {
                    "conv_impl": "xla", "norm_impl": "flax"}


def test_impossible_requests_name_the_fix():
  with pytest.raises(ValueError, match="not float32.*'auto' or 'xla'"):
    choose(backbone="resnet32", compute_dtype="bfloat16", conv_impl="onednn",
           backend="cpu", device_count=1)
  with pytest.raises(ValueError, match="8 devices, not 1"):
    choose(backbone="resnet32", conv_impl="onednn", backend="cpu",
           device_count=8)
  with pytest.raises(ValueError, match="CIFAR ResNets, not 'densenet_bc'"):
    choose(backbone="densenet_bc", conv_impl="onednn", backend="cpu")
  with pytest.raises(ValueError, match="Unknown conv_impl 'cudnn'"):
    choose(backbone="resnet32", conv_impl="cudnn", backend="cpu")
  with pytest.raises(ValueError, match="Unknown norm_impl 'batch'"):
    choose(backbone="resnet32", norm_impl="batch", backend="cpu")
  with pytest.raises(ValueError, match="Unknown backbone"):
    choose(backbone="vgg", backend="cpu")


def _unbuildable(monkeypatch, reason):
  def load():
    raise onednn_build.KernelsUnavailable(reason)
  monkeypatch.setattr(onednn_build, "load_kernels", load)


def test_auto_falls_back_with_one_reason(monkeypatch):
  _unbuildable(monkeypatch, "no C++ compiler (g++ not on PATH; install g++ "
               "or set CXX)")
  k = kernels.resolve(_config(), backend="cpu", device_count=1)
  assert (k.conv, k.norm) == ("xla", "fused")
  assert k.describe() == (
      "xla convolutions (oneDNN kernels unavailable: no C++ compiler (g++ "
      "not on PATH; install g++ or set CXX)), fused BatchNorm")
  assert k.record() == {"conv_impl": "xla", "norm_impl": "fused"}
  with pytest.raises(ValueError) as e:
    kernels.resolve(_config(conv_impl="onednn"), backend="cpu",
                    device_count=1)
  assert "\n" not in str(e.value)
  assert "oneDNN kernels unavailable: no C++ compiler" in str(e.value)


def test_resolve_loads_only_what_it_chooses(monkeypatch):
  _unbuildable(monkeypatch, "must not be asked")
  for backend, backbone in (("gpu", "resnet32"), ("cpu", "resnet50")):
    k = kernels.resolve(_config(backbone), backend=backend, device_count=1)
    assert k.conv == "xla" and k.note is None


@pytest.mark.parametrize("env,want", [
    ({"JAX_PLATFORMS": "cpu"}, "cpu"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, "gpu"),
    ({"JAX_PLATFORMS": "rocm"}, "gpu"),
    ({"JAX_PLATFORMS": "tpu"}, "tpu"),
])
def test_likely_backend_follows_jax_platforms(env, want):
  assert xla_setup.likely_backend(env) == want


def test_likely_backend_needs_a_plugin_and_a_device(monkeypatch):
  monkeypatch.setattr(xla_setup, "_jax_plugins", lambda: ["xla_cuda12"])
  monkeypatch.setattr(xla_setup.glob, "glob",
                      lambda pattern: ["/dev/nvidia0"]
                      if pattern.startswith("/dev/nvidia") else [])
  assert xla_setup.likely_backend({}) == "gpu"
  monkeypatch.setattr(xla_setup.glob, "glob", lambda pattern: [])
  monkeypatch.setattr(xla_setup.os.path, "exists", lambda path: False)
  assert xla_setup.likely_backend({}) == "cpu"  # plugin, but no GPU
  monkeypatch.setattr(xla_setup, "_jax_plugins", lambda: [])
  monkeypatch.setattr(xla_setup.glob, "glob", lambda pattern: ["/dev/x"])
  monkeypatch.setattr(xla_setup, "_has_module", lambda name: False)
  assert xla_setup.likely_backend({}) == "cpu"  # device, but no plugin


def test_for_loading_falls_back_where_the_request_cannot_run():
  """A trained model is evaluated with what runs here: the parameters are
  the same whichever implementation computes them."""
  asked = _config(conv_impl="onednn", norm_impl="fused")
  with pytest.raises(ValueError, match="the backend is gpu"):
    kernels.resolve(asked, backend="gpu", device_count=1)
  k = kernels.resolve(asked, backend="gpu", device_count=1, for_loading=True)
  assert (k.conv, k.norm) == ("xla", "flax")


def test_layers_give_the_models_their_factories():
  from nc_jax.kernels import fused_norm  # pylint: disable=g-import-not-at-top
  from nc_jax.models import conv, layers  # pylint: disable=g-import-not-at-top
  opts = kernels.Layers("xla", "fused").model_options("resnet32")
  assert opts == {"norm": fused_norm.fused_batch_norm, "conv": conv.Conv}
  assert kernels.Layers("xla", "flax").model_options("resnet50") == {
      "norm": layers.batch_norm}
  with pytest.raises(ValueError, match="runs XLA's convolutions only"):
    kernels.Layers("onednn", "fused").model_options("densenet_bc")


def test_few_modules_name_the_kernels():
  """The plugin is one seam: the models never name it, and at most eight
  modules of nc_jax/ and experiments/ (its own files included) do."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(kernels.__file__).parents[2]
  pattern = re.compile(r"conv_impl|norm_impl|onednn|cpu_kernels", re.I)
  naming = sorted(str(p.relative_to(repo)) for d in ("nc_jax", "experiments")
                  for p in (repo / d).rglob("*.py")
                  if pattern.search(p.read_text()))
  assert len(naming) <= 8, naming
  assert not [n for n in naming if n.startswith("nc_jax/models/")], naming
