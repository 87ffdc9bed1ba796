"""ImageNet-style preprocessing of encoded images of any size (TensorFlow).

What the reference applies with torchvision on PIL images
(`datasets/imagenet.py`), for the streamed datasets: train: random resized
crop to 224 (area 8%-100%, aspect 3/4-4/3), horizontal flip, then
ColorJitter(brightness=s, contrast=s, saturation=s, hue=0) with s =
`color_jitter` (0.4; 0 turns it off), all from stateless ops seeded per
(seed, step, row), so a stream is deterministic and resumable; eval:
Resize(256) (shorter side to 256, longer side `int(256 * long / short)`) and
CenterCrop(224). Resizes are bilinear with antialiasing, as PIL's (eval
output within 1 level of PIL's). The colour jitter follows PIL's integer
arithmetic exactly. Known differences: the crop box comes from
`tf.image.stateless_sample_distorted_bounding_box` (aspect ratio uniform,
not log-uniform; the whole image, not a centre crop, after 10 failed
tries), and TensorFlow's JPEG decoder is not PIL's.
"""

from __future__ import annotations

import tensorflow as tf

SIZE, RESIZE = 224, 256
# The reference's ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4).
COLOR_JITTER = 0.4
# RandomResizedCrop's default scale=(0.08, 1).
MIN_AREA = 0.08


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
                     jitter: float = COLOR_JITTER,
                     min_area: float = MIN_AREA) -> tf.Tensor:
  """Random resized crop, flip and colour jitter of one encoded image.

  Args:
    encoded: scalar tf.string (JPEG or PNG).
    seed: `(2,)` int stateless seed.
    jitter: colour-jitter strength (`color_jitter`); 0 for none.
    min_area: the smallest crop, as a fraction of the image's area
      (torchvision's RandomResizedCrop `scale=(min_area, 1)`).

  Returns:
    `(224, 224, 3)` uint8.
  """
  image = _decode(encoded)
  seeds = tf.random.experimental.stateless_split(seed, 3)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seeds[0], min_object_covered=0.0, aspect_ratio_range=(0.75, 4 / 3),
      area_range=(min_area, 1.0), max_attempts=10,
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



def row_seed(seed: int, step: tf.Tensor, row: tf.Tensor) -> tf.Tensor:
  """The stateless seed of one row's augmentation: (seed, step, row)."""
  base = tf.constant([seed, 1], tf.int64)
  s = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
  return tf.random.experimental.stateless_fold_in(s, tf.cast(row, tf.int64))
