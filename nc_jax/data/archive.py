"""Data shipped as archives (`.tar.gz`, `.tgz`, `.tar`, `.zip`): image-folder
trees, or a CIFAR python release (`cifar-10-python.tar.gz`).

`data_dir` may name such an archive instead of a directory: it is extracted
once into nc_jax's cache folder (`$NC_JAX_CACHE`, default `~/.cache/nc_jax`;
see `nc_jax.cache`) and the tree inside is used. The cache folder is named
by the archive's path, size and modification time, so a new copy gets its
own extraction and one in use is never changed under a running job.

Extraction goes to a temporary folder renamed into place, so concurrent
processes never see a partial tree; one left by a killed process is
removed by a later extraction on the same host. A CIFAR release is checked
file by file (md5) before it is put in the cache: a damaged or incomplete
archive stops with an error naming the archive and the files, and leaves
nothing behind, so the corrected copy is extracted afresh.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import socket
import tarfile
import tempfile
import time
import zipfile

from nc_jax import cache
from nc_jax.data import cifar_release

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def is_archive(path: str | os.PathLike | None) -> bool:
  return path is not None and str(path).endswith(ARCHIVE_SUFFIXES)


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


def _release_problems(tree: pathlib.Path) -> list[str]:
  """The damaged or missing files of every CIFAR release in `tree` (none
  when it holds no release)."""
  out = []
  for name in cifar_release.RELEASES:
    found = cifar_release.find(str(tree), name)
    if found and found[0].dataset == name:
      out += cifar_release.problems(*found)
  return out


# Temporary extraction folders: `.extract-<pid>@<host>@<random>` ("@" is in
# no host name, so the owner is parsed exactly).
_TMP = ".extract-"


def _tmp_prefix() -> str:
  return f"{_TMP}{os.getpid()}@{socket.gethostname()}@"


def _remove_abandoned(parent: pathlib.Path, min_age_s: float = 600.0) -> None:
  """Deletes this host's temporary extractions whose process has died (a
  kill mid-extraction) and which have not changed for `min_age_s`; those of
  live processes and of other hosts stay."""
  host = socket.gethostname()
  for path in parent.glob(f"{_TMP}*"):
    pid, _, rest = path.name[len(_TMP):].partition("@")
    owner, sep, _ = rest.partition("@")
    if not (sep and owner == host and pid.isdigit()):
      continue
    try:
      if time.time() - path.stat().st_mtime < min_age_s:
        continue
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(path, ignore_errors=True)
    except OSError:  # alive (another user's), or already gone
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
  st = archive.stat()
  key = hashlib.sha1(f"{archive}:{st.st_size}:{st.st_mtime_ns}".encode()
                     ).hexdigest()[:12]
  target = cache.cache_root() / f"{archive.name.split('.')[0]}-{key}"
  if target.is_dir():
    tree = _find_tree(target, archive)
    bad = _release_problems(tree)
    if not bad:
      return str(tree)
    # Checked when it was extracted, so altered since: it is no copy of the
    # archive any more.
    raise ValueError(
        f"{target}, nc_jax's extraction of {archive}, has been altered "
        f"since: {'; '.join(bad)}. Delete that folder; the next run "
        "extracts the archive again.")
  target.parent.mkdir(parents=True, exist_ok=True)
  _remove_abandoned(target.parent)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=target.parent))
  try:
    _extract(archive, tmp)
    bad = _release_problems(_find_tree(tmp, archive))
    if bad:
      raise ValueError(
          f"data_dir {archive} holds a damaged or incomplete CIFAR release: "
          f"{'; '.join(bad)}. Copy or download the archive again (nothing "
          "from it was kept).")
    try:
      os.rename(tmp, target)
    except OSError:
      if not target.is_dir():  # lost a race only if the winner finished
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return str(_find_tree(target, archive))
