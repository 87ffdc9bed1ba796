"""The sampling plan (order and augmentation draws) and the on-device pipeline.

The plan is the single definition of *which* images a training batch holds
and *how* they are augmented; both pipelines use it, so they yield the same
batches bit for bit:

- epoch order, by sampler (`SAMPLERS`):
  "random": `jax.random.permutation(fold_in(fold_in(key(seed), 0), epoch),
  N)`, every image once;
  "class_balanced" (the reference's `CLS_BALAN`): N draws with
  replacement, each a uniform class among those present, then a uniform
  image of it (probability proportional to 1/n_c per image), from
  `fold_in(fold_in(key(seed), 2), epoch)`;
  global step `s` of epoch `e = s // S` takes positions
  `[(s % S) * B, (s % S + 1) * B)` of it (the last `N % B` of the epoch are
  dropped, and they differ from epoch to epoch);
- augmentation draws for row `r` of global step `s`: three uint32 words from
  `fold_in(fold_in(fold_in(key(seed), 1), s), r)`: crop offsets `dy, dx` in
  `[0, 2 * pad]` and a flip bit.

Everything is threefry integer arithmetic and a stable sort, so the plan is
identical on CPU, GPU and TPU, for any process count, and `iterate(k)` can
start anywhere: the batch at step `s` is a pure function of (seed, s). (The
random bits depend on JAX's `jax_threefry_partitionable` setting, so keep
it, and the JAX version, fixed across the resumes of one run.)

The device pipeline keeps the selected uint8 train set on the accelerators
(replicated) and builds each sharded batch in one jitted gather, so the
accelerator never waits for the host.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from nc_jax import sharding

PAD = 4  # CIFAR's RandomCrop(32, padding=4)
_PERM_STREAM, _AUG_STREAM, _BALANCED_STREAM = 0, 1, 2
SAMPLERS = ("random", "class_balanced")


def epoch_permutation(seed: jax.Array | int, epoch: jax.Array | int,
                      n: int) -> jax.Array:
  """`(n,)` int32 order of the train set in `epoch` (jit-friendly in epoch)."""
  key = jax.random.fold_in(jax.random.key(seed), _PERM_STREAM)
  return jax.random.permutation(jax.random.fold_in(key, epoch),
                                n).astype(jnp.int32)


def class_balanced_indices(seed: jax.Array | int, epoch: jax.Array | int,
                           order: jax.Array, starts: jax.Array,
                           counts: jax.Array, present: jax.Array
                           ) -> jax.Array:
  """`(N,)` int32 class-balanced draws with replacement for `epoch`.

  Each draw picks a class uniformly among `present`, then one of its images
  uniformly: image i of class c has probability 1 / (P * n_c), the
  reference's per-image weight 1/n_c. Integer threefry arithmetic only
  (`randint` with a per-draw bound), so every backend and process count
  draws the same indices.

  Args:
    seed, epoch: as `epoch_permutation` (traceable).
    order: `(N,)` int32 image indices sorted by class (stable).
    starts: `(K,)` int32 offset of each class's run in `order`.
    counts: `(K,)` int32 images per class.
    present: `(P,)` int32 classes with at least one image.

  Returns:
    `(N,)` int32 indices into the train set, N = len(order).
  """
  order, starts, counts, present = (
      jnp.asarray(a, jnp.int32) for a in (order, starts, counts, present))
  n = order.shape[0]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed),
                                              _BALANCED_STREAM), epoch)
  k_class, k_image = jax.random.split(key)
  cls = present[jax.random.randint(k_class, (n,), 0, present.shape[0])]
  within = jax.random.randint(k_image, (n,), 0, counts[cls])
  return order[starts[cls] + within].astype(jnp.int32)


def class_table(labels: np.ndarray) -> tuple[np.ndarray, ...]:
  """`(order, starts, counts, present)` of `class_balanced_indices`."""
  labels = np.asarray(labels, np.int64)
  k = int(labels.max()) + 1 if labels.size else 0
  counts = np.bincount(labels, minlength=k)
  order = np.argsort(labels, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  present = np.flatnonzero(counts > 0)
  return tuple(a.astype(np.int32) for a in (order, starts, counts, present))


def check_sampler(sampler: str) -> str:
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
  return sampler


def epoch_order_fn(sampler: str, labels: np.ndarray
                   ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(seed, epoch) -> (N,)` int32 image order of `sampler` (traceable).

  "random" is `epoch_permutation`; "class_balanced" is
  `class_balanced_indices` over the class table of `labels` (baked in as
  constants).
  """
  check_sampler(sampler)
  n = int(np.asarray(labels).shape[0])
  if sampler == "random":
    return functools.partial(epoch_permutation, n=n)
  table = class_table(labels)
  return lambda seed, epoch: class_balanced_indices(seed, epoch, *table)


def augment_draws(seed: jax.Array | int, step: jax.Array | int, rows: jax.Array,
                  *, pad: int = PAD) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Crop offsets and flips of the given rows of global step `step`.

  Args:
    seed: the run's data seed.
    step: global step.
    rows: `(R,)` int row positions within the global batch.
    pad: zero padding of the random crop.

  Returns:
    `(dy, dx, flip)`, each `(R,)` int32: offsets in `[0, 2 * pad]` into the
    padded image, flip in {0, 1}.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed),
                                              _AUG_STREAM), step)
  bits = jax.vmap(lambda r: jax.random.bits(jax.random.fold_in(key, r), (3,),
                                            jnp.uint32))(rows)
  span = jnp.uint32(2 * pad + 1)
  return ((bits[:, 0] % span).astype(jnp.int32),
          (bits[:, 1] % span).astype(jnp.int32),
          (bits[:, 2] >> 31).astype(jnp.int32))


def crop_flip_gather(images: jax.Array, idx: jax.Array, dy: jax.Array,
                     dx: jax.Array, flip: jax.Array, *,
                     pad: int = PAD) -> jax.Array:
  """Gathers `images[idx]`, zero-pads by `pad`, crops at (dy, dx), flips.

  Output pixel `(i, j)` of row b is `padded[idx_b, dy_b + i, dx_b + j']` with
  `j' = W - 1 - j` when flipped (crop first, then flip, as torchvision's
  RandomCrop followed by RandomHorizontalFlip), done as one gather without
  materialising the padded images.

  Args:
    images: `(N, H, W, C)` uint8 source images.
    idx: `(B,)` int rows of `images`.
    dy, dx, flip: `(B,)` int32 from `augment_draws`.
    pad: the zero padding.

  Returns:
    `(B, H, W, C)` uint8.
  """
  _, h, w, _ = images.shape
  r = dy[:, None] + jnp.arange(h)[None, :] - pad                  # (B, H)
  j = jnp.arange(w)[None, :]
  c = dx[:, None] + jnp.where(flip[:, None] == 1, w - 1 - j, j) - pad  # (B, W)
  valid = (((r >= 0) & (r < h))[:, :, None]
           & ((c >= 0) & (c < w))[:, None, :])                    # (B, H, W)
  out = images[idx[:, None, None], jnp.clip(r, 0, h - 1)[:, :, None],
               jnp.clip(c, 0, w - 1)[:, None, :]]                 # (B,H,W,C)
  return jnp.where(valid[..., None], out, jnp.zeros((), out.dtype))


def _make_batch(images: jax.Array, labels: jax.Array, perm: jax.Array,
                seed: jax.Array, step: jax.Array, *, batch_size: int,
                steps_per_epoch: int, augment: str) -> dict[str, jax.Array]:
  """Global batch `step` of the plan: gather (+ crop and flip) on device."""
  b = batch_size
  idx = jax.lax.dynamic_slice(perm, ((step % steps_per_epoch) * b,), (b,))
  if augment == "crop_flip":
    dy, dx, flip = augment_draws(seed, step, jnp.arange(b))
    image = crop_flip_gather(images, idx, dy, dx, flip)
  else:
    image = images[idx]
  return {"image": image, "label": labels[idx]}


def _make_chunk(images: jax.Array, labels: jax.Array, seed: jax.Array,
                start: jax.Array, *, length: int, batch_size: int,
                steps_per_epoch: int, augment: str,
                epoch_order: Callable[[jax.Array, jax.Array], jax.Array]
                ) -> dict[str, jax.Array]:
  """Global batches `start .. start + length - 1` of the plan, stacked.

  The orders of the (at most `(length - 1) // S + 2`) epochs the chunk
  touches are drawn here, and each step's batch is `_make_batch`'s, so the
  stack equals `length` batches of `DeviceTrainPipeline.iterate`.

  Returns:
    {'image': uint8 `(length, B, H, W, C)`, 'label': int32 `(length, B)`}.
  """
  spe = steps_per_epoch
  first_epoch = start // spe
  spanned = (length - 1) // spe + 2
  perms = jax.vmap(lambda e: epoch_order(seed, e))(
      first_epoch + jnp.arange(spanned, dtype=jnp.int32))   # (spanned, N)

  def one(step):
    return _make_batch(images, labels, perms[step // spe - first_epoch],
                       seed, step, batch_size=batch_size,
                       steps_per_epoch=spe, augment=augment)
  return jax.vmap(one)(start + jnp.arange(length, dtype=jnp.int32))


def host_context() -> contextlib.AbstractContextManager:
  """Runs the host-side plan on the CPU backend when there is one.

  With JAX_PLATFORMS restricted to an accelerator there is no CPU backend;
  the plan then runs on the default device, with identical results (the
  plan is integer arithmetic).
  """
  try:
    return jax.default_device(jax.local_devices(backend="cpu")[0])
  except RuntimeError:
    return contextlib.nullcontext()


# Host-side (CPU) versions for the tf.data pipelines, compiled once per
# shape: seed, epoch and steps are traced.
host_permutation = jax.jit(lambda seed, epoch, n: epoch_permutation(
    seed, epoch, n), static_argnums=2)
host_augment_draws = jax.jit(jax.vmap(augment_draws, in_axes=(None, 0, None)))
_host_balanced = jax.jit(class_balanced_indices)


def host_epoch_order(sampler: str, seed: int, labels: np.ndarray
                     ) -> Callable[[int], np.ndarray]:
  """`epoch -> (N,)` numpy order of `sampler` computed on the host CPU.

  Identical to what `DeviceTrainPipeline` computes on the accelerators.
  """
  check_sampler(sampler)
  n = int(np.asarray(labels).shape[0])
  seed_u = np.uint32(seed)
  table = class_table(labels) if sampler == "class_balanced" else None

  def order(epoch: int) -> np.ndarray:
    with host_context():
      if table is None:
        return np.asarray(host_permutation(seed_u, np.int32(epoch), n))
      return np.asarray(_host_balanced(seed_u, np.int32(epoch), *table))
  return order


class DeviceTrainPipeline:
  """Train batches built on the accelerators from a replicated uint8 array.

  Args:
    images: `(N, H, W, C)` uint8 host array (same on every process).
    labels: `(N,)` int labels.
    batch_size: global batch size B (divisible by the mesh size).
    seed: data seed of the plan.
    mesh: the data-parallel mesh.
    augment: "crop_flip" or "none".
    sampler: "random" or "class_balanced" (`SAMPLERS`).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *,
               batch_size: int, seed: int, mesh: Mesh, augment: str,
               sampler: str = "random"):
    if augment not in ("crop_flip", "none"):
      raise ValueError(f"The device pipeline supports the 'crop_flip' and "
                       f"'none' augmentations, not {augment!r}; use "
                       "pipeline='tfdata'.")
    sharding.check_batch_size(batch_size, mesh)
    n = int(images.shape[0])
    if n < batch_size:
      raise ValueError(f"The train set has {n} images, fewer than one batch "
                       f"of {batch_size}.")
    self.num_examples, self.batch_size = n, int(batch_size)
    self.steps_per_epoch = n // self.batch_size
    self._images = sharding.put_replicated(np.asarray(images, np.uint8), mesh)
    self._labels = sharding.put_replicated(np.asarray(labels, np.int32), mesh)
    self._seed = np.uint32(seed)
    repl = sharding.replicated_sharding(mesh)
    out = sharding.batch_sharding(mesh)
    # Jitted per instance (the shardings are the mesh's); the seed, epoch and
    # step are traced, so a run compiles each function once.
    self._perm = jax.jit(epoch_order_fn(sampler, labels), out_shardings=repl)
    self._batch = jax.jit(
        functools.partial(_make_batch, batch_size=self.batch_size,
                          steps_per_epoch=self.steps_per_epoch,
                          augment=augment),
        out_shardings={"image": out, "label": out})
    stacked = sharding.stacked_batch_sharding(mesh)
    # One compiled gather per chunk length (`nc_jax.dispatch`).
    self._chunk = jax.jit(
        functools.partial(_make_chunk, batch_size=self.batch_size,
                          steps_per_epoch=self.steps_per_epoch,
                          augment=augment,
                          epoch_order=epoch_order_fn(sampler, labels)),
        static_argnames="length",
        out_shardings={"image": stacked, "label": stacked})

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Endless global batches {'image': uint8 (B,H,W,C), 'label': int32 (B,)}
    from global step `start_step` on."""
    step, epoch, perm = int(start_step), None, None
    while True:
      if step // self.steps_per_epoch != epoch:
        epoch = step // self.steps_per_epoch
        perm = self._perm(self._seed, np.int32(epoch))
      yield self._batch(self._images, self._labels, perm, self._seed,
                        np.int32(step))
      step += 1

  def iterate_chunks(self, chunks: Iterable[tuple[int, int]]
                     ) -> Iterator[dict[str, jax.Array]]:
    """Stacked global batches, one jitted call per chunk.

    Args:
      chunks: consecutive `(first step, length)` pairs (`dispatch.plan`).

    Yields:
      {'image': uint8 `(length, B, H, W, C)`, 'label': int32
      `(length, B)`}, B split over the mesh's data axis.
    """
    for first, length in chunks:
      yield self._chunk(self._images, self._labels, self._seed,
                        np.int32(first), length=int(length))
