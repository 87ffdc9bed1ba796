"""The one decider of convolution and BatchNorm implementations.

Backend-independent: the backend is passed in, so the GPU/TPU decisions are
checked on any machine.
"""

from __future__ import annotations

import pytest

from nc_jax import cpu_kernels
from nc_jax import implementations as impl_lib

choose = impl_lib.choose


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
    raise cpu_kernels.KernelsUnavailable(reason)
  monkeypatch.setattr(cpu_kernels, "load", load)


def test_auto_falls_back_with_one_reason(monkeypatch):
  _unbuildable(monkeypatch, "no C++ compiler (g++ not on PATH; install g++ "
               "or set CXX)")
  k = impl_lib.resolve(backbone="resnet32", backend="cpu", device_count=1)
  assert (k.conv, k.norm) == ("xla", "fused")
  assert k.describe() == (
      "xla convolutions (oneDNN kernels unavailable: no C++ compiler (g++ "
      "not on PATH; install g++ or set CXX)), fused BatchNorm")
  assert k.record() == {"conv_impl": "xla", "norm_impl": "fused"}
  with pytest.raises(ValueError) as e:
    impl_lib.resolve(backbone="resnet32", conv_impl="onednn",
                        backend="cpu", device_count=1)
  assert "\n" not in str(e.value)
  assert "oneDNN kernels unavailable: no C++ compiler" in str(e.value)


def test_resolve_loads_only_what_it_chooses(monkeypatch):
  _unbuildable(monkeypatch, "must not be asked")
  for backend, backbone in (("gpu", "resnet32"), ("cpu", "resnet50")):
    k = impl_lib.resolve(backbone=backbone, backend=backend,
                            device_count=1)
    assert k.conv == "xla" and k.note is None


@pytest.mark.parametrize("env,want", [
    ({"JAX_PLATFORMS": "cpu"}, "cpu"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, "gpu"),
    ({"JAX_PLATFORMS": "rocm"}, "gpu"),
    ({"JAX_PLATFORMS": "tpu"}, "tpu"),
])
def test_likely_backend_follows_jax_platforms(env, want):
  assert impl_lib.likely_backend(env) == want


def test_likely_backend_needs_a_plugin_and_a_device(monkeypatch):
  monkeypatch.setattr(impl_lib, "_jax_plugins", lambda: ["xla_cuda12"])
  monkeypatch.setattr(impl_lib.glob, "glob",
                      lambda pattern: ["/dev/nvidia0"]
                      if pattern.startswith("/dev/nvidia") else [])
  assert impl_lib.likely_backend({}) == "gpu"
  monkeypatch.setattr(impl_lib.glob, "glob", lambda pattern: [])
  monkeypatch.setattr(impl_lib.os.path, "exists", lambda path: False)
  assert impl_lib.likely_backend({}) == "cpu"  # plugin, but no GPU
  monkeypatch.setattr(impl_lib, "_jax_plugins", lambda: [])
  monkeypatch.setattr(impl_lib.glob, "glob", lambda pattern: ["/dev/x"])
  monkeypatch.setattr(impl_lib, "_has_module", lambda name: False)
  assert impl_lib.likely_backend({}) == "cpu"  # device, but no plugin
