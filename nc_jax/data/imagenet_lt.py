"""ImageNet-LT: the standard train list over ImageNet, streamed from disk.

The subset is given by the standard split file (ImageNet_LT_train.txt,
115,846 lines "train/n01440764/n01440764_10026.JPEG 0"); the test set is the
50,000-image ImageNet validation set. Two sources (see `sources.py`):

- an image-folder tree (`train/<wnid>/*.JPEG`, `test/<wnid>/*.JPEG`): the
  list's paths are read relative to `data_dir`, so only the subset is read
  and every epoch is a full random permutation from the shared plan
  (`device.epoch_permutation`), exactly as for the small datasets;
- tfds `imagenet2012` (manual download): examples are matched on their
  `file_name` feature against the list; each epoch streams the whole split
  (tfrecords allow no random access), keeps the listed images and shuffles
  them within blocks of `block` images with stateless, (seed, epoch,
  block)-seeded shuffles. tfds stores ImageNet in a random order already, so
  the block shuffle is enough mixing. Every process reads every record but
  decodes only its own rows.

Augmentation, as the reference's `datasets/imagenet.py` (torchvision on PIL
images): train: random resized crop to 224 (area 8%-100%, aspect 3/4-4/3),
horizontal flip, then ColorJitter(brightness=s, contrast=s, saturation=s,
hue=0) with s = `color_jitter` (0.4; 0 turns it off), all from stateless ops
seeded by (seed, step, row), so a stream is deterministic and resumable;
eval: Resize(256) (shorter side to 256, longer side `int(256 * long /
short)`) and CenterCrop(224). Resizes are bilinear with antialiasing, as
PIL's (eval output within 1 level of PIL's). The colour jitter follows PIL's
integer arithmetic exactly (`color_jitter`). Known differences: the crop box
comes from `tf.image.stateless_sample_distorted_bounding_box` (aspect ratio
uniform, not log-uniform; the whole image, not a centre crop, after 10
failed tries), and TensorFlow's JPEG decoder is not PIL's.

Class groups (`class_groupings`): the reference relabels the classes by
descending train count and reports head / medium / tail accuracy over the
rank ranges [0, 390) / [390, 835) / [835, 1000) (`config/imagenet/*.yaml`,
`train.py`); the literature's many / medium / few split is by count (> 100,
20-100, < 20 images). Both are expressed here as sets of ORIGINAL labels;
the data is never relabelled. For the metrics this is the same thing: the
reference's per-class accuracy of rank r is that of the original class
`order[r]`, and a group's accuracy is the mean over its classes. For training
the relabelling only decides which column of the fixed ETF each class gets,
and the ETF is a random rotation of a column-symmetric simplex, so another
assignment is just another draw of the same random classifier (a learnable
linear classifier is initialised i.i.d. per class: no effect at all).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from nc_jax.data import device as device_lib
from nc_jax.data import long_tail
from nc_jax.data import sources

SIZE, RESIZE = 224, 256
# The reference's ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4).
COLOR_JITTER = 0.4
Batch = dict[str, np.ndarray]
Groups = dict[str, tuple[int, ...]]


def read_split_list(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
  """Parses an ImageNet-LT split file.

  Args:
    path: text file of lines "relative/path/name.JPEG label".

  Returns:
    `(paths, labels)`: relative paths and `(N,)` int64 labels.
  """
  if path is None or not os.path.isfile(os.fspath(path)):
    raise FileNotFoundError(
        f"ImageNet-LT needs its train list (ImageNet_LT_train.txt, lines "
        f"'train/n01440764/n01440764_10026.JPEG 0'); got {path!r}. Pass "
        "--config.imagenet_lt_train_list=/path/to/ImageNet_LT_train.txt.")
  paths, labels = [], []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      # rsplit: the label is the last field; keep any spaces in the path.
      parts = line.strip().rsplit(maxsplit=1)
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"{path}:{lineno}: expected 'path label', got "
                         f"{line.strip()!r}.")
      paths.append(parts[0])
      labels.append(int(parts[1]))
  return paths, np.asarray(labels, np.int64)


# ------------------------------------------------------------- class groups

# The reference's head / medium / tail: half-open ranges of ranks by
# descending train count (`config/imagenet/Res50_imagenetLT*.yaml`
# head/med/tail_class_idx, used as `acc_classes[lo:hi]` in `train.py`).
REFERENCE_RANK_RANGES: tuple[tuple[str, int, int], ...] = (
    ("head", 0, 390), ("medium", 390, 835), ("tail", 835, 1000))
TIES = ("reference", "stable")


def _heapsort(v: list[int], t: list[int], lo: int, n: int) -> None:
  """numpy's `aheapsort_`: sorts `t[lo:lo + n]` in place by the keys `v`."""
  def sift(i: int, n: int, tmp: int) -> None:
    # 1-based heap: node i is t[lo + i - 1].
    j = 2 * i
    while j <= n:
      if j < n and v[t[lo + j - 1]] < v[t[lo + j]]:
        j += 1
      if v[tmp] < v[t[lo + j - 1]]:
        t[lo + i - 1] = t[lo + j - 1]
        i, j = j, 2 * j
      else:
        break
    t[lo + i - 1] = tmp
  for l in range(n >> 1, 0, -1):
    sift(l, n, t[lo + l - 1])
  while n > 1:
    tmp = t[lo + n - 1]
    t[lo + n - 1] = t[lo]
    n -= 1
    sift(1, n, tmp)


def _introsort_argsort(keys: Sequence[int]) -> list[int]:
  """numpy's classic `argsort(kind="quicksort")` (introsort), in Python.

  The reference ranks classes with `np.argsort(-counts)`, whose order among
  equal counts is whatever this unstable sort leaves. numpy < 1.25 ran it on
  every CPU; later numpy versions dispatch 64-bit argsorts to SIMD sorts
  (x86-simd-sort, Highway) whose tie order depends on the CPU, so the
  reference's own code no longer gives one answer. This is that classic
  algorithm (`npysort/quicksort.cpp` `aquicksort_`: median-of-three
  partitions while a range holds more than 16 items, insertion sort below,
  heapsort past a depth of 2 * floor(log2 n)), step for step, so the ranks
  are the same on every machine and equal numpy 1.24's.

  Args:
    keys: integers to sort ascending.

  Returns:
    The permutation as a list of indices.
  """
  v = [int(x) for x in keys]
  t = list(range(len(v)))
  if len(v) < 2:
    return t
  stack: list[tuple[int, int, int]] = []
  pl, pr = 0, len(v) - 1
  depth = 2 * (len(v).bit_length() - 1)
  while True:
    if depth < 0:
      _heapsort(v, t, pl, pr - pl + 1)
    else:
      while pr - pl > 15:
        pm = pl + ((pr - pl) >> 1)
        if v[t[pm]] < v[t[pl]]:
          t[pm], t[pl] = t[pl], t[pm]
        if v[t[pr]] < v[t[pm]]:
          t[pr], t[pm] = t[pm], t[pr]
        if v[t[pm]] < v[t[pl]]:
          t[pm], t[pl] = t[pl], t[pm]
        vp = v[t[pm]]
        pi, pj = pl, pr - 1
        t[pm], t[pj] = t[pj], t[pm]
        while True:
          pi += 1
          while v[t[pi]] < vp:
            pi += 1
          pj -= 1
          while vp < v[t[pj]]:
            pj -= 1
          if pi >= pj:
            break
          t[pi], t[pj] = t[pj], t[pi]
        t[pi], t[pr - 1] = t[pr - 1], t[pi]
        depth -= 1
        # Defer the larger side, continue with the smaller.
        if pi - pl < pr - pi:
          stack.append((pi + 1, pr, depth))
          pr = pi - 1
        else:
          stack.append((pl, pi - 1, depth))
          pl = pi + 1
      for i in range(pl + 1, pr + 1):
        ti, j = t[i], i
        while j > pl and v[ti] < v[t[j - 1]]:
          t[j] = t[j - 1]
          j -= 1
        t[j] = ti
    if not stack:
      return t
    pl, pr, depth = stack.pop()


def rank_by_count(counts: Sequence[int], *, ties: str = "reference"
                  ) -> np.ndarray:
  """Original class indices by descending train count.

  Args:
    counts: K per-class train counts.
    ties: order among equal counts: "reference" (the reference's
      `np.argsort(-counts)` as numpy < 1.25 computes it, see
      `_introsort_argsort`) or "stable" (ascending class index).

  Returns:
    `(K,)` int64 `order`: `order[r]` is the class of rank r (the reference
    relabels class `order[r]` as r).
  """
  neg = [-int(c) for c in counts]
  if ties == "reference":
    return np.asarray(_introsort_argsort(neg), np.int64)
  if ties == "stable":
    return np.argsort(np.asarray(neg, np.int64), kind="stable")
  raise ValueError(f"ties must be one of {TIES}, got {ties!r}.")


def groups_by_rank(counts: Sequence[int],
                   ranges: Sequence[tuple[str, int, int]] = (
                       REFERENCE_RANK_RANGES),
                   *, ties: str = "reference") -> Groups:
  """The reference's groups: rank ranges as sets of original labels.

  Args:
    counts: K per-class train counts.
    ranges: `(name, lo, hi)` half-open rank ranges that tile [0, K).
    ties: see `rank_by_count`.

  Returns:
    dict name -> ascending tuple of original class indices.
  """
  k = len(counts)
  edges = [0] + [hi for _, _, hi in ranges]
  if [lo for _, lo, _ in ranges] != edges[:-1] or edges[-1] != k or any(
      hi < lo for _, lo, hi in ranges):
    raise ValueError(f"Rank ranges {ranges} must tile [0, {k}) in order.")
  order = rank_by_count(counts, ties=ties)
  return {name: tuple(sorted(int(c) for c in order[lo:hi]))
          for name, lo, hi in ranges}


def class_groupings(counts: Sequence[int], *, ties: str = "reference",
                    many: int = 100, few: int = 20
                    ) -> dict[str, Groups]:
  """Both ImageNet-LT groupings from the per-class train counts.

  Args:
    counts: the 1000 per-class train counts (original labels).
    ties: order among equal counts for the rank split (`rank_by_count`).
    many, few: the count thresholds of the literature's split.

  Returns:
    {"by_rank": the reference's head/medium/tail (ranks [0, 390),
    [390, 835), [835, 1000) by descending count), "by_count": the
    literature's many/medium/few (> many, many..few, < few images), stored
    under head/medium/tail}; each group an ascending tuple of original class
    indices.
  """
  return {"by_rank": groups_by_rank(counts, ties=ties),
          "by_count": long_tail.groups_by_count(counts, many=many, few=few)}


# ------------------------------------------------------------ preprocessing


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


# PIL's integer colour arithmetic, which torchvision's ColorJitter uses on the
# reference's PIL images. Images are float32 (H, W, 3) holding integers in
# [0, 255]; every op returns the same (PIL stores a uint8 image after each).


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's `convert("L")`: (19595 R + 38470 G + 7471 B + 2**15) >> 16."""
  rgb = tf.cast(image, tf.int32)
  gray = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471
          + 32768) // 65536
  return tf.cast(gray, tf.float32)[..., None]


def _blend(degenerate: tf.Tensor, image: tf.Tensor,
           factor: tf.Tensor) -> tf.Tensor:
  """PIL's `Image.blend(degenerate, image, factor)`: clipped, truncated."""
  out = degenerate + factor * (image - degenerate)
  return tf.floor(tf.clip_by_value(out, 0.0, 255.0))


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision's `adjust_brightness` on a PIL image: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision's `adjust_contrast` on a PIL image.

  Blends with a constant image at the mean of the grayscale image, rounded
  to an integer (PIL's `ImageEnhance.Contrast`).
  """
  gray = tf.cast(_grayscale(image), tf.float64)
  mean = tf.floor(tf.reduce_mean(gray) + 0.5)
  return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image,
                factor)


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision's `adjust_saturation` on a PIL image: blend with gray."""
  gray = tf.broadcast_to(_grayscale(image), tf.shape(image))
  return _blend(gray, image, factor)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation)


def apply_color_jitter(image: tf.Tensor, factors: tf.Tensor,
                       order: tf.Tensor) -> tf.Tensor:
  """Brightness, contrast and saturation with given factors, in given order.

  Args:
    image: float32 `(H, W, 3)`, integers in [0, 255].
    factors: `(3,)` brightness, contrast, saturation factors.
    order: `(3,)` int permutation of (0, 1, 2): op `order[i]` runs i-th.

  Returns:
    float32 `(H, W, 3)`, integers in [0, 255].
  """
  for i in range(3):
    image = tf.switch_case(
        order[i], [lambda op=op, x=image, j=j: op(x, factors[j])
                   for j, op in enumerate(_JITTER_OPS)])
    image = tf.ensure_shape(image, [None, None, 3])
  return image


def color_jitter(image: tf.Tensor, seed: tf.Tensor,
                 strength: float = COLOR_JITTER) -> tf.Tensor:
  """torchvision's `ColorJitter(s, s, s, hue=0)`, statelessly seeded.

  Each factor is uniform on [max(0, 1 - s), 1 + s] and the three ops run in
  a uniformly random order, as torchvision (whose `randperm(4)` also places
  the skipped hue op; the order of the other three is uniform all the same).

  Args:
    image: float32 `(H, W, 3)`, integers in [0, 255].
    seed: `(2,)` int stateless seed.
    strength: s >= 0; 0 returns `image`.

  Returns:
    float32 `(H, W, 3)`, integers in [0, 255].
  """
  strength = float(strength)
  if strength < 0:
    raise ValueError(f"color_jitter must be >= 0, got {strength}.")
  if strength == 0:
    return image
  seeds = tf.random.experimental.stateless_split(seed, 2)
  factors = tf.random.stateless_uniform(
      [3], seeds[0], minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)
  order = tf.argsort(tf.random.stateless_uniform([3], seeds[1]))
  return apply_color_jitter(image, factors, order)


def train_preprocess(encoded: tf.Tensor, seed: tf.Tensor,
                     jitter: float = COLOR_JITTER) -> tf.Tensor:
  """Random resized crop, flip and colour jitter of one encoded image.

  Args:
    encoded: scalar tf.string (JPEG or PNG).
    seed: `(2,)` int stateless seed.
    jitter: colour-jitter strength (`color_jitter`); 0 for none.

  Returns:
    `(224, 224, 3)` uint8.
  """
  image = _decode(encoded)
  seeds = tf.random.experimental.stateless_split(seed, 3)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seeds[0], min_object_covered=0.0, aspect_ratio_range=(0.75, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, size)
  image = tf.image.resize(image, (SIZE, SIZE), method="bilinear",
                          antialias=True)
  flip = tf.random.stateless_uniform((), seeds[1]) < 0.5
  image = tf.cond(flip, lambda: tf.image.flip_left_right(image),
                  lambda: image)
  image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  return _to_uint8(color_jitter(image, seeds[2], jitter))


def resized_shape(height: tf.Tensor, width: tf.Tensor,
                  size: int = RESIZE) -> tf.Tensor:
  """torchvision's `Resize(size)` output `(h, w)`: shorter side to `size`.

  The longer side is `int(size * long / short)`, truncated (integer floor
  division gives the same for positive integers).
  """
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  new_long = size * long // short
  return tf.where(height <= width, tf.stack([size, new_long]),
                  tf.stack([new_long, size]))


def eval_preprocess(encoded: tf.Tensor) -> tf.Tensor:
  """Resize(256), CenterCrop(224) as torchvision: `(224, 224, 3)` uint8.

  The crop offsets are `int(round((side - 224) / 2))` with Python's
  round-half-to-even, which `tf.round` also uses.
  """
  image = _decode(encoded)
  shape = tf.shape(image)
  hw = resized_shape(shape[0], shape[1])
  image = tf.image.resize(image, hw, method="bilinear", antialias=True)
  top, left = (tf.cast(tf.round(tf.cast(hw[i] - SIZE, tf.float32) / 2),
                       tf.int32) for i in (0, 1))
  image = tf.slice(image, [top, left, 0], [SIZE, SIZE, 3])
  return _to_uint8(image)


def _row_seed(seed: int, step: tf.Tensor, row: tf.Tensor) -> tf.Tensor:
  base = tf.constant([seed, 1], tf.int64)
  s = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
  return tf.random.experimental.stateless_fold_in(s, tf.cast(row, tf.int64))


# -------------------------------------------------------------------- train


@dataclasses.dataclass
class Stream:
  """A host stream: sizes and `iterate_local` (train: `start_step ->`).

  Attributes:
    info: the registry entry; with the train list read, `info.class_groups`
      is the reference's rank grouping (`class_groupings(...)["by_rank"]`).
    counts: per-class train counts (empty for the test split).
    num_examples: images in the stream's epoch.
    iterate_local: the batch iterator of this process's rows.
    class_groups_by_count: the literature's many/medium/few grouping
      (`class_groupings(...)["by_count"]`), empty when `counts` is.
  """
  info: sources.DatasetInfo
  counts: list[int]
  num_examples: int
  iterate_local: Callable[..., Iterator[Batch]]
  class_groups_by_count: Mapping[str, tuple[int, ...]] = dataclasses.field(
      default_factory=dict)


def _selection(source: sources.Source, train_list: str | None
               ) -> tuple[list[str], np.ndarray]:
  if train_list is None and source.kind == "folder":
    listed = sources._folder_examples(source, "train")  # pylint: disable=protected-access
    if listed is not None:
      logging.info("No ImageNet-LT list: using every image under %s/train.",
                   source.root)
      return listed[0], listed[1]
  paths, labels = read_split_list(train_list)
  if source.kind == "folder":
    paths = [os.path.join(source.root, p) for p in paths]
  return paths, labels


def make_train_stream(info: sources.DatasetInfo, *, data_dir: str | None,
                      train_list: str | None, batch_size: int, seed: int,
                      rows: tuple[int, int], block: int = 4096,
                      color_jitter: float = COLOR_JITTER) -> Stream:
  """The ImageNet-LT train stream of this process's rows.

  Args:
    info: the registry entry.
    data_dir: image-folder tree or tfds data directory.
    train_list: the ImageNet-LT split file.
    batch_size: global batch size B.
    seed: order/augmentation seed.
    rows: `[start, stop)` rows of each global batch built here.
    block: shuffle block of the tfds stream.
    color_jitter: brightness/contrast/saturation jitter strength (the
      reference's 0.4); 0 turns the jitter off.

  Returns:
    A `Stream`; `iterate_local(start_step)` yields {'image': uint8
    (R, 224, 224, 3), 'label': int32 (R,)}.
  """
  color_jitter = float(color_jitter)
  if not color_jitter >= 0:
    raise ValueError(f"color_jitter must be >= 0, got {color_jitter}.")
  source = sources.check_data_dir(info.name, data_dir)
  paths, labels = _selection(source, train_list)
  k = info.num_classes
  counts = long_tail.class_histogram(labels, k)
  groups = class_groupings(counts)
  info = dataclasses.replace(info, class_groups=groups["by_rank"])
  n, b = labels.size, batch_size
  if n < b:
    raise ValueError(f"The ImageNet-LT list has {n} images, fewer than one "
                     f"batch of {b}.")
  spe = n // b
  r0, r1 = rows
  logging.info("ImageNet-LT (%s): %d train images, %d classes present",
               source.kind, n, sum(c > 0 for c in counts))

  def finish(ds: tf.data.Dataset, start_step: int) -> Iterator[Batch]:
    # ds: per-example (encoded, label, step, row), in batch order.
    ds = ds.map(lambda img, y, s, r: {
        "image": train_preprocess(img, _row_seed(seed, s, r), color_jitter),
        "label": tf.cast(y, tf.int32), "step": s},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(r1 - r0, drop_remainder=True).prefetch(2)
    expected = start_step
    for batch in ds.as_numpy_iterator():
      step = int(batch.pop("step")[0])
      if step != expected:
        # A short epoch would silently shift every later step.
        raise RuntimeError(
            f"ImageNet-LT stream: expected step {expected}, got {step}: "
            f"fewer than the {n} listed images were found in {source.root} "
            "(is the list for this copy of ImageNet?).")
      expected += 1
      yield batch

  if source.kind == "folder":
    paths_t, labels_t = tf.constant(paths), tf.constant(labels)
    perm_fn = _host_permutation(seed, n)

    def epoch_ds(epoch: int, first: int) -> tf.data.Dataset:
      order = perm_fn(epoch)[:spe * b].reshape(spe, b)[first:, r0:r1]
      steps = np.arange(epoch * spe + first, (epoch + 1) * spe)
      j, s, r = (x.reshape(-1) for x in np.broadcast_arrays(
          order, steps[:, None], np.arange(r0, r1)[None, :]))
      return tf.data.Dataset.from_tensor_slices((j, s, r)).map(
          lambda j, s, r: (tf.io.read_file(tf.gather(paths_t, j)),
                           tf.gather(labels_t, j), s, r))

    def local(start_step: int) -> Iterator[Batch]:
      epoch, first = divmod(start_step, spe)
      while True:
        yield from finish(epoch_ds(epoch, first), epoch * spe + first)
        epoch, first = epoch + 1, 0
    return Stream(info, counts, n, local, groups["by_count"])

  names = [os.path.basename(p) for p in paths]
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(names),
                                          tf.constant(labels, tf.int64)), -1)
  base = sources.encoded_dataset(source, "train").map(
      lambda ex: (ex["image"], table.lookup(ex["file_name"]))).filter(
          lambda img, y: y >= 0)

  def epoch_ds(epoch):
    def shuffle_block(i, block):
      imgs, ys = block
      order = tf.random.experimental.stateless_shuffle(
          tf.range(tf.shape(ys)[0]),
          seed=tf.stack([tf.cast(seed, tf.int64), epoch * 1_000_003 + i]))
      return tf.data.Dataset.from_tensor_slices(
          (tf.gather(imgs, order), tf.gather(ys, order)))
    ds = base.batch(block).enumerate().flat_map(shuffle_block)
    ds = ds.batch(b, drop_remainder=True).take(spe).enumerate()
    return ds.map(lambda i, ex: (epoch * spe + i, ex[0][r0:r1], ex[1][r0:r1]))

  def local(start_step: int) -> Iterator[Batch]:
    epoch, first = divmod(start_step, spe)
    ds = tf.data.Dataset.range(epoch, 2**40).flat_map(epoch_ds).skip(first)
    ds = ds.flat_map(lambda s, imgs, ys: tf.data.Dataset.from_tensor_slices(
        (imgs, ys, tf.fill([r1 - r0], s), tf.range(r0, r1, dtype=tf.int64))))
    return finish(ds, start_step)
  return Stream(info, counts, n, local, groups["by_count"])


def _host_permutation(seed: int, n: int) -> Callable[[int], np.ndarray]:
  """`epoch -> (n,)` numpy permutation of the shared plan, on the host CPU."""
  def perm(epoch: int) -> np.ndarray:
    with device_lib.host_context():
      return np.asarray(device_lib.host_permutation(
          np.uint32(seed), np.int32(epoch), n))
  return perm


# --------------------------------------------------------------------- eval


def make_eval_stream(info: sources.DatasetInfo, *, data_dir: str | None,
                     split: str, batch_size: int, rows: tuple[int, int],
                     train_list: str | None = None) -> Stream:
  """ImageNet(-LT) evaluation stream, every image once, padded last batch.

  Args:
    info: the registry entry.
    data_dir: image-folder tree or tfds data directory.
    split: "test" (ImageNet val), "train_lt" (the list, unaugmented) or
      "train".
    batch_size: global batch size B.
    rows: `[start, stop)` rows of each global batch built here.
    train_list: the ImageNet-LT split file for "train_lt".

  Returns:
    A `Stream`; `iterate_local()` yields {'image': uint8 (R, 224, 224, 3),
    'label': int32 (R,), 'mask': bool (R,)}.
  """
  source = sources.check_data_dir(info.name, data_dir)
  if split == "train_lt":
    paths, labels = _selection(source, train_list)
    if source.kind == "folder":
      ds = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
          lambda p, y: (tf.io.read_file(p), y))
    else:
      names = [os.path.basename(p) for p in paths]
      table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
          tf.constant(names), tf.constant(labels, tf.int64)), -1)
      ds = sources.encoded_dataset(source, "train").map(
          lambda ex: (ex["image"], table.lookup(ex["file_name"]))).filter(
              lambda img, y: y >= 0)
    n = labels.size
  else:
    ds = sources.encoded_dataset(source, split).map(
        lambda ex: (ex["image"], ex["label"]))
    n = int(ds.cardinality())
    if n < 0:
      n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
  counts = list(long_tail.class_histogram(labels, info.num_classes)
                if split == "train_lt" else [])
  by_count = {}
  if counts:
    groups = class_groupings(counts)
    info = dataclasses.replace(info, class_groups=groups["by_rank"])
    by_count = groups["by_count"]
  r0, r1 = rows

  def local() -> Iterator[Batch]:
    # B - 1 padding rows then drop_remainder: exactly ceil(n / B) batches
    # without needing n, and the last one padded.
    pad = tf.data.Dataset.from_tensors(
        (tf.constant(b""), tf.constant(0, tf.int64), False)).repeat(
            batch_size - 1)
    d = ds.map(lambda img, y: (img, y, True)).concatenate(pad)
    d = d.batch(batch_size, drop_remainder=True).map(
        lambda img, y, m: (img[r0:r1], y[r0:r1], m[r0:r1])).unbatch()
    d = d.map(lambda img, y, m: {
        "image": tf.cond(m, lambda: eval_preprocess(img),
                         lambda: tf.zeros((SIZE, SIZE, 3), tf.uint8)),
        "label": tf.where(m, tf.cast(y, tf.int32), 0), "mask": m},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return d.batch(r1 - r0).prefetch(2).as_numpy_iterator()
  return Stream(info, counts, n, local, by_count)
