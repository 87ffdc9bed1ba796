"""The CIFAR python releases as `data_dir`: forms, order, subset, damage.

The logic (the three forms, the order, the md5 checks, damage, archives) is
tested on small releases written here in the releases' pickle layout, with
their md5s registered for the test. What only the original CIFAR-10 release
can show (its order and labels, the reference's subset of it, an image
tree made from it, a damaged copy on the command line) is the real-data
tier (`real_data`: $NC_JAX_CIFAR10_RELEASE, tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
import shutil
import tarfile

import numpy as np
import pytest

from nc_jax.data import archive
from nc_jax.data import cifar_release
from nc_jax.data import sources
from nc_jax.data import in_memory

CIFAR10_R001 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
           "horse", "ship", "truck")


def _write_cifar10(root: pathlib.Path, *, per_batch=20, seed=0):
  """A `cifar-10-batches-py/` in the release's pickle layout: five train
  batches and a test batch of `per_batch` images each (two of every class
  per batch, shuffled), and `batches.meta`. Returns (folder, {split:
  (data (N, 3072) uint8, labels (N,))}) in the release's order."""
  rng = np.random.default_rng(seed)
  folder = root / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  out = {"train": ([], []), "test": ([], [])}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    labels = np.repeat(np.arange(10), per_batch // 10)
    rng.shuffle(labels)
    data = rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8)
    with open(folder / name, "wb") as f:
      pickle.dump({"batch_label": name, "labels": labels.tolist(),
                   "data": data, "filenames": [f"{name}_{i}.png" for i in
                                               range(labels.size)]}, f)
    split = "test" if name == "test_batch" else "train"
    out[split][0].append(data)
    out[split][1].append(labels)
  with open(folder / "batches.meta", "wb") as f:
    pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch":
                 per_batch, "num_vis": 3072}, f)
  return folder, {k: (np.concatenate(d), np.concatenate(l))
                  for k, (d, l) in out.items()}


@pytest.fixture
def release(tmp_path, monkeypatch):
  """A small CIFAR-10 release: (parent folder, archive, written arrays),
  its md5s registered as the release's for this test."""
  folder, written = _write_cifar10(tmp_path / "src")
  _register_md5s(monkeypatch, "cifar10", folder)
  tgz = _tar(folder, tmp_path / "cifar-10-python.tar.gz")
  return folder.parent, tgz, written


def test_three_forms_name_one_release(release, tmp_path, monkeypatch):
  parent, tgz, written = release
  monkeypatch.setenv("NC_JAX_CACHE", str(tmp_path / "cache"))
  folder = parent / "cifar-10-batches-py"
  roots = set()
  for given in (tgz, parent, folder):
    src = sources.check_data_dir("cifar10",
                                 archive.resolve_data_dir(str(given)))
    assert src.kind == "release"
    assert pathlib.Path(src.root).name == "cifar-10-batches-py"
    sources.check_source(src)
    roots.add(src.root)
  assert len(roots) == 2  # the cache's extraction, and the folder above
  for split, n in (("train", 100), ("test", 20)):
    got = in_memory.load_split("cifar10", str(parent), split)
    data, labels = written[split]
    assert got.images.shape == (n, 32, 32, 3) and got.images.dtype == np.uint8
    np.testing.assert_array_equal(got.labels, labels)  # the release's order
    # R, G and B planes, row-major, into NHWC.
    np.testing.assert_array_equal(
        got.images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert got.ids[:2] == (f"{split}_00000", f"{split}_00001")
    assert got.class_names == CLASSES


@pytest.mark.real_data
def test_the_original_release_in_its_order(cifar10_release,
                                           cifar10_release_parent, tmp_path,
                                           monkeypatch):
  monkeypatch.setenv("NC_JAX_CACHE", str(tmp_path / "cache"))
  folder = cifar10_release_parent / "cifar-10-batches-py"
  for given in (cifar10_release, cifar10_release_parent, folder):
    src = sources.check_data_dir("cifar10",
                                 archive.resolve_data_dir(str(given)))
    sources.check_source(src)  # torchvision's md5s
  test = in_memory.load_split("cifar10", str(folder), "test")
  train = in_memory.load_split("cifar10", str(cifar10_release_parent),
                               "train")
  assert test.images.shape == (10000, 32, 32, 3)
  assert test.counts == tuple([1000] * 10)
  assert train.counts == tuple([5000] * 10)
  # The release's order: known first labels of data_batch_1 and test_batch.
  assert train.labels[:5].tolist() == [6, 9, 9, 4, 1]
  assert test.labels[:5].tolist() == [3, 8, 8, 0, 6]
  assert test.class_names == CLASSES
  with open(folder / "data_batch_1", "rb") as f:
    raw = pickle.load(f, encoding="latin1")["data"]
  np.testing.assert_array_equal(train.images[0, :, :, 0],
                                raw[0, :1024].reshape(32, 32))
  np.testing.assert_array_equal(train.images[123, :, :, 2],
                                raw[123, 2048:].reshape(32, 32))


def _per_class_positions(ids, labels, rank):
  """{class: sorted positions within the class}, via `rank(id, label)`."""
  out = {}
  for i, y in zip(ids, labels):
    out.setdefault(int(y), []).append(rank(i, int(y)))
  return {c: sorted(v) for c, v in out.items()}


@pytest.mark.slow
@pytest.mark.real_data
def test_release_subset_is_the_references_and_the_image_trees(
    cifar10_release_parent, cifar10_dir):
  rel = in_memory.load_train_lt("cifar10", str(cifar10_release_parent), 0.01,
                                "exp", 0)
  assert list(rel.counts) == CIFAR10_R001
  full = in_memory.load_split("cifar10", str(cifar10_release_parent), "train")
  # Position of each example among its class, in the release's order.
  within = np.zeros(full.labels.size, np.int64)
  for c in range(10):
    idx = np.flatnonzero(full.labels == c)
    within[idx] = np.arange(idx.size)
  pos = lambda i, y: int(within[int(i.split("_")[1])])
  got = _per_class_positions(rel.ids, rel.labels, pos)
  # The reference, from its description: RandomState(0), per class in label
  # order shuffle that class's indices in the release order, keep n_c.
  rng = np.random.RandomState(0)
  for c, n_c in enumerate(CIFAR10_R001):
    idx = np.flatnonzero(full.labels == c)
    rng.shuffle(idx)
    assert got[c] == sorted(within[idx[:n_c]].tolist())
  # An image tree of the release (file NNNN: the NNNN-th image of its
  # class) gives the same subset, and the same pixels.
  tree = in_memory.load_train_lt("cifar10", str(cifar10_dir), 0.01, "exp", 0)
  tpos = lambda i, y: int(i.split("/")[1].split(".")[0])
  assert _per_class_positions(tree.ids, tree.labels, tpos) == got
  order_rel = np.lexsort(([pos(i, int(y)) for i, y in zip(rel.ids,
                                                             rel.labels)],
                          rel.labels))
  order_tree = np.lexsort(([tpos(i, int(y)) for i, y in zip(tree.ids,
                                                             tree.labels)],
                           tree.labels))
  np.testing.assert_array_equal(rel.images[order_rel],
                                tree.images[order_tree])


# ---------------------------------------------------------------- CIFAR-100


def _write_cifar100(root: pathlib.Path, *, per_class=(6, 2), seed=0):
  """A 100-class `cifar-100-python/` in the release's pickle layout."""
  rng = np.random.default_rng(seed)
  folder = root / "cifar-100-python"
  folder.mkdir(parents=True)
  out = {}
  for split, n in zip(("train", "test"), per_class):
    labels = np.repeat(np.arange(100), n)
    rng.shuffle(labels)
    data = rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8)
    with open(folder / split, "wb") as f:
      pickle.dump({"filenames": [f"{split}_{i}.png" for i in
                                 range(labels.size)],
                   "batch_label": f"{split} batch", "fine_labels":
                   labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                   "data": data}, f)
    out[split] = (data, labels)
  with open(folder / "meta", "wb") as f:
    pickle.dump({"fine_label_names": [f"fine_{i:02d}" for i in range(100)],
                 "coarse_label_names": [f"coarse_{i}" for i in range(20)]}, f)
  return folder, out


def _register_md5s(monkeypatch, name, folder):
  release = cifar_release.RELEASES[name]
  md5 = {f: hashlib.md5((folder / f).read_bytes()).hexdigest()
         for f in release.md5}
  monkeypatch.setitem(cifar_release.RELEASES, name,
                      cifar_release.dataclasses.replace(release, md5=md5))


def test_cifar100_release_archive(tmp_path, monkeypatch):
  monkeypatch.setenv("NC_JAX_CACHE", str(tmp_path / "cache"))
  folder, written = _write_cifar100(tmp_path / "src")
  _register_md5s(monkeypatch, "cifar100", folder)
  tgz = tmp_path / "cifar-100-python.tar.gz"
  with tarfile.open(tgz, "w:gz") as tar:
    tar.add(folder, arcname="cifar-100-python")
  root = archive.resolve_data_dir(str(tgz))
  src = sources.check_data_dir("cifar100", root)
  assert src.kind == "release"
  sources.check_source(src)
  test = in_memory.load_split("cifar100", root, "test")
  data, labels = written["test"]
  np.testing.assert_array_equal(test.labels, labels)  # fine labels, in order
  np.testing.assert_array_equal(
      test.images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  assert test.class_names[:2] == ("fine_00", "fine_01")
  lt = in_memory.load_train_lt("cifar100", root, 0.5, "exp", 0)
  assert lt.counts[0] == 6 and lt.counts[-1] == 3
  # A CIFAR-10 run pointed at it is told which dataset it holds.
  with pytest.raises(ValueError, match="--config.dataset=cifar100"):
    sources.check_data_dir("cifar10", root)


# -------------------------------------------------------------- damage


def _linked_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  """A copy of a release folder made of hard links (no bytes copied)."""
  dst.mkdir(parents=True)
  for f in src.iterdir():
    os.link(f, dst / f.name)
  return dst


def _damage_missing(folder):
  (folder / "data_batch_3").unlink()


def _damage_truncated(folder):
  data = (folder / "test_batch").read_bytes()
  (folder / "test_batch").unlink()
  (folder / "test_batch").write_bytes(data[:len(data) // 2])


def _damage_flipped(folder):
  data = bytearray((folder / "data_batch_5").read_bytes())
  data[len(data) // 2] ^= 0xFF
  (folder / "data_batch_5").unlink()
  (folder / "data_batch_5").write_bytes(bytes(data))


@pytest.mark.parametrize("damage,file,fragment", [
    (_damage_missing, "data_batch_3", "is missing"),
    (_damage_truncated, "test_batch", "is not the released file"),
    (_damage_flipped, "data_batch_5", "is not the released file"),
])
def test_damaged_release_names_the_file(release, tmp_path, damage,
                                        file, fragment):
  folder = _linked_copy(release[0] / "cifar-10-batches-py",
                        tmp_path / "cifar-10-batches-py")
  damage(folder)
  src = sources.check_data_dir("cifar10", str(tmp_path))
  with pytest.raises(ValueError, match=fragment) as e:
    sources.check_source(src)
  assert str(folder / file) in str(e.value)


def test_truncated_pickle_without_md5(tmp_path, monkeypatch):
  folder, _ = _write_cifar100(tmp_path)
  release = cifar_release.RELEASES["cifar100"]
  monkeypatch.setitem(cifar_release.RELEASES, "cifar100",
                      cifar_release.dataclasses.replace(release, md5={}))
  data = (folder / "train").read_bytes()
  (folder / "train").write_bytes(data[:1000])
  with pytest.raises(ValueError, match="cannot be read") as e:
    cifar_release.read_split("cifar100", str(folder), "train")
  assert str(folder / "train") in str(e.value)


@pytest.mark.slow
@pytest.mark.real_data
def test_damaged_release_on_the_command_line(cifar10_release_parent,
                                             tmp_path):
  # A subprocess: torchvision's md5s, so the original release.
  from tests.test_cli import TINY, _assert_clean_error, _run
  folder = _linked_copy(cifar10_release_parent / "cifar-10-batches-py",
                        tmp_path / "data" / "cifar-10-batches-py")
  _damage_flipped(folder)
  out = _run([*TINY, "--config.data_dir", tmp_path / "data", "--workdir",
              tmp_path / "w"], cwd=tmp_path)
  _assert_clean_error(out, "data_batch_5", "is not the released file")
  assert not (tmp_path / "w").exists()
  shutil.rmtree(tmp_path / "data")


# ----------------------------------------------------- archives and forms


def _tar(folder: pathlib.Path, out: pathlib.Path, *, skip=()) -> pathlib.Path:
  with tarfile.open(out, "w:gz") as tar:
    for f in sorted(folder.iterdir()):
      if f.name not in skip:
        tar.add(f, arcname=f"{folder.name}/{f.name}")
  return out


def _cache_entries(cache: pathlib.Path) -> list[str]:
  return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_a_damaged_release_archive_is_not_cached(tmp_path, monkeypatch):
  """The extraction is checked before it enters the cache: the error names
  the archive and the file inside it, nothing is kept, and the good copy
  put in its place (same size and time) is then extracted and used."""
  cache = tmp_path / "cache"
  monkeypatch.setenv("NC_JAX_CACHE", str(cache))
  folder, _ = _write_cifar100(tmp_path / "src")
  _register_md5s(monkeypatch, "cifar100", folder)
  good = _tar(folder, tmp_path / "good.tar.gz")
  data = bytearray((folder / "train").read_bytes())
  data[len(data) // 2] ^= 0xFF
  (folder / "train").write_bytes(bytes(data))
  given = tmp_path / "cifar-100-python.tar.gz"
  _tar(folder, given)
  with pytest.raises(ValueError) as e:
    archive.resolve_data_dir(str(given))
  msg = str(e.value)
  assert str(given) in msg and "cifar-100-python/train is not the released" \
      in msg and "Copy or download the archive again" in msg
  assert _cache_entries(cache) == []
  # A partial archive (a member missing): named the same way.
  partial = _tar(folder, tmp_path / "partial.tar.gz", skip=("test",))
  with pytest.raises(ValueError, match="cifar-100-python/test is missing"):
    archive.resolve_data_dir(str(partial))
  assert _cache_entries(cache) == []
  # The good bytes copied over with the damaged copy's size and times.
  st = given.stat()
  shutil.copyfile(good, given)
  os.utime(given, ns=(st.st_atime_ns, st.st_mtime_ns))
  root = archive.resolve_data_dir(str(given))
  assert sources.check_data_dir("cifar100", root).kind == "release"


def test_extractions_are_per_copy_and_abandoned_ones_are_removed(
    tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  monkeypatch.setenv("NC_JAX_CACHE", str(cache))
  folder, _ = _write_cifar100(tmp_path / "src")
  _register_md5s(monkeypatch, "cifar100", folder)
  given = _tar(folder, tmp_path / "cifar-100-python.tar.gz")
  first = archive.resolve_data_dir(str(given))
  assert archive.resolve_data_dir(str(given)) == first  # from the cache
  # A kill mid-extraction leaves a temporary folder: this host's, of a dead
  # process and untouched for 10 minutes, is removed by the next
  # extraction; a live process's (pid 1), a fresh one and another host's
  # (whose name extends this one's) stay.
  host = archive.socket.gethostname()
  names = {"dead": f".extract-999999999@{host}@x",
           "live": f".extract-1@{host}@x",
           "fresh": f".extract-999999998@{host}@x",
           "other_host": f".extract-999999999@{host}-2@x"}
  for name in names.values():
    (cache / name).mkdir()
  for key in ("dead", "live", "other_host"):
    os.utime(cache / names[key], (1e9, 1e9))
  # A new copy (another modification time): its own extraction; the old
  # one, which a running job may be reading, is left as it is.
  st = given.stat()
  os.utime(given, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  second = archive.resolve_data_dir(str(given))
  assert second != first and pathlib.Path(first).is_dir()
  entries = _cache_entries(cache)
  assert names["dead"] not in entries
  assert {names[k] for k in ("live", "fresh", "other_host")} <= set(entries)
  # An extraction altered afterwards is refused, naming the folder to delete.
  (pathlib.Path(second) / "cifar-100-python" / "meta").unlink()
  with pytest.raises(ValueError, match="Delete that folder") as e:
    archive.resolve_data_dir(str(given))
  assert "cifar-100-python/meta is missing" in str(e.value)


def test_a_folder_holding_both_releases_serves_each(release, tmp_path,
                                                    monkeypatch):
  """torchvision's usual root holds cifar-10-batches-py/ and
  cifar-100-python/ side by side."""
  root = tmp_path / "data"
  _linked_copy(release[0] / "cifar-10-batches-py",
               root / "cifar-10-batches-py")
  folder, _ = _write_cifar100(root)
  _register_md5s(monkeypatch, "cifar100", folder)
  for name, sub in (("cifar10", "cifar-10-batches-py"),
                    ("cifar100", "cifar-100-python")):
    src = sources.check_data_dir(name, str(root))
    assert (src.kind, src.root) == ("release", str(root / sub))


def test_an_image_tree_with_a_stray_meta_file_is_no_release(
    tiny_image_folder, tmp_path):
  tree = tmp_path / "tree"
  shutil.copytree(tiny_image_folder, tree)
  (tree / "batches.meta").write_bytes(b"class names, kept by a converter")
  (tree / "meta").write_bytes(b"")
  assert sources.check_data_dir("cifar10", str(tree)).kind == "folder"


def test_a_renamed_release_missing_its_meta_file_names_it(release,
                                                          tmp_path):
  folder = _linked_copy(release[0] / "cifar-10-batches-py",
                        tmp_path / "c10")
  (folder / "batches.meta").unlink()
  src = sources.check_data_dir("cifar10", str(folder))
  assert src.kind == "release"
  with pytest.raises(ValueError, match="batches.meta is missing") as e:
    sources.check_source(src)
  assert str(folder / "batches.meta") in str(e.value)


def test_the_other_datasets_release_names_the_archive_given(
    release, tmp_path, monkeypatch):
  """A CIFAR-100 preset given the CIFAR-10 archive: the error names the
  archive as passed (not nc_jax's extraction of it) and both fixes."""
  from nc_jax.configs import cifar_lt
  from nc_jax import train, validation
  monkeypatch.setenv("NC_JAX_CACHE", str(tmp_path / "cache"))
  config = cifar_lt.get_config("cifar100_r0.01_etf_dr")
  config.unlock()
  release_archive = release[1]
  config.data_dir = str(release_archive)
  config.lock()
  with pytest.raises(train.ConfigError) as e:
    validation.validate_config(config)
  msg = str(e.value)
  assert msg.startswith(f"data_dir {release_archive} holds the "
                        "cifar-10-batches-py/ release"), msg
  assert str(tmp_path / "cache") not in msg
  assert "cifar-100-python.tar.gz" in msg and "cifar10_r0.01_etf_dr" in msg
