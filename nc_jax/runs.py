"""Use a trained run: load a checkpoint, classify images, evaluate, export.

    from nc_jax import runs
    run = runs.load("runs/c10_etf_dr")                 # the final checkpoint
    run = runs.load("runs/c10_etf_dr", which="best")   # best test top-1
    run = runs.load("runs/c10_etf_dr", which=19200)    # a kept step
    logits = run.predict(images)    # uint8 (N, H, W, C) -> (N, K) float32
    feats = run.features(images)    # -> (N, d), what the classifier sees
    runs.export("runs/c10_etf_dr", "c10_etf_dr.msgpack", which="best")
    run = runs.load("c10_etf_dr.msgpack")   # same logits, no workdir needed

`load` takes a workdir of `nc_jax.train` or a file written by `export`.
`which` is "final" (the newest checkpoint in `checkpoints/`: the last step
of a finished run, the latest saved one of an unfinished run), "best" (the
state of the evaluation with the best mean test top-1, `best/`), or a step
number still kept in `checkpoints/` (or the best one's).

The model is assembled by `nc_jax.builder.build_model` from the run's
`config.json` (`nc_jax.run_sources`), its weights restored from orbax
(read-only: safe beside a live run; the optimiser state is not read), and the
fixed ETF rebuilt from the config's `etf_seed`, as training does. With
`num_seeds = S > 1` the checkpoint holds S replicas stacked; `replica=r`
(default 0) picks the one that `load` returns and `export` writes (its ETF
is the one drawn with `etf_seed + r`).

Images are uint8 NHWC in 0..255 of the dataset's size; they are normalised
with the dataset's mean and std (`nc_jax.data.dataset_info`) as in training.
`predict` returns the logits the evaluation scores: `h @ M` on the
normalised features for the ETF heads, the cosines times `ldam_scale` for
LDAM's cosine head, minus `tau log(pi)` when the run evaluated with
`eval_logit_adjust_tau`. BatchNorm uses its running statistics.

`evaluate` evaluates a checkpoint on the test set with training's own
compiled eval step (the numbers of the final checkpoint are those of
results.json's `final` block), adds neural-collapse statistics and the
confusion matrix; `python -m nc_jax.cli.evaluate` writes them.
"""

from __future__ import annotations

from nc_jax import extras

extras.require(__name__)  # before the imports it checks

import datetime
import functools
import json
import os
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import run_config
from nc_jax import data as data_lib
from nc_jax import evaluators
from nc_jax import methods as methods_lib
from nc_jax import models
from nc_jax import nc_metrics
from nc_jax import run_sources
from nc_jax import steps as steps_lib
from nc_jax.data import registry
from nc_jax.data.archive import resolve_data_dir
# Part of this module's API (runs.RunError, runs.parse_which, ...).
from nc_jax.run_sources import FORMAT
from nc_jax.run_sources import FORMAT_VERSION
from nc_jax.run_sources import RunError
from nc_jax.run_sources import parse_which

PREDICT_BATCH = 500


# --------------------------------------------------------------------- Run


def _take(tree: Any, replica: int, num_replicas: int) -> Any:
  """Replica `replica` of a stacked tree, on the host."""
  if num_replicas == 1:
    return jax.device_get(tree)
  return jax.device_get(jax.tree.map(lambda a: a[replica], tree))


def _forward(model, cfg: steps_lib.StepConfig, params, model_state, etf,
             images):
  """(eval logits, features) of uint8 images, as the eval step has them."""
  x = steps_lib.normalize(images, cfg.mean, cfg.std, cfg.compute_dtype)
  logits, feats = model.apply(
      {"params": params, **model_state}, x, train=False,
      classifier=etf if cfg.method.fixed_classifier else None)
  return (steps_lib.eval_logits(cfg, logits).astype(jnp.float32),
          feats.astype(jnp.float32))


def _padded_size(n: int, batch: int) -> int:
  """Rows a chunk of n images is padded to: the batch, or for a short last
  chunk the next power of two (few distinct shapes, few compiles)."""
  if n >= batch:
    return batch
  return min(batch, 1 << max(n - 1, 0).bit_length())


class Run:
  """One trained model (one replica of a checkpoint), ready for inference.

  Attributes:
    config: the run's config (`ConfigDict`, locked).
    which: "final", "latest" (the newest checkpoint of an unfinished run),
      "best" or "step".
    step: the checkpoint's training step; epoch: `step / steps_per_epoch`
      (None when unknown).
    replica: which of the checkpoint's `num_replicas` this is.
    num_classes, feature_dim, image_shape: K, d, `(H, W, C)`.
    mean, std: the normalisation applied to the images.
    class_names: K names (None when unknown); class_counts: the K training
      counts (None when unknown).
    params, model_state: the replica's variables (numpy pytrees).
    etf: the fixed `(d, K)` ETF of ETF heads, None for learnt heads.
    classifier: the `(d, K)` matrix the logits are computed with.
    source: the workdir or file it was loaded from.
  """

  def __init__(self, src: run_sources.RunSource, replica: int = 0):
    if isinstance(replica, bool) or not isinstance(replica, (int, np.integer)
                                                   ) or not (
        0 <= replica < src.num_replicas):
      raise ValueError(
          f"replica={replica!r}: {src.path} holds {src.num_replicas} "
          f"replica(s) (num_seeds); pass 0..{src.num_replicas - 1}.")
    self._src = src
    self.config = src.config
    self.source = src.path
    self.which, self.step, self.epoch = src.which, src.step, src.epoch
    self.replica, self.num_replicas = int(replica), src.num_replicas
    self.model = src.model
    self.num_classes = src.model.num_classes
    self.feature_dim = src.model.feature_dim
    self.image_shape = tuple(int(v) for v in src.info.image_shape)
    self.mean = tuple(src.step_config.mean)
    self.std = tuple(src.step_config.std)
    self.class_names = src.class_names
    self.class_counts = src.class_counts
    self.params = _take(src.state.params, replica, src.num_replicas)
    self.model_state = _take(src.state.model_state, replica, src.num_replicas)
    self.etf = (None if src.etf is None else
                np.asarray(src.etf if src.num_replicas == 1
                           else src.etf[replica], np.float32))
    dev = jax.devices()[0]
    self._params = jax.device_put(self.params, dev)
    self._model_state = jax.device_put(self.model_state, dev)
    self._etf = None if self.etf is None else jax.device_put(self.etf, dev)
    if src.forward is None:  # one compiled forward for all replicas
      src.forward = jax.jit(functools.partial(_forward, src.model,
                                              src.step_config))
    self._fn = src.forward

  def __repr__(self) -> str:
    c = self.config
    return (f"Run({self.source}, {self.which} step {self.step}, "
            f"{c.backbone} + {c.method}, K={self.num_classes}, "
            f"d={self.feature_dim}, replica {self.replica}/"
            f"{self.num_replicas})")

  @property
  def classifier(self) -> np.ndarray:
    if self.etf is not None:
      return self.etf
    return np.asarray(models.classifier_weights(
        self.model, {"params": self.params, **self.model_state}))

  def check_images(self, images: Any) -> np.ndarray:
    """`images` as a uint8 `(N, H, W, C)` numpy array, or a ValueError."""
    if isinstance(images, jax.Array):
      images = np.asarray(images)
    h, w, c = self.image_shape
    if not isinstance(images, np.ndarray):
      raise ValueError(
          f"images must be a uint8 numpy array (N, {h}, {w}, {c}), got "
          f"{type(images).__name__}.")
    if images.ndim == 3 and images.shape == self.image_shape:
      raise ValueError(
          f"images has shape {images.shape}: one image; pass a batch "
          f"(N, {h}, {w}, {c}), e.g. images[None].")
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(
          f"images must be NHWC (N, {h}, {w}, {c}) for {self.config.dataset}, "
          f"got shape {images.shape}. Resize to {h}x{w} with {c} channels, "
          "channels last.")
    if images.dtype != np.uint8:
      raise ValueError(
          f"images must be uint8 in 0..255 (normalised here with the "
          f"dataset's mean and std), got {images.dtype}. For floats in [0, "
          "1] pass (x * 255).round().astype(np.uint8).")
    return images

  def _apply(self, images: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """One already-checked batch, no padding."""
    return self._fn(self._params, self._model_state, self._etf, images)

  def predict_and_features(self, images: Any, *,
                           batch_size: int = PREDICT_BATCH
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(logits `(N, K)`, features `(N, d)`), float32 numpy, in one pass."""
    images = self.check_images(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or (
        batch_size < 1):
      raise ValueError(f"batch_size must be a positive integer, got "
                       f"{batch_size!r}.")
    n = images.shape[0]
    logits = np.zeros((n, self.num_classes), np.float32)
    feats = np.zeros((n, self.feature_dim), np.float32)
    for start in range(0, n, batch_size):
      chunk = images[start:start + batch_size]
      m = chunk.shape[0]
      rows = _padded_size(m, batch_size)
      if rows > m:
        chunk = np.concatenate(
            [chunk, np.zeros((rows - m, *self.image_shape), np.uint8)])
      z, h = jax.device_get(self._apply(chunk))
      logits[start:start + m], feats[start:start + m] = z[:m], h[:m]
    return logits, feats

  def predict(self, images: Any, *, batch_size: int = PREDICT_BATCH
              ) -> np.ndarray:
    """Logits `(N, K)` float32 of uint8 NHWC `images` (the eval's logits)."""
    return self.predict_and_features(images, batch_size=batch_size)[0]

  def features(self, images: Any, *, batch_size: int = PREDICT_BATCH
               ) -> np.ndarray:
    """Features `(N, d)` float32: what the classifier sees (ETF head: after
    BatchNorm and L2 normalisation; cosine head: L2-normalised; linear head:
    the pooled backbone output)."""
    return self.predict_and_features(images, batch_size=batch_size)[1]


def load(path: str | os.PathLike, which: str | int = "final", *,
         replica: int = 0) -> Run:
  """Loads a trained model from a run's workdir or an exported file.

  Args:
    path: a workdir of `nc_jax.train` (finished or not), or a file written
      by `export`.
    which: "final" (the newest checkpoint), "best" (best mean test top-1)
      or a step kept in `checkpoints/`; a file holds one checkpoint, so
      leave it at "final" there.
    replica: with `num_seeds = S > 1`, which replica (0..S-1).

  Returns:
    A `Run`.

  Raises:
    RunError: the path does not exist, is no run, has no such checkpoint.
    ValueError: a bad `which` or `replica`.
  """
  return Run(run_sources.open_source(path, which), replica)


# ------------------------------------------------------------------ export


def export(path: str | os.PathLike, out: str | os.PathLike,
           which: str | int = "final", *, replica: int = 0) -> pathlib.Path:
  """Writes one replica of a checkpoint to one portable file.

  The file (flax msgpack) holds the params, the model state (BatchNorm
  statistics, a frozen classifier), the ETF, the config as JSON and
  metadata (step, epoch, which, replica, K, image shape, normalisation,
  class names, counts and groups); `load(out)` rebuilds the model from the
  config through the builder and gives the same logits as loading the
  workdir. Written to a temporary name and renamed.

  Returns:
    The path written.
  """
  run = load(path, which, replica=replica)
  src = run._src  # pylint: disable=protected-access
  meta = {
      "which": run.which, "step": run.step, "epoch": run.epoch,
      "replica": run.replica, "num_replicas": run.num_replicas,
      "num_classes": run.num_classes, "feature_dim": run.feature_dim,
      "image_shape": list(run.image_shape), "mean": list(run.mean),
      "std": list(run.std), "class_names": run.class_names,
      "class_counts": src.class_counts, "class_groups": src.class_groups,
      "source": str(src.path), "nc_jax_version": _version(),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  }
  blob = {
      "format": FORMAT, "version": FORMAT_VERSION,
      "config": json.dumps(run_config.config_to_dict(run.config)),
      "meta": json.dumps(meta),
      "params": _numpy_tree(run.params),
      "model_state": _numpy_tree(run.model_state),
  }
  if run.etf is not None:
    blob["etf"] = np.asarray(run.etf, np.float32)
  out = pathlib.Path(out).expanduser().resolve()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  try:
    tmp.write_bytes(flax.serialization.msgpack_serialize(blob))
    os.replace(tmp, out)
  finally:
    tmp.unlink(missing_ok=True)  # (gone after a successful rename)
  return out


def _numpy_tree(tree: Any) -> Any:
  tree = flax.core.unfreeze(tree) if isinstance(
      tree, flax.core.FrozenDict) else tree
  return jax.tree.map(np.asarray, dict(tree))


def _version() -> str:
  import nc_jax  # pylint: disable=g-import-not-at-top
  return nc_jax.__version__


# ---------------------------------------------------------------- evaluate


def evaluate(path: str | os.PathLike, which: str | int = "final", *,
             data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint on the test set, as training evaluates it.

  The counts come from the run's own compiled eval step over the same eval
  input (so the final checkpoint's numbers are results.json's `final`
  block); a second pass per replica gives the predictions (confusion
  matrix) and the features (neural-collapse statistics, `nc_metrics`).

  Args:
    path: workdir or exported file.
    which: as for `load`.
    data_dir: the data (any form `--config.data_dir` takes); None: the
      run's own `config.data_dir`.

  Returns:
    The eval.json record: `which`, `step`, `epoch`, `config`, `num_seeds`,
    `train_counts`, `class_names`, `class_groups`, a block named after
    `which` ("final", "best", or "step") with top1, top5, head, medium,
    tail, ece, loss, per_class, num_examples, epoch and `nc`, the
    `confusion_matrix` (rows: true class, columns: predicted; counts
    summed over replicas), and with S > 1 `<block>_std` and `per_seed`.

  One process: the second pass reads this process's rows of the eval
  batches, which are all of them on a single host.

  Raises:
    RunError: as `load`, or test data that cannot be read.
  """
  src = run_sources.open_source(path, which)
  config, info = src.config, src.info
  k, s = info.num_classes, src.num_replicas
  given = data_dir if data_dir is not None else config.get("data_dir")
  eval_input, names = _test_input(src, given, user_given=data_dir is not None)
  groups = {g: tuple(v) for g, v in src.class_groups.items()}

  # Pass 1: training's compiled eval step and evaluator.
  evaluator = evaluators.get_evaluator("classification")(
      src.eval_step, eval_input, num_replicas=s, num_classes=k,
      groups=groups, classifier_fn=None, with_nc=False,
      calibrated=methods_lib.get_method(src.config.method).calibrated)
  per_seed = evaluator(src.state, src.etf_device)
  # Pass 2: predictions and features, per replica.
  confusion = _predictions_and_collapse(src, eval_input, groups, per_seed)
  block = src.which  # final, latest (unfinished run), best or step
  mean, std = evaluators.aggregate(per_seed)
  out: dict[str, Any] = {
      "source": str(src.path), "which": src.which, "step": src.step,
      "epoch": src.epoch,
      "data_dir": None if given is None else str(given),
      "config": run_config.config_to_dict(config),
      "num_seeds": s,
      "train_counts": src.class_counts,
      "class_names": names,
      "class_groups": {g: list(v) for g, v in groups.items()},
      block: mean,
      "confusion_matrix": confusion.sum(0).tolist(),
  }
  if s > 1:
    out[f"{block}_std"] = std
    out["per_seed"] = [{block: m, "confusion_matrix": confusion[r].tolist()}
                       for r, m in enumerate(per_seed)]
  out["block"] = block
  return out


def _test_input(src: run_sources.RunSource, given: Any, *,
                user_given: bool) -> tuple[Any, list[str]]:
  """The test split's eval input and the class names, from `given` (the
  data_dir passed, or the run's own); RunError naming what to pass."""
  config = src.config
  try:
    resolved = resolve_data_dir(given)
    if resolved is None:
      data_lib.prepare_tfds(config.dataset)
    options = data_lib.options_of(config.dataset, config)
    data_lib.check_data(config.dataset, resolved,
                        train_splits=options.get("train_splits"))
    eval_input = data_lib.make_eval_input(
        config.dataset, data_dir=resolved,
        batch_size=int(config.eval_batch_size), mesh=src.mesh,
        options=options)
    names = list(registry.get_dataset(config.dataset).class_names(resolved))
  except (ValueError, FileNotFoundError) as e:
    origin = ("--data_dir" if user_given
              else f"the run's data_dir {given!r}")
    msg = str(e).replace("--config.data_dir", "--data_dir")
    if "--data_dir" not in msg:
      msg += " Pass --data_dir (python: data_dir=) with the dataset's data."
    raise RunError(f"cannot read the test data from {origin}: {msg}"
                   ) from None
  return eval_input, names


def _predictions_and_collapse(src: run_sources.RunSource, eval_input: Any,
                              groups: dict, per_seed: list[dict]
                              ) -> np.ndarray:
  """`(S, K, K)` confusion counts per replica; adds each replica's
  neural-collapse statistics (`nc`) and epoch to `per_seed`."""
  k, s = src.info.num_classes, src.num_replicas
  update = jax.jit(nc_metrics.update_stats)
  tail = tuple(groups.get("tail", ())) or None
  confusion = np.zeros((s, k, k), np.int64)
  for r in range(s):
    run = Run(src, r)
    stats = nc_metrics.init_stats(k, run.feature_dim)
    for batch in eval_input.iterate_local():
      logits, feats = run._apply(  # pylint: disable=protected-access
          batch["image"])
      mask = np.asarray(batch["mask"])
      pred = np.asarray(jnp.argmax(logits, -1))[mask]
      np.add.at(confusion[r], (np.asarray(batch["label"])[mask], pred), 1)
      stats = update(stats, feats, jnp.asarray(batch["label"]),
                     jnp.asarray(mask))
    nc = nc_metrics.finalize(stats, run.classifier, tail_classes=tail)
    per_seed[r]["nc"] = {key: float(v) for key, v in nc.items()}
    per_seed[r]["epoch"] = src.epoch
  return confusion


__all__ = ["Run", "RunError", "evaluate", "export", "load", "parse_which"]
