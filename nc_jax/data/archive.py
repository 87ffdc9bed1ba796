"""Data shipped as archives (`.tar.gz`, `.tgz`, `.tar`, `.zip`): image-folder
trees, or a CIFAR python release (`cifar-10-python.tar.gz`).

`data_dir` may name such an archive instead of a directory: it is extracted
once into nc_jax's cache folder (`$NC_JAX_CACHE`, default `~/.cache/nc_jax`;
see `nc_jax.cache`) and the tree inside is used. Extraction goes to a temporary folder renamed into place,
so concurrent processes on one host and a kill mid-extraction are both safe.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tarfile
import tempfile
import zipfile

from nc_jax import cache
from nc_jax.data import cifar_release

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def is_archive(path: str | os.PathLike | None) -> bool:
  return path is not None and str(path).endswith(ARCHIVE_SUFFIXES)


def cache_root() -> pathlib.Path:
  return cache.cache_root()


def _is_tree(path: pathlib.Path) -> bool:
  """An image-folder tree (`train/`) or a list-indexed release whose lists
  sit at its top (`images.txt`: CUB-200-2011's layout)."""
  return (path / "train").is_dir() or (path / "images.txt").is_file()


def _find_tree(root: pathlib.Path) -> pathlib.Path:
  """The folder holding `train/` and `test/`, a CIFAR release, or a
  CUB-200-2011 release: `root` or one level below."""
  if _is_tree(root) or cifar_release.find(str(root)):
    return root
  subs = [p for p in root.iterdir() if p.is_dir() and _is_tree(p)]
  if len(subs) == 1:
    return subs[0]
  raise FileNotFoundError(
      f"The archive extracted to {root} holds no train/ and test/ class "
      "folders (at its top or one level down), no CIFAR python release and "
      "no CUB-200-2011 release.")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str | None:
  """Returns `data_dir`, or for an archive the extracted tree inside it.

  Args:
    data_dir: a directory, an archive path, or None.

  Returns:
    A directory path (unchanged when `data_dir` is not an archive).

  Raises:
    FileNotFoundError: when the archive does not exist or holds no tree.
    ValueError: when it cannot be extracted.
  """
  if not is_archive(data_dir):
    return None if data_dir is None else str(data_dir)
  archive = pathlib.Path(data_dir).expanduser().resolve()
  if not archive.is_file():
    raise FileNotFoundError(
        f"data_dir {archive} looks like an archive but does not exist. Pass "
        "the path of an existing .tar.gz/.zip of train/ and test/ class "
        "folders or of a CIFAR python release, or an extracted directory.")
  st = archive.stat()
  key = hashlib.sha1(
      f"{archive}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
  target = cache_root() / f"{archive.name.split('.')[0]}-{key}"
  if target.is_dir():
    return str(_find_tree(target))
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
  try:
    try:
      if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
          z.extractall(tmp)
      else:
        with tarfile.open(archive) as t:
          t.extractall(tmp, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, ValueError) as e:
      raise ValueError(
          f"data_dir {archive} cannot be extracted ({type(e).__name__}: "
          f"{' '.join(str(e).split())[:200]}): a damaged or incomplete "
          "archive? Copy it again, or pass an extracted folder.") from e
    try:
      os.rename(tmp, target)
    except OSError:
      if not target.is_dir():  # lost a race only if the winner finished
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return str(_find_tree(target))
