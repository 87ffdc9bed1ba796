"""Shared pytest fixtures.

The real-data fixture extracts ../shared/data/cifar10_jpeg.tar.gz once per test
session. If the archive is missing the test fails (never skips) and says where
it looked.
"""

from __future__ import annotations

import os
import pathlib
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10_jpeg.tar.gz"


def shared_cifar10_archive() -> pathlib.Path:
  return pathlib.Path(os.environ.get("NC_JAX_CIFAR10_ARCHIVE", DEFAULT_ARCHIVE))


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
  with tarfile.open(archive) as tar:
    tar.extractall(out, filter="data")
  root = out / "cifar10_jpeg"
  assert (root / "train").is_dir() and (root / "test").is_dir(), (
      f"{archive} did not contain cifar10_jpeg/train and cifar10_jpeg/test")
  return root
