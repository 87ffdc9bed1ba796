"""The package's public core: its names, and that they import light.

`from nc_jax import ...` must work for every name in `nc_jax.__all__`,
needing only jax, flax, optax, chex and numpy, while `import nc_jax` alone
must load no jax at all (the entry points tune malloc and XLA's flags after
importing nc_jax.kernels.xla_setup, before jax starts).
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
               "kernels.onednn_build", "steps"):
    assert f"'nc_jax.{name}" not in out.stdout, out.stdout


def test_import_nc_jax_loads_no_jax(tmp_path):
  # The entry points import nc_jax.kernels.xla_setup before tuning malloc
  # and XLA's flags, which must precede jax and its threads.
  out = _fresh("""
      import sys
      import nc_jax, nc_jax.kernels.xla_setup, nc_jax.preemption
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


# ------------------------------------------ the `train` extra, the install

_WITHOUT_TRAIN_EXTRA = """
    import sys
    sys.modules["ml_collections"] = None  # as if the extra were missing
"""


def test_a_training_module_without_the_extra_names_it(tmp_path):
  out = _fresh(_WITHOUT_TRAIN_EXTRA + """
    try:
      import nc_jax.train
    except ImportError as e:
      print("ImportError:", e)
  """, tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  line = out.stdout.strip()
  assert "\n" not in line, line
  assert line == ("ImportError: nc_jax.train needs nc_jax's `train` extra, "
                  "which is not installed (missing: ml-collections): pip "
                  "install 'nc_jax[train]'"), line


@pytest.mark.parametrize("command", ["train", "evaluate", "report",
                                     "paper_table"])
def test_a_command_without_the_extra_is_one_error_line(tmp_path, command):
  out = _fresh(_WITHOUT_TRAIN_EXTRA + f"""
    sys.argv = ["nc-jax-{command.replace('_', '-')}", "--helpshort"]
    from nc_jax.cli import nc_jax_{command}
    nc_jax_{command}()
  """, tmp_path)
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: nc-jax-{command.replace('_', '-')} needs nc_jax's `train` "
      "extra"), out.stderr
  assert "pip install 'nc_jax[train]'" in lines[0]


def _setup_cfg():
  import configparser  # pylint: disable=g-import-not-at-top
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  return cfg


def test_the_core_requires_five_packages_and_the_extra_the_rest():
  cfg = _setup_cfg()
  names = lambda text: sorted(
      l.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip()
      for l in text.strip().splitlines() if l.strip()
      and not l.strip().startswith("#"))
  assert names(cfg["options"]["install_requires"]) == [
      "chex", "flax", "jax", "numpy", "optax"]
  train = names(cfg["options.extras_require"]["train"])
  for heavy in ("orbax-checkpoint", "tensorflow-datasets", "ml-collections",
                "matplotlib", "tensorboard"):
    assert heavy in train, heavy


@pytest.mark.slow
def test_pip_resolves_the_core_without_the_training_stack(tmp_path):
  """What `pip install nc_jax` would install, from the package index (no
  TensorFlow, tfds, ml_collections, matplotlib or TensorBoard; orbax comes
  with flax itself, which depends on it)."""
  report = tmp_path / "report.json"
  out = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
       "--ignore-installed", "--no-build-isolation", "--report", str(report),
       str(REPO)], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  install = json.loads(report.read_text())["install"]
  names = {i["metadata"]["name"].lower().replace("_", "-") for i in install}
  assert {"jax", "flax", "optax", "chex", "numpy", "nc-jax"} <= names, names
  assert not names & {"tensorflow", "tensorflow-cpu", "tensorflow-datasets",
                      "ml-collections", "matplotlib", "tensorboard",
                      "torch"}, names
  ours = next(i for i in install
              if i["metadata"]["name"].lower().replace("_", "-") == "nc-jax")
  core = [r for r in ours["metadata"].get("requires_dist", [])
          if "extra ==" not in r]
  assert sorted(r.split(">")[0] for r in core) == [
      "chex", "flax", "jax", "numpy", "optax"], core


@pytest.mark.slow
def test_the_wheel_holds_nc_jax_and_nothing_beside_it(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps",
       "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(REPO)],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  import zipfile  # pylint: disable=g-import-not-at-top
  (wheel,) = tmp_path.glob("nc_jax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names}
  assert tops == {"nc_jax", wheel.name.split("-")[0] + "-"
                  + wheel.name.split("-")[1] + ".dist-info"}, tops
  for needed in ("nc_jax/py.typed", "nc_jax/configs/cifar_lt.py",
                 "nc_jax/cli/train.py", "nc_jax/nnx.py",
                 "nc_jax/kernels/csrc/onednn_conv.cc"):
    assert needed in names, needed
  entry = next(n for n in names if n.endswith("entry_points.txt"))
  text = zipfile.ZipFile(wheel).read(entry).decode()
  assert "nc-jax-train = nc_jax.cli:nc_jax_train" in text
