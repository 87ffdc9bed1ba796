"""The default CPU flags (YNNPACK fusions, oneDNN convolutions) compute the
same train step as XLA's own CPU code; with nc_jax's oneDNN convolution
kernels no flags are set; users' XLA_FLAGS win; the malloc tuning stops
per-step page faults on CPU and is not applied when an accelerator is
expected."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from nc_jax.kernels import onednn_build
from nc_jax.kernels import xla_setup

pytestmark = pytest.mark.slow  # subprocesses that start XLA with other flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(**env_overrides) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "NC_JAX_NO_XLA_DEFAULTS")}
  env.update(env_overrides, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "tests.flags_step"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_default_flags_match_xla_cpu_defaults():
  fast = _run()
  plain = _run(NC_JAX_NO_XLA_DEFAULTS="1")
  assert fast["xla_flags"] == " ".join(xla_setup.CPU_FLAGS)
  assert plain["xla_flags"] == ""
  np.testing.assert_allclose(fast["losses"], plain["losses"], rtol=1e-5)
  np.testing.assert_allclose(fast["params"], plain["params"], atol=2e-5)
  # nc_jax's own oneDNN convolutions: no flags, and the same step again.
  onednn = _run(CONV_IMPL="onednn")
  assert onednn["xla_flags"] == ""
  np.testing.assert_allclose(onednn["losses"], plain["losses"], rtol=1e-5)
  np.testing.assert_allclose(onednn["params"], plain["params"], atol=2e-5)


@pytest.fixture
def cpu_run(monkeypatch):
  """A CPU run's environment, with the malloc tuning recorded, not applied
  to the test process."""
  calls = []
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(xla_setup, "tune_malloc", lambda: calls.append(1))
  return calls


KERNELS_BUILDABLE = pytest.mark.skipif(
    onednn_build.problem() is not None,
    reason=f"the oneDNN kernels cannot be built here "
    f"({onednn_build.problem()}), so no run expects them")


@KERNELS_BUILDABLE
def test_user_flags_are_kept(monkeypatch, cpu_run):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  monkeypatch.delenv("NC_JAX_NO_XLA_DEFAULTS", raising=False)
  xla_setup.apply()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
  monkeypatch.delenv("XLA_FLAGS")
  monkeypatch.setenv("NC_JAX_NO_XLA_DEFAULTS", "1")
  xla_setup.apply()
  assert "XLA_FLAGS" not in os.environ
  monkeypatch.delenv("NC_JAX_NO_XLA_DEFAULTS")
  xla_setup.apply(dict(backbone="resnet32"))
  assert "XLA_FLAGS" not in os.environ
  xla_setup.apply(dict(backbone="resnet32", compute_dtype="bfloat16"))
  assert os.environ["XLA_FLAGS"] == " ".join(xla_setup.CPU_FLAGS)
  monkeypatch.delenv("XLA_FLAGS")
  xla_setup.apply()
  assert os.environ["XLA_FLAGS"] == " ".join(xla_setup.CPU_FLAGS)


def test_nothing_is_tuned_for_an_accelerator(monkeypatch, cpu_run):
  for platforms, backend in (("cuda", "gpu"), ("tpu", "tpu"),
                             ("rocm,cpu", "gpu")):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("NC_JAX_NO_XLA_DEFAULTS", raising=False)
    assert xla_setup.apply(dict(backbone="resnet50")) == backend
    assert "XLA_FLAGS" not in os.environ
  assert not cpu_run  # the malloc tuning never ran
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert xla_setup.apply(dict(backbone="resnet50")) == "cpu"
  assert cpu_run == [1]
  assert os.environ["XLA_FLAGS"] == " ".join(xla_setup.CPU_FLAGS)


@KERNELS_BUILDABLE
def test_which_runs_expect_onednn_convolutions():
  expects = xla_setup.expects_onednn_convs
  assert expects("resnet32", "float32", "auto")
  assert expects("resnet32_c100", "float32", "onednn")
  assert not expects("resnet32", "float32", "xla")
  assert not expects("resnet32", "bfloat16", "auto")
  assert not expects("resnet50", "float32", "auto")
  assert not expects("resnet32", "float32", "auto", multi_process=True)


MALLOC_PROBE = """
import os
os.environ["JAX_PLATFORMS"] = os.environ.pop("PROBE_PLATFORMS", "cpu")
from nc_jax.kernels import xla_setup
xla_setup.apply()
os.environ["JAX_PLATFORMS"] = "cpu"
import resource
import jax
import jax.numpy as jnp

@jax.jit
def f(x, w):
  # A (4096, 4096) float32 intermediate: a 64 MB temporary per call, from
  # thin matmuls (2 GFLOP each) so the probe takes a second, not twenty.
  return jnp.sum(jnp.tanh(x @ w) @ w.T)

x = jnp.ones((4096, 64), jnp.float32) * 1e-3
for _ in range(3):
  f(x, x.T).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x, x.T).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 5)
"""


def test_malloc_tuning_stops_per_step_page_faults():
  env = {k: v for k, v in os.environ.items()
         if k not in ("NC_JAX_NO_MALLOC_TUNING", "GLIBC_TUNABLES",
                      "MALLOC_ARENA_MAX")}

  def faults(**extra):
    p = subprocess.run([sys.executable, "-c", MALLOC_PROBE], cwd=ROOT,
                       env={**env, **extra, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stdout.strip().splitlines()[-1])

  untuned = faults(NC_JAX_NO_MALLOC_TUNING="1")
  tuned = faults()
  # Untuned, each call maps fresh pages for its temporaries (64 MB = 16k
  # pages); tuned, the heap keeps them.
  assert untuned > 10_000, untuned
  assert tuned < 1_000, tuned
  # A process that expects a GPU leaves malloc alone (its host threads
  # would share one arena); the probe then computes on the CPU all the
  # same, and faults like the untuned one.
  expecting_gpu = faults(PROBE_PLATFORMS="cuda")
  assert expecting_gpu > 10_000, expecting_gpu
