"""Shared pytest fixtures.

The real-data fixture extracts ../shared/data/cifar10_jpeg.tar.gz once per test
session. If the archive is missing the test fails (never skips) and says where
it looked.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _share_compilations() -> None:
  """One JAX persistent compilation cache for the whole test session.

  Many tests compile the same tiny programs, in this process and in the
  subprocesses of the CLI and multi-process tests (which inherit the
  environment); compiling each once cuts the suite's time by minutes. The
  cache starts empty every session and is deleted at its end, so no test
  depends on an earlier one's compilations. Set JAX_COMPILATION_CACHE_DIR
  to use another (or "none" for no cache).
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") == "none":
    del os.environ["JAX_COMPILATION_CACHE_DIR"]
    return
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    path = tempfile.mkdtemp(prefix="nc_jax_tests_jax_cache_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  # JAX caches only compilations over 1 s by default; most of the suite's
  # programs are tiny ones compiled again by many tests, so cache them all
  # (the subprocesses read the same variable).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update(
      "jax_persistent_cache_min_compile_time_secs",
      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


_share_compilations()
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10_jpeg.tar.gz"


def shared_cifar10_archive() -> pathlib.Path:
  return pathlib.Path(os.environ.get("NC_JAX_CIFAR10_ARCHIVE", DEFAULT_ARCHIVE))


def _extract(archive: pathlib.Path, out: pathlib.Path) -> None:
  """Extracts our own test archive: with GNU tar where there is one (60,000
  JPEG files: 27 s against tarfile's 44 s, measured side by side on the
  2-core dev box, 2026-11-29), else with tarfile."""
  tar_bin = shutil.which("tar")
  if tar_bin is not None:
    done = subprocess.run([tar_bin, "--no-same-owner", "-xzf", str(archive),
                           "-C", str(out)], capture_output=True, text=True)
    if done.returncode == 0:
      return
    shutil.rmtree(out)
    out.mkdir()
  with tarfile.open(archive) as tar:
    tar.extractall(out, filter="data")


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> pathlib.Path:
  """Path of an extracted CIFAR-10 image-folder tree (train/ and test/)."""
  archive = shared_cifar10_archive()
  if not archive.is_file():
    pytest.fail(
        f"The real-data tests need the CIFAR-10 archive at {archive}, which "
        "does not exist. Check out ../shared beside the repository or set "
        "NC_JAX_CIFAR10_ARCHIVE to the path of cifar10_jpeg.tar.gz.",
        pytrace=False)
  out = tmp_path_factory.mktemp("shared_cifar10")
  _extract(archive, out)
  root = out / "cifar10_jpeg"
  assert (root / "train").is_dir() and (root / "test").is_dir(), (
      f"{archive} did not contain cifar10_jpeg/train and cifar10_jpeg/test")
  return root


def write_image_folder(root: pathlib.Path, *, num_classes: int = 10,
                       train_per_class: int = 40, test_per_class: int = 6,
                       size: int = 32, seed: int = 0) -> pathlib.Path:
  """Writes a small learnable class-folder tree (PNG) under `root`.

  Each class has its own mean colour plus noise, so a network can learn it in
  a few steps.
  """
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  colours = rng.uniform(30, 225, size=(num_classes, 3))
  for split, n in (("train", train_per_class), ("test", test_per_class)):
    for c in range(num_classes):
      d = root / split / f"class_{c:02d}"
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        img = colours[c] + rng.normal(0, 25, size=(size, size, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            d / f"{i:04d}.png")
  return root


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> pathlib.Path:
  """A 10-class image-folder tree: 40 train and 6 test images per class."""
  return write_image_folder(tmp_path_factory.mktemp("tiny_folder"))


# The modules that take longest, longest first (test seconds measured on 2
# cores, 2026-11-29: 221, 188, 94, 62, 60, 45, 43, 39, 35, 30). With the two
# xdist workers (setup.cfg, which turns off xdist's own reordering by test
# count), starting them first keeps one worker from finishing alone with a
# long module at the end. Others keep their order. The order changes only
# the wall time, never a result.
# Added 2026-12-07 beside a long training run: test_dispatch 60 s,
# test_gpu_lease 48 s.
_LONGEST_FIRST = ("test_train", "test_distributed", "test_methods",
                  "test_models", "test_dispatch", "test_cli",
                  "test_gpu_lease", "test_runs", "test_data_cub",
                  "test_data_imagenet_lt", "test_xla_defaults", "test_norm")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    return (_LONGEST_FIRST.index(name) if name in _LONGEST_FIRST
            else len(_LONGEST_FIRST))
  items.sort(key=rank)  # stable: the order within a module is kept
