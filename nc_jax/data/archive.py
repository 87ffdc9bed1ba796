"""Data shipped as archives (`.tar.gz`, `.tgz`, `.tar`, `.zip`): image-folder
trees, or a CIFAR python release (`cifar-10-python.tar.gz`).

`data_dir` may name such an archive instead of a directory: it is extracted
once into nc_jax's cache folder (`$NC_JAX_CACHE`, default `~/.cache/nc_jax`;
see `nc_jax.cache`), one folder per archive path, and the tree inside is
used. The folder records the archive's size and modification time; when
they change (a new copy), it is extracted again in place of the old one.

Extraction goes to a temporary folder renamed into place, so concurrent
processes on one host never see a partial tree; one left by a killed
process is removed by the next extraction. A CIFAR release is checked
file by file (md5) before it is put in the cache: a damaged or incomplete
archive stops with an error naming the archive and the files, and leaves
nothing behind, so the corrected copy is extracted afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import socket
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


def _find_tree(root: pathlib.Path, archive: pathlib.Path) -> pathlib.Path:
  """The folder holding `train/` and `test/`, a CIFAR release, or a
  CUB-200-2011 release: `root` (where `archive` was extracted) or one level
  below."""
  if _is_tree(root) or cifar_release.find(str(root)):
    return root
  subs = [p for p in root.iterdir() if p.is_dir() and _is_tree(p)]
  if len(subs) == 1:
    return subs[0]
  raise FileNotFoundError(
      f"data_dir {archive} holds no train/ and test/ class folders (at its "
      "top or one level down), no CIFAR python release and no "
      "CUB-200-2011 release. Pass an archive of one of those, or a folder.")


# Written inside each extracted folder: the archive it came from.
STAMP = ".nc_jax_source.json"


def _stamp(archive: pathlib.Path) -> dict:
  st = archive.stat()
  return {"archive": str(archive), "size": st.st_size,
          "mtime_ns": st.st_mtime_ns}


def _read_stamp(folder: pathlib.Path) -> dict | None:
  try:
    return json.loads((folder / STAMP).read_text())
  except (OSError, ValueError):
    return None


def _release_problems(tree: pathlib.Path) -> list[str]:
  """The damaged or missing files of a CIFAR release in `tree` (none when
  `tree` holds no release)."""
  found = cifar_release.find(str(tree))
  return cifar_release.problems(*found) if found else []


def _tmp_prefix() -> str:
  return f".extract-{socket.gethostname()}-{os.getpid()}-"


def _remove_abandoned(parent: pathlib.Path) -> None:
  """Deletes this host's temporary extractions whose process has died (a
  kill mid-extraction); those of live processes and other hosts stay."""
  host = f".extract-{socket.gethostname()}-"
  for path in parent.glob(f"{host}*"):
    pid = path.name[len(host):].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(path, ignore_errors=True)
    except OSError:  # alive, another user's
      pass


def _extract(archive: pathlib.Path, into: pathlib.Path) -> None:
  try:
    if archive.suffix == ".zip":
      with zipfile.ZipFile(archive) as z:
        z.extractall(into)
    else:
      with tarfile.open(archive) as t:
        t.extractall(into, filter="data")
  except (tarfile.TarError, zipfile.BadZipFile, EOFError, ValueError) as e:
    raise ValueError(
        f"data_dir {archive} cannot be extracted ({type(e).__name__}: "
        f"{' '.join(str(e).split())[:200]}): a damaged or incomplete "
        "archive? Copy it again, or pass an extracted folder.") from e


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str | None:
  """Returns `data_dir`, or for an archive the extracted tree inside it.

  Args:
    data_dir: a directory, an archive path, or None.

  Returns:
    A directory path (unchanged when `data_dir` is not an archive).

  Raises:
    FileNotFoundError: when the archive does not exist or holds no tree.
    ValueError: when it cannot be extracted, or holds a damaged or
      incomplete CIFAR release (naming the files).
  """
  if not is_archive(data_dir):
    return None if data_dir is None else str(data_dir)
  archive = pathlib.Path(data_dir).expanduser().resolve()
  if not archive.is_file():
    raise FileNotFoundError(
        f"data_dir {archive} looks like an archive but does not exist. Pass "
        "the path of an existing .tar.gz/.zip of train/ and test/ class "
        "folders or of a CIFAR python release, or an extracted directory.")
  stamp = _stamp(archive)
  key = hashlib.sha1(str(archive).encode()).hexdigest()[:12]
  target = cache_root() / f"{archive.name.split('.')[0]}-{key}"
  if _read_stamp(target) == stamp:
    try:
      tree = _find_tree(target, archive)
      if not _release_problems(tree):
        return str(tree)
    except FileNotFoundError:
      pass
    # Changed since it was checked: the archive is the truth, extract again.
  target.parent.mkdir(parents=True, exist_ok=True)
  _remove_abandoned(target.parent)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=target.parent))
  old = None
  try:
    _extract(archive, tmp)
    bad = _release_problems(_find_tree(tmp, archive))
    if bad:
      raise ValueError(
          f"data_dir {archive} holds a damaged or incomplete CIFAR release: "
          f"{'; '.join(bad)}. Copy or download the archive again (nothing "
          "from it was kept).")
    (tmp / STAMP).write_text(json.dumps(stamp))
    if _read_stamp(target) == stamp:  # another process got there first
      return str(_find_tree(target, archive))
    if target.exists():  # an older copy of the archive: replace it
      old = pathlib.Path(tempfile.mkdtemp(prefix=_tmp_prefix(),
                                          dir=target.parent))
      os.rename(target, old / "stale")
    try:
      os.rename(tmp, target)
    except OSError:
      if _read_stamp(target) != stamp:  # lost a race only if the winner
        raise                          # finished
  finally:
    for path in (tmp, old):
      if path is not None and path.exists():
        shutil.rmtree(path, ignore_errors=True)
  return str(_find_tree(target, archive))
