"""The package's public core: its names, and that they import light.

`from nc_jax import ...` must work for every name in `nc_jax.__all__`,
needing only jax, flax, optax, chex and numpy, while `import nc_jax` alone
must load no jax at all (the entry points tune malloc and XLA's flags after
importing nc_jax.implementations, before jax starts).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from nc_jax import etf as etf_lib
from nc_jax import losses
from nc_jax.models import heads

REPO = pathlib.Path(__file__).resolve().parents[1]

_HEAVY = ("tensorflow", "tensorflow_datasets", "orbax", "ml_collections",
          "matplotlib", "tensorboard", "torch", "experiments")


def _fresh(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter, as a user would, outside the repo."""
  return subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
      capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})


def test_the_core_imports_only_jax_flax_optax_chex_numpy(tmp_path):
  out = _fresh(f"""
      import sys
      import nc_jax
      assert nc_jax.__file__.startswith({str(REPO)!r}), nc_jax.__file__
      from nc_jax import *
      from nc_jax import simplex_etf, dot_regression_loss, ETFHead
      import nc_jax.nnx, nc_jax.etf, nc_jax.losses, nc_jax.models.heads
      import nc_jax.nc_metrics
      heavy = sorted(m for m in sys.modules
                     if m.split(".")[0] in {_HEAVY!r})
      ours = sorted(m for m in sys.modules if m.startswith("nc_jax."))
      print("heavy", heavy)
      print("ours", ours)
  """, tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "heavy []" in out.stdout, out.stdout
  # None of the training, data or checkpoint modules came along.
  for name in ("train", "data", "checkpoint", "builder", "runs",
               "cpu_kernels", "steps"):
    assert f"'nc_jax.{name}" not in out.stdout, out.stdout


def test_import_nc_jax_loads_no_jax(tmp_path):
  # The entry points import nc_jax.implementations before tuning malloc
  # and XLA's flags, which must precede jax and its threads.
  out = _fresh("""
      import sys
      import nc_jax, nc_jax.implementations, nc_jax.preemption
      print(sorted(m for m in ("jax", "flax", "optax", "numpy")
                   if m in sys.modules))
  """, tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "[]", out.stdout


def test_all_public_names_resolve():
  import nc_jax  # pylint: disable=g-import-not-at-top
  assert nc_jax.__all__ == sorted(set(nc_jax.__all__))
  for name in nc_jax.__all__:
    assert getattr(nc_jax, name) is not None, name
  assert nc_jax.ETFHead is heads.ETFHead
  assert nc_jax.simplex_etf is etf_lib.simplex_etf
  assert nc_jax.dot_regression_loss is losses.dot_regression_loss
  assert callable(nc_jax.nc_metrics.compute)
  # Every documented loss of nc_jax.losses is public at the top too.
  assert set(losses.__all__) - {"NORM_EPS"} <= set(nc_jax.__all__)
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    getattr(nc_jax, "nope")


def test_py_typed_marker_ships():
  assert (REPO / "nc_jax" / "py.typed").is_file()
  from setuptools.config.setupcfg import read_configuration  # pylint: disable=g-import-not-at-top
  package_data = read_configuration(REPO / "setup.cfg")["options"][
      "package_data"]
  assert "py.typed" in package_data["nc_jax"]
