"""ImageNet-LT: list parsing, tfds imagenet2012 mock + tiny list, folder tree."""

from __future__ import annotations

import itertools
import shutil

import jax
import numpy as np
from PIL import Image
from PIL import ImageEnhance
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nc_jax import data
from nc_jax import sharding
from nc_jax.data import augment
from nc_jax.data import device as device_lib
from nc_jax.data import imagenet_lt
from nc_jax.data import long_tail
from nc_jax.data import datasets
from nc_jax.data import sources

MESH = sharding.make_mesh(jax.devices()[:1])
N_MOCK = 24


def take(it, n):
  return [jax.tree.map(np.asarray, b) for b in itertools.islice(it, n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_read_split_list(tmp_path):
  p = tmp_path / "list.txt"
  p.write_text("train/n01440764/n01440764_10026.JPEG 0\n\n"
               "train/n01443537/a b.JPEG 1\n")
  paths, labels = imagenet_lt.read_split_list(p)
  assert paths == ["train/n01440764/n01440764_10026.JPEG",
                   "train/n01443537/a b.JPEG"]
  assert labels.tolist() == [0, 1]
  p.write_text("train/x.JPEG\n")
  with pytest.raises(ValueError, match="list.txt:1"):
    imagenet_lt.read_split_list(p)
  with pytest.raises(FileNotFoundError, match="imagenet_lt_train_list"):
    imagenet_lt.read_split_list(None)


@pytest.fixture
def mock_imagenet(tmp_path):
  """A tfds-style data_dir and a list of every other mocked example."""
  (tmp_path / "imagenet2012").mkdir()
  with tfds.testing.mock_data(num_examples=N_MOCK):
    src = sources.check_data_dir("imagenet_lt", tmp_path)
    names = [ex["file_name"].decode() for ex in
             sources.encoded_dataset(src, "train").as_numpy_iterator()]
    listed = names[::2]
    # Labels chosen here, not the mock's: the list is authoritative.
    lines = [f"train/n{i % 3:08d}/{n} {7 * (i % 3)}"
             for i, n in enumerate(listed)]
    lst = tmp_path / "ImageNet_LT_train.txt"
    lst.write_text("\n".join(lines) + "\n")
    yield str(tmp_path), str(lst)


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
def test_tfds_imagenet_lt_train_stream(mock_imagenet):
  root, lst = mock_imagenet
  kw = dict(data_dir=root, imb_factor=1.0, batch_size=4, seed=2, mesh=MESH,
            options={"imagenet_lt_train_list": lst})
  ti = data.make_train_input("imagenet_lt", **kw)
  assert ti.num_examples == N_MOCK // 2 and ti.steps_per_epoch == 3
  assert ti.counts[0] == 4 and ti.counts[7] == 4 and ti.counts[14] == 4
  assert sum(ti.counts) == 12
  # The reference's rank groups: the three listed classes lead the ranks.
  head = ti.info.class_groups["head"]
  assert {0, 7, 14} <= set(head) and len(head) == 390
  assert ti.info.class_groups == long_tail.class_groupings(
      ti.counts)["by_rank"]
  full = take(ti.iterate(0), 7)
  b = full[0]
  assert b["image"].shape == (4, 224, 224, 3) and b["image"].dtype == np.uint8
  assert set(np.concatenate([x["label"] for x in full])) <= {0, 7, 14}
  # One epoch: each listed image once (4 per class, 12 = 3 full batches).
  epoch = np.concatenate([x["label"] for x in full[:3]])
  assert np.bincount(epoch, minlength=15)[[0, 7, 14]].tolist() == [4, 4, 4]
  assert_same(take(data.make_train_input("imagenet_lt", **kw).iterate(0), 7),
              full)
  for k in (2, 3, 4):
    assert_same(take(ti.iterate(k), 7 - k), full[k:])
  parts = [take(data.make_train_input("imagenet_lt", _process=(p, 2), **kw)
                .iterate_local(1), 2) for p in range(2)]
  for s in range(2):
    np.testing.assert_array_equal(
        np.concatenate([parts[0][s]["image"], parts[1][s]["image"]]),
        full[1 + s]["image"])
  with pytest.raises(ValueError, match="tfdata"):
    data.make_train_input("imagenet_lt", pipeline="device", **kw)
  with pytest.raises(ValueError, match="image-folder"):
    data.make_train_input("imagenet_lt", sampler="class_balanced", **kw)


def test_tfds_imagenet_lt_eval(mock_imagenet):
  root, lst = mock_imagenet  # the fixture keeps tfds mocked
  src = sources.check_data_dir("imagenet_lt", root)
  labels = [int(ex["label"]) for ex in
            sources.encoded_dataset(src, "test").as_numpy_iterator()]
  ev = data.make_eval_input("imagenet_lt", data_dir=root, batch_size=10,
                            mesh=MESH)
  batches = take(ev.iterate(), 100)
  tl = data.make_eval_input("imagenet_lt", data_dir=root, batch_size=8,
                            mesh=MESH, split="train_lt",
                            options={"imagenet_lt_train_list": lst})
  tb = take(tl.iterate(), 100)
  assert ev.num_examples == N_MOCK and len(batches) == 3
  assert batches[0]["image"].shape == (10, 224, 224, 3)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == N_MOCK and not mask[-1]
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in batches])[mask], labels)
  assert not np.concatenate([b["image"] for b in batches])[~mask].any()
  tmask = np.concatenate([b["mask"] for b in tb])
  assert tmask.sum() == 12 and len(tb) == 2
  assert np.bincount(np.concatenate([b["label"] for b in tb])[tmask]
                     ).tolist()[::7] == [4, 4, 4]


def _folder_tree(root) -> str:
  """A 3-class ImageNet-style tree (5 images of varied sizes per class and
  split) and a train list keeping 4 / 3 / 2 of them; returns the list."""
  rng = np.random.default_rng(0)
  lines = []
  for split in ("train", "test"):
    for c in range(3):
      d = root / split / f"n{c:08d}"
      d.mkdir(parents=True)
      for i in range(5):
        hw = rng.integers(20, 60, 2)
        img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        tf.io.write_file(str(d / f"{i}.JPEG"), tf.io.encode_jpeg(img))
        if split == "train" and i < 4 - c:
          lines.append(f"train/n{c:08d}/{i}.JPEG {c}")
  lst = root / "list.txt"
  lst.write_text("\n".join(lines))
  return str(lst)


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
def test_folder_imagenet_lt(tmp_path):
  lst = _folder_tree(tmp_path)
  kw = dict(data_dir=tmp_path, imb_factor=1.0, batch_size=3, seed=0,
            mesh=MESH, options={"imagenet_lt_train_list": str(lst)})
  ti = data.make_train_input("imagenet_lt", **kw)
  assert ti.counts[:3] == [4, 3, 2] and ti.steps_per_epoch == 3
  # Both groupings reach the training loop, and the note names them.
  assert set(ti.extra_groups) == {"many_shot", "medium_shot", "few_shot"}
  assert set(ti.info.class_groups) == {"head", "medium", "tail"}
  assert ti.extra_groups["few_shot"][:3] == (0, 1, 2)  # all < 20 images
  assert "390-835" in ti.groups_note and "< 20" in ti.groups_note
  full = take(ti.iterate(0), 7)
  assert full[0]["image"].shape == (3, 224, 224, 3)
  assert np.bincount(np.concatenate([b["label"] for b in full[:3]])
                     ).tolist() == [4, 3, 2]
  assert_same(take(ti.iterate(4), 3), full[4:])
  ev = data.make_eval_input("imagenet_lt", data_dir=tmp_path, batch_size=4,
                            mesh=MESH)
  evs = take(ev.iterate(), 100)
  mask = np.concatenate([b["mask"] for b in evs])
  assert ev.num_examples == 15 and mask.sum() == 15 and len(evs) == 4
  assert np.bincount(np.concatenate([b["label"] for b in evs])[mask]
                     ).tolist() == [5, 5, 5]
  # The class-balanced sampler: the shared plan's draws, resumable.
  cb = data.make_train_input("imagenet_lt", sampler="class_balanced", **kw)
  draws = take(cb.iterate(0), 6)
  order = device_lib.host_epoch_order(
      "class_balanced", 0, np.repeat(np.arange(3), [4, 3, 2]))(0)
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in draws[:3]]),
      np.repeat(np.arange(3), [4, 3, 2])[order[:9]])
  assert_same(take(cb.iterate(4), 2), draws[4:])


def test_tfds_stream_detects_listed_images_missing(mock_imagenet, tmp_path):
  root, lst = mock_imagenet
  bad = tmp_path / "bad.txt"
  bad.write_text(open(lst).read() + "".join(
      f"train/n00000000/missing_{i}.JPEG 0\n" for i in range(4)))
  ti = data.make_train_input("imagenet_lt", data_dir=root, imb_factor=1.0,
                             batch_size=4, seed=0, mesh=MESH,
                             options={"imagenet_lt_train_list": str(bad)})
  assert ti.steps_per_epoch == 4  # 16 listed, only 12 exist
  with pytest.raises(RuntimeError, match="fewer than the 16 listed"):
    take(ti.iterate(0), 5)


# ------------------------------------------------------------- class groups

# np.argsort(-counts) as numpy 1.24 (the classic introsort, before SIMD
# dispatch) returns it for np.random.RandomState(1).randint(0, 3, 40).
COUNTS_40 = [1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 2, 1, 2, 0, 2, 1, 2, 0, 0, 2, 0,
             1, 2, 2, 0, 1, 1, 2, 0, 2, 1, 1, 1, 1, 2, 1, 1, 0, 0]
NUMPY124_ORDER_40 = [13, 24, 23, 28, 35, 20, 30, 17, 15, 11, 22, 16, 31, 0, 12,
                     32, 9, 33, 7, 34, 4, 3, 36, 37, 27, 26, 29, 19, 21, 38, 18,
                     14, 10, 8, 6, 5, 2, 1, 25, 39]


def test_rank_by_count_reproduces_numpy_introsort_ties():
  order = long_tail.rank_by_count(COUNTS_40)
  assert order.tolist() == NUMPY124_ORDER_40
  stable = long_tail.rank_by_count(COUNTS_40, ties="stable")
  assert stable.tolist() == np.argsort(-np.asarray(COUNTS_40),
                                       kind="stable").tolist()
  assert stable.tolist() != order.tolist()  # Ties are ordered differently.
  counts = np.asarray(COUNTS_40)
  np.testing.assert_array_equal(counts[order], counts[stable])
  with pytest.raises(ValueError, match="ties"):
    long_tail.rank_by_count(COUNTS_40, ties="random")


def test_introsort_argsort_sorts_and_its_heapsort_is_numpys():
  # pylint: disable=protected-access
  rng = np.random.RandomState(0)
  for n in (0, 1, 16, 17, 300):
    keys = rng.randint(0, 4, n)
    order = long_tail._introsort_argsort(keys)
    assert sorted(order) == list(range(n))
    assert np.all(np.diff(keys[order]) >= 0)
  # The depth-limit fallback, against numpy 1.24's argsort(kind="heapsort")
  # of np.random.RandomState(5).randint(0, 4, 30).
  keys = [3, 2, 3, 1, 2, 2, 0, 1, 0, 0, 3, 2, 3, 0, 2, 0, 3, 0, 3, 1, 1, 3, 0,
          3, 0, 1, 3, 1, 3, 2]
  heap = list(range(30))
  long_tail._heapsort(keys, heap, 0, 30)
  assert heap == [6, 9, 24, 13, 17, 15, 22, 8, 27, 19, 25, 7, 3, 20, 14, 5,
                  11, 4, 1, 29, 28, 12, 23, 2, 21, 26, 10, 18, 16, 0]


def test_class_groupings_by_rank_and_by_count():
  # About five classes per count value: ties straddle both rank boundaries.
  counts = np.random.RandomState(3).randint(1, 200, 1000)
  groups = long_tail.class_groupings(counts)
  ref, lit = groups["by_rank"], groups["by_count"]
  assert [len(ref[g]) for g in ("head", "medium", "tail")] == [390, 445, 165]
  assert sorted(ref["head"] + ref["medium"] + ref["tail"]) == list(range(1000))
  for g in ref.values():
    assert list(g) == sorted(g)
  assert counts[list(ref["head"])].min() >= counts[list(ref["medium"])].max()
  assert counts[list(ref["medium"])].min() >= counts[list(ref["tail"])].max()
  # Ranks 388-390 all have 121 images (classes 114, 648, 654): numpy 1.24's
  # np.argsort(-counts) keeps 114 and 654 in the head, a stable sort 114 and
  # 648 (numpy 2.4 on an AVX-512 CPU: 648 and 654).
  tied = [c for c in range(1000) if counts[c] == 121]
  assert tied == [114, 648, 654]
  assert [c for c in tied if c in ref["head"]] == [114, 654]
  stable = long_tail.groups_by_rank(counts, ties="stable")
  assert [c for c in tied if c in stable["head"]] == [114, 648]
  # Seven classes of 30 images straddle rank 835.
  tied = [c for c in range(1000) if counts[c] == 30]
  assert [c for c in tied if c in ref["medium"]] == [98, 585, 587]
  assert [c for c in tied if c in stable["medium"]] == [98, 224, 330]
  # The literature's split: > 100, 20..100, < 20 images.
  assert lit == long_tail.groups_by_count(counts)
  assert all(counts[c] > 100 for c in lit["head"])
  assert all(20 <= counts[c] <= 100 for c in lit["medium"])
  assert all(counts[c] < 20 for c in lit["tail"])
  with pytest.raises(ValueError, match="tile"):
    long_tail.groups_by_rank(counts[:999])
  with pytest.raises(ValueError, match="tile"):
    long_tail.groups_by_rank(counts, (("head", 0, 500), ("tail", 501, 1000)))


def test_stream_class_groups_from_a_train_list_with_ties(tmp_path):
  # Classes 3 and 9 tie at the top (3 images), 5 has 2 (tied with nothing),
  # and 1 and 2 tie with 1 image; the 995 absent classes tie at 0.
  (tmp_path / "imagenet2012").mkdir()
  with tfds.testing.mock_data(num_examples=N_MOCK):
    src = sources.check_data_dir("imagenet_lt", tmp_path)
    names = [ex["file_name"].decode() for ex in
             sources.encoded_dataset(src, "train").as_numpy_iterator()]
    labels = [3, 9, 3, 9, 3, 9, 5, 5, 1, 2]
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"train/x/{n} {y}\n"
                           for n, y in zip(names, labels)))
    info = datasets.dataset_info("imagenet_lt")
    stream = imagenet_lt.make_train_stream(
        info, data_dir=str(tmp_path), train_list=str(lst), batch_size=2,
        seed=0, rows=(0, 2))
    ev = imagenet_lt.make_eval_stream(
        info, data_dir=str(tmp_path), split="train_lt", batch_size=2,
        rows=(0, 2), train_list=str(lst))
    # The jitter strength is a stream parameter; 0 turns it off.
    plain = imagenet_lt.make_train_stream(
        info, data_dir=str(tmp_path), train_list=str(lst), batch_size=2,
        seed=0, rows=(0, 2), color_jitter=0.0)
    a, b = take(stream.iterate_local(0), 1)[0], take(plain.iterate_local(0),
                                                     1)[0]
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], b["image"])
    with pytest.raises(ValueError, match="color_jitter"):
      imagenet_lt.make_train_stream(
          info, data_dir=str(tmp_path), train_list=str(lst), batch_size=2,
          seed=0, rows=(0, 2), color_jitter=-1)
  counts = stream.counts
  assert [counts[c] for c in (1, 2, 3, 5, 9)] == [1, 1, 3, 2, 3]
  order = long_tail.rank_by_count(counts)
  assert sorted(order[:2]) == [3, 9] and order[2] == 5
  assert sorted(order[3:5]) == [1, 2]
  expected = long_tail.class_groupings(counts)
  assert stream.info.class_groups == expected["by_rank"]
  assert stream.class_groups_by_count == expected["by_count"]
  assert {1, 2, 3, 5, 9} <= set(stream.info.class_groups["head"])
  assert stream.class_groups_by_count["tail"] == tuple(range(1000))
  assert ev.info.class_groups == expected["by_rank"]
  assert ev.class_groups_by_count == expected["by_count"]


# ------------------------------------------------------------ preprocessing


def _pil_jitter(img, factors, order):
  pil = Image.fromarray(img)
  ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
  for i in order:
    pil = ops[i](pil).enhance(float(factors[i]))
  return np.asarray(pil)


def test_color_jitter_ops_equal_pil():
  # torchvision's ColorJitter on the reference's PIL images is PIL's
  # ImageEnhance: uint8 after every op, grayscale by PIL's integer luma.
  rng = np.random.default_rng(0)
  for trial in range(6):
    img = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    if trial % 2:
      img = (img // 4 + 100).astype(np.uint8)  # Low contrast.
    factors = rng.uniform(0.6, 1.4, 3).astype(np.float32)
    order = rng.permutation(3)
    out = augment.apply_color_jitter(
        tf.constant(img, tf.float32), tf.constant(factors),
        tf.constant(order, tf.int32))
    np.testing.assert_array_equal(out.numpy(),
                                  _pil_jitter(img, factors, order))


def test_color_jitter_is_seeded_and_switchable():
  img = tf.constant(np.random.default_rng(1).integers(
      0, 256, (16, 16, 3)).astype(np.float32))
  seed = tf.constant([3, 4], tf.int64)
  a = augment.color_jitter(img, seed, 0.4).numpy()
  np.testing.assert_array_equal(a, augment.color_jitter(img, seed).numpy())
  assert not np.array_equal(a, augment.color_jitter(
      img, tf.constant([3, 5], tf.int64)).numpy())
  assert not np.array_equal(a, img.numpy())
  assert augment.color_jitter(img, seed, 0.0) is img
  with pytest.raises(ValueError, match="color_jitter"):
    augment.color_jitter(img, seed, -0.1)
  # Strength 1: factors from [0, 2], as torchvision's max(0, 1 - s).
  assert np.all(np.isin(augment.color_jitter(img, seed, 1.0).numpy(),
                        np.arange(256)))


def test_train_preprocess_jitter_parameter():
  img = np.random.default_rng(2).integers(0, 256, (40, 50, 3), np.uint8)
  enc = tf.io.encode_png(img)
  seed = tf.constant([1, 2], tf.int64)
  plain = augment.train_preprocess(enc, seed, 0.0).numpy()
  jittered = augment.train_preprocess(enc, seed).numpy()
  assert plain.shape == jittered.shape == (224, 224, 3)
  assert not np.array_equal(plain, jittered)
  np.testing.assert_array_equal(
      jittered, augment.train_preprocess(enc, seed, 0.4).numpy())


def test_eval_resize_and_center_crop_as_torchvision():
  shape = lambda h, w: augment.resized_shape(  # noqa: E731
      tf.constant(h), tf.constant(w)).numpy().tolist()
  # int(256 * long / short): 256.85 -> 256 (rounding would give 257).
  assert shape(300, 301) == [256, 256]
  assert shape(375, 500) == [256, 341] and shape(500, 333) == [384, 256]
  assert shape(256, 343) == [256, 343]
  # No resize at 256 x 343; the crop's left edge is round(119 / 2) = 60
  # (half to even), not 59.
  cols = np.broadcast_to((np.arange(343) % 256).astype(np.uint8)[
      None, :, None], (256, 343, 3))
  out = augment.eval_preprocess(tf.io.encode_png(cols)).numpy()
  np.testing.assert_array_equal(out[0, :, 0], cols[0, 60:284, 0])
  # Against PIL's antialiased bilinear Resize(256) + CenterCrop(224).
  rng = np.random.default_rng(0)
  for h, w in ((300, 301), (375, 500)):
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    pil = Image.fromarray(img)
    nh, nw = shape(h, w)
    pil = pil.resize((nw, nh), Image.BILINEAR)
    top, left = round((nh - 224) / 2), round((nw - 224) / 2)
    ref = np.asarray(pil.crop((left, top, left + 224, top + 224)), int)
    ours = augment.eval_preprocess(tf.io.encode_png(img)).numpy()
    assert np.abs(ours.astype(int) - ref).max() <= 1


@pytest.mark.slow
def test_imagenet_lt_trains_end_to_end_and_resumes(tmp_path):
  """The ImageNet-LT recipe through `train_and_evaluate` on a tiny tree
  (a small backbone, CE: ResNet-50 would not fit the suite's time): the
  streamed input, both groupings in results.json, a kill-free resume that
  ends where an uninterrupted run does, and the trained model loaded back."""
  from nc_jax.configs import cifar_lt as cfg_lib  # pylint: disable=g-import-not-at-top
  from nc_jax import runs, train  # pylint: disable=g-import-not-at-top
  lst = _folder_tree(tmp_path / "data")

  def config(steps):
    c = cfg_lib.get_config(f"imagenet_lt,method=ce,steps={steps}")
    c.unlock()
    c.update(dict(data_dir=str(tmp_path / "data"), imagenet_lt_train_list=lst,
                  backbone="resnet8", batch_size=3, eval_batch_size=4,
                  log_every_steps=1, eval_every_epochs=None,
                  eval_every_steps=2, checkpoint_every_epochs=None,
                  checkpoint_every_steps=2))
    c.optim.warmup_epochs = 0
    c.lock()
    return c

  res = train.train_and_evaluate(config(4), tmp_path / "wd")
  assert res["train_counts"][:3] == [4, 3, 2] and sum(res["train_counts"]) == 9
  assert res["config"]["dataset"] == "imagenet_lt"
  for group in ("head", "medium", "tail", "many_shot", "medium_shot",
                "few_shot"):
    assert group in res["class_groups"], group
  assert res["final"]["num_examples"] == 15
  assert res["final"]["epoch"] == pytest.approx(4 / 3)
  assert res["final"]["head"] is not None and res["final"]["tail"] is None
  assert 0 <= res["final"]["top1"] <= 100
  # A copy that lost everything after its step-2 checkpoint (as a run
  # killed at step 3 has) resumes from there and ends with the same numbers.
  shutil.copytree(tmp_path / "wd", tmp_path / "cut")
  (tmp_path / "cut" / "results.json").unlink()
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "4")
  resumed = train.train_and_evaluate(config(4), tmp_path / "cut")
  assert resumed["provenance"]["resumes"] == 1
  assert resumed["final"]["top1"] == res["final"]["top1"]
  assert resumed["final"]["loss"] == pytest.approx(res["final"]["loss"],
                                                   rel=1e-5)
  run = runs.load(tmp_path / "wd")
  assert run.image_shape == (224, 224, 3) and run.num_classes == 1000
  logits = run.predict(np.zeros((2, 224, 224, 3), np.uint8))
  assert logits.shape == (2, 1000) and np.isfinite(logits).all()
