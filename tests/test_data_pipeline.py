"""Train and eval inputs on a small synthetic image-folder tree.

The tree has CIFAR-10's layout (10 class folders, 32x32 RGB, lossless PNG so
decoded pixels are exact): 40 train images per class and 10 test images per
class plus 3 more in class 0 (103, so the last eval batch is partial).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow as tf

from nc_jax import data
from nc_jax import sharding
from nc_jax.data import device as device_lib
from nc_jax.data import in_memory

MESH = sharding.make_mesh(jax.devices()[:1])
B = 16
R = 0.1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tree(root, train_per_class=40, test_per_class=10, extra_test=3,
               seed=0):
  rng = np.random.default_rng(seed)
  for split, per in (("train", train_per_class), ("test", test_per_class)):
    for c in range(10):
      d = os.path.join(root, split, f"c{c}")
      os.makedirs(d)
      n = per + (extra_test if split == "test" and c == 0 else 0)
      for i in range(n):
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        tf.io.write_file(os.path.join(d, f"{i:04d}.png"),
                         tf.io.encode_png(img))
  return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return write_tree(str(tmp_path_factory.mktemp("tree") / "tiny"))


def train_input(tree, **kw):
  args = dict(data_dir=tree, imb_factor=R, batch_size=B, seed=3, mesh=MESH)
  args.update(kw)
  return data.make_train_input("cifar10", **args)


def take(it, n):
  return [jax.tree.map(np.asarray, b) for b in itertools.islice(it, n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def subset(tree):
  return in_memory.load_train_lt("cifar10", os.path.abspath(tree), R, "exp", 0)


def test_train_input_counts_shapes_and_epoch(tree):
  ti = train_input(tree)
  want = data.long_tail_counts(40, R, num_classes=10)
  assert ti.counts == want and ti.num_examples == sum(want)
  assert ti.steps_per_epoch == sum(want) // B
  assert ti.info == data.dataset_info("cifar10")
  batches = take(ti.iterate(0), ti.steps_per_epoch)
  b = batches[0]
  assert b["image"].shape == (B, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["label"].shape == (B,) and b["label"].dtype == np.int32
  first = next(ti.iterate(0))
  assert first["image"].sharding == sharding.batch_sharding(MESH)
  # One epoch draws without replacement: every class at most its count, and
  # only the N % B remainder is missing.
  hist = np.bincount(np.concatenate([x["label"] for x in batches]),
                     minlength=10)
  assert np.all(hist <= np.asarray(want))
  assert hist.sum() == ti.num_examples - ti.num_examples % B
  perm = np.asarray(device_lib.epoch_permutation(3, 0, ti.num_examples))
  assert sorted(perm.tolist()) == list(range(ti.num_examples))


def test_same_seed_same_batches_other_seed_differs(tree):
  a = take(train_input(tree).iterate(0), 5)
  b = take(train_input(tree).iterate(0), 5)
  assert_same(a, b)
  c = take(train_input(tree, seed=4).iterate(0), 5)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("sampler", ["random", "class_balanced"])
@pytest.mark.parametrize("kind", ["tfdata", "device"])
def test_resume_reproduces_the_uninterrupted_stream(tree, kind, sampler):
  ti = train_input(tree, pipeline=kind, sampler=sampler)
  spe = ti.steps_per_epoch
  full = take(ti.iterate(0), 2 * spe + 2)
  for k in (1, spe - 1, spe, 2 * spe + 1):
    assert_same(take(ti.iterate(k), len(full) - k), full[k:])


def test_device_pipeline_equals_tfdata(tree):
  t = train_input(tree, pipeline="tfdata")
  d = train_input(tree, pipeline="device")
  assert (t.counts, t.num_examples, t.steps_per_epoch) == (
      d.counts, d.num_examples, d.steps_per_epoch)
  n = 2 * t.steps_per_epoch + 1
  tb, db = take(t.iterate(0), n), take(d.iterate(0), n)
  assert_same(tb, db)
  for lo in (0, t.steps_per_epoch):
    hist = lambda bs: np.bincount(np.concatenate(  # noqa: E731
        [x["label"] for x in bs[lo:lo + t.steps_per_epoch]]), minlength=10)
    np.testing.assert_array_equal(hist(tb), hist(db))


def test_class_balanced_device_equals_tfdata_and_is_balanced(tree):
  t = train_input(tree, pipeline="tfdata", sampler="class_balanced")
  d = train_input(tree, pipeline="device", sampler="class_balanced")
  spe = t.steps_per_epoch
  assert (t.num_examples, spe) == (d.num_examples, d.steps_per_epoch)
  epochs = 4
  tb, db = take(t.iterate(0), epochs * spe), take(d.iterate(0), epochs * spe)
  assert_same(tb, db)
  counts = np.asarray(t.counts)
  assert counts.max() / counts.min() == 10  # the instance order's imbalance
  hists = [np.bincount(np.concatenate(
      [x["label"] for x in db[e * spe:(e + 1) * spe]]), minlength=10)
           for e in range(epochs)]
  assert all(h.sum() == spe * B for h in hists)  # same samples per epoch
  total = np.sum(hists, 0)
  # About 1/K each (a 10x imbalance otherwise): every class within 50%.
  assert np.all(np.abs(total / total.mean() - 1) < 0.5), total
  assert hists[0].tolist() != hists[1].tolist()  # fresh draws each epoch
  # With replacement: the tail's images repeat within an epoch.
  arrays = subset(tree)
  order = np.asarray(device_lib.epoch_order_fn("class_balanced",
                                               arrays.labels)(3, 0))
  tail = order[arrays.labels[order] == 9]
  assert len(tail) > counts[9] and len(set(tail.tolist())) <= counts[9]


def test_class_balanced_draws_are_uniform_over_classes_then_images():
  rng = np.random.default_rng(0)
  counts = np.asarray(data.long_tail_counts(500, 0.01, num_classes=10))
  labels = rng.permutation(np.repeat(np.arange(10), counts))
  n = labels.size
  epochs = 10
  draw = jax.jit(device_lib.epoch_order_fn("class_balanced", labels))
  order = np.concatenate([np.asarray(draw(7, e)) for e in range(epochs)])
  per_class = np.bincount(labels[order], minlength=10)
  expected = epochs * n / 10
  # Chi-square against uniform classes (9 dof; 27.9 is the 0.1% level),
  # where the instance order would put 40% of the draws on class 0.
  chi2 = float(((per_class - expected) ** 2 / expected).sum())
  assert chi2 < 27.9, (chi2, per_class)
  tail = np.flatnonzero(labels == 9)  # 5 images, each about 1/5 of its class
  hits = np.array([(order == i).sum() for i in tail])
  assert np.all(np.abs(hits / (per_class[9] / len(tail)) - 1) < 0.25), hits
  # A pure function of (seed, epoch), equal on the host path.
  host = device_lib.host_epoch_order("class_balanced", 7, labels)
  np.testing.assert_array_equal(host(2), order[2 * n:3 * n])
  assert not np.array_equal(host(2), host(3))
  with pytest.raises(ValueError, match="sampler must be one of"):
    device_lib.epoch_order_fn("weighted", labels)


@pytest.mark.parametrize("count", [2, 4])
def test_simulated_processes_partition_the_global_batch(tree, count):
  whole = take(train_input(tree).iterate_local(7), 3)
  parts = [take(train_input(tree, _process=(p, count)).iterate_local(7), 3)
           for p in range(count)]
  for s in range(3):
    for k in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([parts[p][s][k] for p in range(count)]),
          whole[s][k])
  assert parts[0][0]["image"].shape[0] == B // count


def test_crops_are_windows_of_the_zero_padded_image(tree):
  ti = train_input(tree)
  arrays = subset(tree)
  n, pad = ti.num_examples, device_lib.PAD
  perm = np.asarray(device_lib.epoch_permutation(3, 0, n))
  padded = np.pad(arrays.images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  seen = set()
  for s, b in enumerate(take(ti.iterate(0), 3)):
    idx = perm[s * B:(s + 1) * B]
    np.testing.assert_array_equal(b["label"], arrays.labels[idx])
    dy, dx, fl = (np.asarray(a) for a in device_lib.augment_draws(
        3, s, np.arange(B)))
    for r in range(B):
      src, out = padded[idx[r]], b["image"][r]
      matches = [(y, x, f) for y in range(2 * pad + 1)
                 for x in range(2 * pad + 1) for f in (0, 1)
                 if np.array_equal(
                     out, (lambda w: w[:, ::-1] if f else w)(
                         src[y:y + 32, x:x + 32]))]
      assert (dy[r], dx[r], fl[r]) in matches
      seen.add((int(dy[r]), int(dx[r]), int(fl[r])))
  assert len({f for _, _, f in seen}) == 2  # both flips happen
  assert len({(y, x) for y, x, _ in seen}) > 10  # offsets vary


def test_eval_covers_every_test_image_once(tree):
  ev = data.make_eval_input("cifar10", data_dir=tree, batch_size=B, mesh=MESH)
  assert ev.num_examples == 103 and ev.num_batches == 7
  batches = take(ev.iterate(), 100)
  assert len(batches) == 7
  assert all(b["image"].shape == (B, 32, 32, 3) for b in batches)
  assert batches[-1]["mask"].sum() == 103 - 6 * B
  assert not batches[-1]["mask"][-1]
  mask = np.concatenate([b["mask"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])[mask]
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert np.bincount(labels).tolist() == [13] + [10] * 9
  ref = in_memory.load_split("cifar10", os.path.abspath(tree), "test")
  np.testing.assert_array_equal(images, ref.images)
  np.testing.assert_array_equal(labels, ref.labels)
  # Every image distinct (random noise), so "exactly once" is checkable.
  assert len({x.tobytes() for x in images}) == 103
  # Two processes: their masked rows together are the whole split.
  parts = [take(data.make_eval_input(
      "cifar10", data_dir=tree, batch_size=B, mesh=MESH,
      _process=(p, 2)).iterate_local(), 100) for p in range(2)]
  joined = np.concatenate([np.concatenate([parts[0][i]["label"],
                                           parts[1][i]["label"]])
                           for i in range(7)])
  jmask = np.concatenate([np.concatenate([parts[0][i]["mask"],
                                          parts[1][i]["mask"]])
                          for i in range(7)])
  np.testing.assert_array_equal(joined[jmask], ref.labels)


def test_eval_over_the_long_tailed_train_subset(tree):
  ev = data.make_eval_input("cifar10", data_dir=tree, batch_size=B,
                            mesh=MESH, split="train_lt", imb_factor=R)
  arrays = subset(tree)
  batches = take(ev.iterate(), 100)
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(
      np.concatenate([b["image"] for b in batches])[mask], arrays.images)
  assert ev.num_examples == sum(data.long_tail_counts(40, R, num_classes=10))
  with pytest.raises(ValueError, match="imb_factor"):
    data.make_eval_input("cifar10", data_dir=tree, batch_size=B, mesh=MESH,
                         split="train_lt")


def test_argument_errors(tree):
  with pytest.raises(ValueError, match="pipeline"):
    train_input(tree, pipeline="grain")
  with pytest.raises(ValueError, match="sampler"):
    train_input(tree, sampler="balanced")
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    train_input(tree, imb_factor=0)
  with pytest.raises(ValueError, match="split"):
    data.make_eval_input("cifar10", data_dir=tree, batch_size=B, mesh=MESH,
                         split="val")
  with pytest.raises(ValueError, match="fewer than one batch"):
    train_input(tree, batch_size=4096)
  with pytest.raises(ValueError, match="iterate_local"):
    train_input(tree, pipeline="device").iterate_local(0)


def test_folder_with_wrong_image_size_is_explained(tmp_path):
  for split in ("train", "test"):
    for c in range(10):
      d = tmp_path / split / f"c{c}"
      d.mkdir(parents=True)
      tf.io.write_file(str(d / "0.png"), tf.io.encode_png(
          np.zeros((8, 8, 3), np.uint8)))
  with pytest.raises(ValueError, match=r"do not all decode to \(32, 32, 3\).*is 8x8, not 32x32"):
    data.make_eval_input("cifar10", data_dir=tmp_path, batch_size=4,
                         mesh=MESH)


_EIGHT_DEVICES = textwrap.dedent("""
    import itertools, sys
    import jax, numpy as np
    from nc_jax import data, sharding
    tree = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh()
    kw = dict(data_dir=tree, imb_factor=0.1, batch_size=32, seed=5, mesh=mesh)
    t = data.make_train_input("cifar10", pipeline="tfdata", **kw)
    d = data.make_train_input("cifar10", pipeline="device", **kw)
    spe = t.steps_per_epoch
    for bt, bd in zip(itertools.islice(t.iterate(spe - 1), 3),
                      itertools.islice(d.iterate(spe - 1), 3)):
      for k in ("image", "label"):
        assert bt[k].shape[0] == 32 and len(bt[k].addressable_shards) == 8
        assert bd[k].sharding == sharding.batch_sharding(mesh)
        assert {s.data.shape[0] for s in bd[k].addressable_shards} == {4}
        np.testing.assert_array_equal(np.asarray(bt[k]), np.asarray(bd[k]))
    ev = data.make_eval_input("cifar10", data_dir=tree, batch_size=24,
                              mesh=mesh)
    n = sum(int(np.asarray(b["mask"]).sum()) for b in ev.iterate())
    assert n == 103, n
    try:
      data.make_eval_input("cifar10", data_dir=tree, batch_size=20, mesh=mesh)
    except ValueError as e:
      assert "multiple of 8" in str(e)
    else:
      raise AssertionError("batch 20 on 8 devices should fail")
    print("EIGHT_OK")
""")


@pytest.mark.slow
def test_eight_cpu_devices_in_a_subprocess(tree):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, tree], env=env,
                       capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 0 and "EIGHT_OK" in out.stdout, (
      out.stdout[-3000:] + out.stderr[-3000:])


def test_folder_listing_is_natural_order_and_tf_free_decode_matches(
    tmp_path, monkeypatch):
  """Files sort by the value of their digit runs (9 < 10 < 100), whatever
  the zero padding, classes by name; Pillow decodes the same pixels as TF."""
  from nc_jax.data import folders
  names = ["10.png", "9.png", "100.png", "a2.png", "a10.png", "notes.txt"]
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for cls in ("b", "a"):
      d = tmp_path / split / cls
      d.mkdir(parents=True)
      for n in names:
        if n.endswith(".png"):
          tf.io.write_file(str(d / n), tf.io.encode_png(
              rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        else:
          (d / n).write_text("not an image")
  listing = folders.list_tree(str(tmp_path))
  assert listing.classes == ("a", "b")
  order = ["9.png", "10.png", "100.png", "a2.png", "a10.png"]
  assert listing.splits["train"].ids == tuple(
      [f"a/{n}" for n in order] + [f"b/{n}" for n in order])
  assert listing.splits["train"].labels.tolist() == [0] * 5 + [1] * 5
  paths = listing.paths("train")
  with_tf = folders.decode(paths, (32, 32, 3))
  monkeypatch.setattr(folders, "_have_tf", lambda: False)
  np.testing.assert_array_equal(folders.decode(paths, (32, 32, 3)), with_tf)
  with pytest.raises(ValueError, match="do not all decode"):
    folders.decode(paths, (16, 16, 3))


def test_subset_record_names_the_selected_files(tree):
  arrays = subset(tree)
  rec = arrays.subset_record()
  assert rec["classes"] == [f"c{c}" for c in range(10)]
  assert [len(x) for x in rec["images"]] == list(arrays.counts)
  # Reference selection over the natural order of each class folder.
  rng = np.random.RandomState(0)
  for c, ids in enumerate(rec["images"]):
    perm = np.arange(40)
    rng.shuffle(perm)
    assert ids == [f"c{c}/{i:04d}.png" for i in sorted(perm[:len(ids)])]


def test_svhn_folder_without_extra_stops_unless_told(tree):
  """The SVHN recipe trains on train + extra; a folder without extra/ must
  not silently train on train alone."""
  with pytest.raises(ValueError, match=r"no extra/ folder.*train_splits=train"):
    data.make_train_input("svhn", data_dir=tree, imb_factor=R, batch_size=B,
                          seed=0, mesh=MESH)
  ti = data.make_train_input("svhn", data_dir=tree, imb_factor=R,
                             batch_size=B, seed=0, mesh=MESH,
                             options={"train_splits": ("train",)})
  assert ti.counts == data.long_tail_counts(40, R, num_classes=10)
