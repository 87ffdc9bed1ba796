"""The oneDNN convolution kernels (nc_jax.kernels.onednn_*) against XLA's.

They are CPU custom calls built for x86-64 Linux: these tests run where the
default backend is the CPU on such a machine, and skip elsewhere (on a GPU
or TPU host, the kernels are never chosen; `tests/test_kernels.py` checks
that decision on every backend).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import types

from nc_jax import etf as etf_lib
from nc_jax import kernels
from nc_jax import models
from nc_jax.kernels import fused_norm
from nc_jax.kernels import onednn_build
from nc_jax.kernels import onednn_conv
from nc_jax.models import conv as conv_lib

RESNET32 = types.SimpleNamespace(backbone="resnet32", compute_dtype="float32",
                                 conv_impl="auto", norm_impl="auto")

BACKEND = jax.default_backend()
pytestmark = [
    pytest.mark.skipif(
        BACKEND != "cpu",
        reason=f"the oneDNN kernels are CPU custom calls; the default backend "
        f"here is {BACKEND}, where nc_jax uses XLA's convolutions"),
    pytest.mark.skipif(
        not (sys.platform.startswith("linux")
             and platform.machine() in ("x86_64", "AMD64")),
        reason="the oneDNN kernels are built for x86-64 Linux only"),
]


@pytest.fixture(scope="module", autouse=True)
def loaded():
  # CI installs the oneDNN wheels (the test extra) and has g++: the fast
  # path must be there, not silently replaced by the fallback.
  onednn_build.load_kernels()


def _xla_conv(x, k, strides, padding):
  return jax.lax.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def test_kernels_are_built_here():
  assert onednn_build.available(), onednn_build.unavailable_reason()
  assert os.path.exists(onednn_build.library_path())
  assert kernels.resolve(RESNET32).conv == "onednn"


# (N, H, W, Ci, Co, KH, KW, strides, padding)
CASES = [
    (4, 8, 8, 3, 16, 3, 3, (1, 1), ((1, 1), (1, 1))),      # stem
    (4, 8, 8, 16, 16, 3, 3, (1, 1), ((1, 1), (1, 1))),     # block
    (3, 8, 8, 16, 32, 3, 3, (2, 2), ((1, 1), (1, 1))),     # downsampling
    (2, 9, 7, 5, 6, 3, 3, (2, 1), ((1, 0), (2, 1))),       # odd everything
    (2, 6, 6, 8, 4, 1, 1, (1, 1), ((0, 0), (0, 0))),       # 1x1
    (1, 5, 5, 2, 3, 5, 5, (1, 1), ((2, 2), (2, 2))),       # 5x5, batch 1
]


@pytest.mark.parametrize("n,h,w,ci,co,kh,kw,strides,padding", CASES)
def test_onednn_matches_xla_values_and_gradients(n, h, w, ci, co, kh, kw,
                                                 strides, padding):
  rng = np.random.default_rng(n * 100 + ci)
  x = jnp.asarray(rng.normal(size=(n, h, w, ci)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kh, kw, ci, co)) / np.sqrt(kh * kw * ci),
                  jnp.float32)
  y_ref, vjp_ref = jax.vjp(lambda a, b: _xla_conv(a, b, strides, padding),
                           x, k)
  f = jax.jit(lambda a, b: onednn_conv.conv2d(a, b, strides=strides,
                                               padding=padding))
  y, vjp = jax.vjp(f, x, k)
  chex.assert_shape(y, y_ref.shape)
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  chex.assert_trees_all_close(vjp(g), vjp_ref(g), atol=1e-4, rtol=1e-5)


def test_a_wrong_gradient_would_be_caught():
  # The comparison above is sensitive: a 1e-3 relative error in the weight
  # gradient of a realistic layer is far outside its tolerance.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 16, 16, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 16, 16)) / 12, jnp.float32)
  pad = ((1, 1), (1, 1))
  g = jnp.asarray(rng.normal(size=(8, 16, 16, 16)), jnp.float32)
  _, vjp = jax.vjp(lambda b: onednn_conv.conv2d(x, b, strides=(1, 1),
                                                 padding=pad), k)
  _, vjp_ref = jax.vjp(lambda b: _xla_conv(x, b, (1, 1), pad), k)
  (dk,), (dk_ref,) = vjp(g), vjp_ref(g)
  chex.assert_trees_all_close(dk, dk_ref, atol=1e-4, rtol=1e-5)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(dk * (1 + 1e-3), dk_ref, atol=1e-4,
                                rtol=1e-5)


def test_vmap_over_replicas():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  ks = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)), jnp.float32)
  pad = ((1, 1), (1, 1))

  def loss(k, compute):
    return jnp.sum(compute(x, k, strides=(1, 1), padding=pad) ** 2)

  got = jax.jit(jax.vmap(jax.grad(lambda k: loss(k, onednn_conv.conv2d))))(
      ks)
  want = jax.vmap(jax.grad(lambda k: loss(k, conv_lib.xla_conv2d)))(ks)
  chex.assert_trees_all_close(got, want, atol=1e-3, rtol=1e-5)


@pytest.mark.slow
def test_model_is_the_same_with_either_kernels():
  images = jnp.asarray(np.random.default_rng(2).normal(size=(8, 32, 32, 3)),
                       jnp.float32)
  labels = jnp.arange(8) % 10
  outs = {}
  for impl, conv in (("xla", conv_lib.Conv),
                     ("onednn", onednn_conv.onednn_conv)):
    model = models.create_model("resnet8", num_classes=10, head="etf",
                                conv=conv, norm=fused_norm.fused_batch_norm)
    etf = etf_lib.simplex_etf(10, model.feature_dim)
    variables = model.init(jax.random.PRNGKey(0), images, train=False,
                           classifier=etf)

    def loss_fn(params, model=model, variables=variables, etf=etf):
      (logits, _), _ = model.apply(dict(variables, params=params), images,
                                   train=True, mutable=["batch_stats"],
                                   classifier=etf)
      return jnp.mean((logits - jax.nn.one_hot(labels, 10)) ** 2)

    outs[impl] = (variables, jax.jit(jax.value_and_grad(loss_fn))(
        variables["params"]))
  (v_xla, (l_xla, g_xla)), (v_dnn, (l_dnn, g_dnn)) = outs["xla"], outs["onednn"]
  # Same variable tree (checkpoints are interchangeable) and same numbers.
  chex.assert_trees_all_equal_shapes_and_dtypes(v_xla, v_dnn)
  chex.assert_trees_all_close(l_dnn, l_xla, rtol=1e-5)
  chex.assert_trees_all_close(g_dnn, g_xla, atol=2e-5, rtol=1e-3)


def test_conv_arguments_are_checked():
  with pytest.raises(ValueError, match="matching channels"):
    onednn_conv.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 2, 4)),
                       strides=(1, 1), padding=((1, 1), (1, 1)))


def test_tracing_compiles_nothing(monkeypatch):
  # The kernels are built at start-up (the `loaded` fixture, as
  # `kernels.resolve` in training); a trace with the given convolution only
  # emits the registered custom calls.
  def no_compiling(*args, **kwargs):
    raise AssertionError("the C++ compiler ran while tracing")

  monkeypatch.setattr(onednn_build, "_compile", no_compiling)
  monkeypatch.setattr(onednn_build, "_build", no_compiling)
  model = models.create_model("resnet8", num_classes=10, head="etf",
                              conv=onednn_conv.onednn_conv,
                              norm=fused_norm.fused_batch_norm)
  etf = etf_lib.simplex_etf(10, model.feature_dim)
  x = jnp.zeros((2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x, classifier=etf)
  jax.jit(jax.grad(lambda p: jnp.sum(model.apply(
      dict(variables, params=p), x, train=True, mutable=["batch_stats"],
      classifier=etf)[0][0]))).lower(variables["params"])


def _run(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
      text=True, timeout=300, env={**os.environ, **env}, check=False)


def test_a_trace_before_loading_stops_instead_of_building(tmp_path):
  r = _run("""
      import jax, jax.numpy as jnp
      from nc_jax.kernels import onednn_build, onednn_conv
      try:
        jax.jit(lambda x, k: onednn_conv.conv2d(x, k, strides=(1, 1),
                padding=((1, 1), (1, 1)))).lower(
            jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)))
      except onednn_build.KernelsNotLoaded as e:
        print("NOT LOADED:", e)
  """, NC_JAX_CACHE=str(tmp_path))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "NOT LOADED: nc_jax's oneDNN kernels are not loaded" in r.stdout
  assert not list(tmp_path.rglob("*.so"))  # nothing was built


CHECK_FALLBACK = """
    import types
    from nc_jax import kernels
    from nc_jax.kernels import onednn_build
    assert not onednn_build.available()
    print("REASON:", onednn_build.unavailable_reason())
    config = types.SimpleNamespace(backbone="resnet32", compute_dtype="float32",
                                   conv_impl="auto", norm_impl="auto")
    k = kernels.resolve(config, backend="cpu", device_count=1)
    print("AUTO:", k.describe())
    try:
      config.conv_impl = "onednn"
      kernels.resolve(config, backend="cpu", device_count=1)
    except ValueError as e:
      print("ERROR:", e)
"""


def test_switched_off_falls_back_to_xla_and_says_so():
  r = _run(CHECK_FALLBACK, NC_JAX_NO_ONEDNN="1")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "REASON: switched off by NC_JAX_NO_ONEDNN" in r.stdout
  assert ("AUTO: xla convolutions (oneDNN kernels unavailable: switched off "
          "by NC_JAX_NO_ONEDNN), fused BatchNorm") in r.stdout
  assert "ERROR: conv_impl='onednn' cannot run here" in r.stdout
  assert "Use conv_impl='auto' or 'xla'" in r.stdout


def test_missing_compiler_falls_back_to_xla_and_says_so(tmp_path):
  r = _run(CHECK_FALLBACK, CXX="no-such-compiler-x",
           NC_JAX_CACHE=str(tmp_path))
  assert r.returncode == 0, r.stderr[-2000:]
  reason = "no C++ compiler (no-such-compiler-x not on PATH"
  assert f"REASON: {reason}" in r.stdout
  assert f"AUTO: xla convolutions (oneDNN kernels unavailable: {reason}" in (
      r.stdout)
  # Explicitly asked for: one line, no traceback.
  error = [l for l in r.stdout.splitlines() if l.startswith("ERROR:")]
  assert len(error) == 1 and reason in error[0], r.stdout
  assert not list(tmp_path.rglob("*.so"))


@pytest.mark.slow
def test_build_goes_to_the_cache_dir(tmp_path):
  r = _run("""
      from nc_jax.kernels import onednn_build
      assert onednn_build.available(), onednn_build.unavailable_reason()
      print(onednn_build.library_path())
  """, NC_JAX_CACHE=str(tmp_path))
  assert r.returncode == 0, r.stderr[-2000:]
  path = r.stdout.strip().splitlines()[-1]
  assert path.startswith(str(tmp_path / "kernels")) and path.endswith(".so")
  # No half-written temporaries are left beside it.
  assert [p.name for p in (tmp_path / "kernels").iterdir()] == [
      os.path.basename(path)]


@pytest.mark.slow
def test_damaged_cache_entry_is_rebuilt(tmp_path):
  code = """
      from nc_jax.kernels import onednn_build
      assert onednn_build.available(), onednn_build.unavailable_reason()
      print(onednn_build.library_path())
  """
  first = _run(code, NC_JAX_CACHE=str(tmp_path))
  assert first.returncode == 0, first.stderr[-2000:]
  path = first.stdout.strip().splitlines()[-1]
  with open(path, "wb") as f:
    f.write(b"not a shared library")
  second = _run(code, NC_JAX_CACHE=str(tmp_path))
  assert second.returncode == 0, second.stderr[-2000:]
  assert second.stdout.strip().splitlines()[-1] == path
  assert os.path.getsize(path) > 10_000


def test_unwritable_cache_falls_back_and_names_the_fix(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("a file where the cache folder should go")
  r = _run(CHECK_FALLBACK, NC_JAX_CACHE=str(blocker))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "set NC_JAX_CACHE to a writable folder" in r.stdout
