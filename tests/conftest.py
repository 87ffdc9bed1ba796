"""Shared pytest fixtures, and the real-data tier.

The default suite makes its own data (image-folder trees and CIFAR release
files written by the tests). The tests marked `real_data` read the original
CIFAR-10 python release, `cifar-10-python.tar.gz` as downloaded from
https://www.cs.toronto.edu/~kriz/cifar.html, from the path in
`NC_JAX_CIFAR10_RELEASE`; every image-folder tree they compare with it is
derived from it here. Without the variable they are not collected (the run
says how many and why); selected explicitly (`-m real_data`) without it,
they fail saying what to set.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import pathlib
import re
import shutil
import tarfile
import tempfile
import types

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


def _compile_quickly() -> None:
  """LLVM at -O0 for the suite's own processes, unless XLA_FLAGS is set.

  The suite's programs are tiny and run for a few steps, so XLA's CPU
  compilation is most of their time, and most of that is LLVM's
  optimisation: -O0 compiles the tiny ResNet's init about 5x faster and
  its train step about 2x (docs/performance.md, 2026-12-07). Results
  differ from XLA's default compilation in float rounding only (the tiny
  step's loss in the 8th digit). Children inherit the flag, except the
  command tests of test_cli, test_runs and test_xla_setup, which drop
  XLA_FLAGS so that the commands run with the flags users get
  (`nc_jax.kernels.xla_setup`); where those compare with the suite's own
  runs they compare accuracies. Set XLA_FLAGS (even to "") to compile as
  XLA does by default.
  """
  os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


_compile_quickly()  # before jax starts its backends, in _share_compilations
_share_compilations()
RELEASE_VARIABLE = "NC_JAX_CIFAR10_RELEASE"
REAL_DATA = "real_data"


def _real_data_selected(config) -> bool:
  """Whether `-m` asks for the real-data tier by name (not `not real_data`)."""
  expr = config.getoption("markexpr") or ""
  return bool(re.search(rf"(?<!not ){REAL_DATA}", expr)) and (
      f"not {REAL_DATA}" not in expr)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", f"{REAL_DATA}: needs the original CIFAR-10 release at "
      f"${RELEASE_VARIABLE} (cifar-10-python.tar.gz)")


def _leave_out_real_data(config, items):
  """Without the release, the real-data tier is not collected (counted, and
  said on the summary line), unless it was asked for by name."""
  if os.environ.get(RELEASE_VARIABLE) or _real_data_selected(config):
    return
  out = [i for i in items if i.get_closest_marker(REAL_DATA)]
  if out:
    items[:] = [i for i in items if not i.get_closest_marker(REAL_DATA)]
    config.stash[_LEFT_OUT] = len(out)


_LEFT_OUT = pytest.StashKey[int]()


def pytest_sessionfinish(session):
  # An xdist worker collected (and left out); it tells the controller.
  output = getattr(session.config, "workeroutput", None)
  if output is not None:
    output["real_data_left_out"] = session.config.stash.get(_LEFT_OUT, 0)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  """xdist's controller: every worker collects the whole suite, so each
  reports the same number."""
  del error
  n = getattr(node, "workeroutput", {}).get("real_data_left_out", 0)
  config = node.config
  config.stash[_LEFT_OUT] = max(config.stash.get(_LEFT_OUT, 0), n)


def pytest_terminal_summary(terminalreporter, config):
  if hasattr(config, "workerinput"):
    return
  n = config.stash.get(_LEFT_OUT, 0)
  if not n:
    return
  # On the summary line itself: "... N real-data tests left out (...)".
  terminalreporter.stats.setdefault(
      f"real-data tests left out ({RELEASE_VARIABLE} unset)", []).extend(
          types.SimpleNamespace() for _ in range(n))
  terminalreporter.write_line(
      f"{n} real-data tests left out: {RELEASE_VARIABLE} is not set. Set it "
      "to the path of the CIFAR-10 python release (cifar-10-python.tar.gz) "
      f"to run them (pytest -m {REAL_DATA}).")


def cifar10_release_path() -> pathlib.Path:
  """The release archive named by $NC_JAX_CIFAR10_RELEASE; fails (never
  skips) when the variable is unset or names no file."""
  value = os.environ.get(RELEASE_VARIABLE)
  if not value:
    pytest.fail(f"The real-data tests need the original CIFAR-10 release: set "
                f"{RELEASE_VARIABLE} to the path of cifar-10-python.tar.gz "
                "(https://www.cs.toronto.edu/~kriz/cifar.html).",
                pytrace=False)
  path = pathlib.Path(value).expanduser()
  if not path.is_file():
    pytest.fail(f"{RELEASE_VARIABLE}={value} names no file; set it to the "
                "path of cifar-10-python.tar.gz.", pytrace=False)
  return path


@pytest.fixture(scope="session")
def cifar10_release() -> pathlib.Path:
  """Path of the original CIFAR-10 python release archive (real-data tier)."""
  return cifar10_release_path()


@pytest.fixture(scope="session")
def cifar10_release_parent(cifar10_release, tmp_path_factory) -> pathlib.Path:
  """A folder holding the release's extracted `cifar-10-batches-py/`."""
  out = tmp_path_factory.mktemp("c10_release")
  with tarfile.open(cifar10_release) as tar:
    tar.extractall(out, filter="data")
  assert (out / "cifar-10-batches-py" / "data_batch_1").is_file(), (
      f"{cifar10_release} holds no cifar-10-batches-py/data_batch_1")
  return out


@pytest.fixture(scope="session")
def cifar10_dir(cifar10_release_parent, tmp_path_factory) -> pathlib.Path:
  """A CIFAR-10 image-folder tree (`train/<class>/NNNN.png`, `test/...`)
  derived from the release: file NNNN is the NNNN-th image of its class in
  the release's order, lossless, as a converter of the release writes it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from nc_jax.data import in_memory  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("cifar10_png") / "cifar10"
  jobs = []
  for split in ("train", "test"):
    data = in_memory.load_split("cifar10", str(cifar10_release_parent), split)
    seen = {}
    for image, label in zip(data.images, data.labels):
      c = int(label)
      n = seen[c] = seen.get(c, -1) + 1
      jobs.append((image, root / split / data.class_names[c] / f"{n:04d}.png"))
  for d in {p.parent for _, p in jobs}:
    d.mkdir(parents=True)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda job: Image.fromarray(job[0]).save(
        job[1], compress_level=1), jobs))
  return root


def write_image_folder(root: pathlib.Path, *, num_classes: int = 10,
                       train_per_class: int = 40, test_per_class: int = 6,
                       size: int = 32, seed: int = 0,
                       shuffle_train_labels: bool = False) -> pathlib.Path:
  """Writes a small learnable class-folder tree (PNG) under `root`.

  Each class has its own mean colour plus noise, so a network can learn it in
  a few steps. With `shuffle_train_labels` the training images are filed
  under random class folders (the same number in each): nothing in them
  predicts the label, so no method can beat chance on the (unshuffled)
  test images.
  """
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  colours = rng.uniform(30, 225, size=(num_classes, 3))
  for split, n in (("train", train_per_class), ("test", test_per_class)):
    folder_of = np.repeat(np.arange(num_classes), n)
    if split == "train" and shuffle_train_labels:
      folder_of = np.random.default_rng(seed + 1).permutation(folder_of)
    filed = [0] * num_classes  # images filed so far, per folder
    for c in range(num_classes):
      for i in range(n):
        f = int(folder_of[c * n + i])
        d = root / split / f"class_{f:02d}"
        d.mkdir(parents=True, exist_ok=True)
        img = colours[c] + rng.normal(0, 25, size=(size, size, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            d / f"{filed[f]:04d}.png")
        filed[f] += 1
  return root


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> pathlib.Path:
  """A 10-class image-folder tree: 40 train and 6 test images per class."""
  return write_image_folder(tmp_path_factory.mktemp("tiny_folder"))


@pytest.fixture(scope="session")
def shuffled_image_folder(tmp_path_factory) -> pathlib.Path:
  """`tiny_image_folder`'s images with the training labels shuffled."""
  return write_image_folder(tmp_path_factory.mktemp("shuffled_folder"),
                            shuffle_train_labels=True)


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
                  "test_data_imagenet_lt", "test_xla_setup", "test_fused_norm")


def pytest_collection_modifyitems(config, items):
  _leave_out_real_data(config, items)

  def rank(item):
    name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    return (_LONGEST_FIRST.index(name) if name in _LONGEST_FIRST
            else len(_LONGEST_FIRST))
  items.sort(key=rank)  # stable: the order within a module is kept
