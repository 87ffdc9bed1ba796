r"""Speed and memory of the real train and eval steps on synthetic batches.

    python -m experiments.benchmark --backbone resnet32 --method etf_dr \
        --batch_size 128 --dtype float32 [--num_seeds 4] [--json]

Measures, for the compiled `train_step` of `nc_jax.steps` (the function the
training loop runs, mixup and DR loss included):
  compile_seconds       lowering + compilation of the train step
  train_images_per_sec  batch * num_seeds / median step time (after warm-up)
  eval_images_per_sec   the eval step, likewise
  peak_memory_mb        the accelerator's peak bytes in use, or on CPU the
                        process's peak resident memory
  conv_impl, norm_impl  the implementations the model ran
                        (`nc_jax.kernels`, as in
                        training; `kernels_note` says why oneDNN's
                        convolutions were not used where they were wanted)
Data loading is excluded (batches are random uint8 already on device), which
is what the device-resident pipeline achieves in training.

XLA flags and malloc: as in training, `nc_jax.kernels.xla_setup` applies
its CPU defaults unless XLA_FLAGS is set (no flags when the convolutions are
nc_jax's oneDNN kernels, see `--conv_impl`; nothing on accelerators).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

from absl import app
from absl import flags

from nc_jax import kernels
from nc_jax.kernels import xla_setup

_BACKBONE = flags.DEFINE_string("backbone", "resnet32", "Backbone name.")
_METHOD = flags.DEFINE_string("method", "etf_dr",
                              "A method of nc_jax.methods.METHODS (etf_dr, "
                              "etf_ce, etf_dot, ce, ce_frozen, la, bs, "
                              "ldam_drw).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes.")
_IMAGE = flags.DEFINE_integer("image_size", 32, "Square image side.")
_SEEDS = flags.DEFINE_integer("num_seeds", 1, "Replicas trained at once.")
_SEEDS_MODE = flags.DEFINE_enum("seeds_mode", "auto", ["auto", "vmap", "unroll"],
                                "How replicas share the program "
                                "(nc_jax.steps.resolve_replica_mode).")
_CONV_IMPL = flags.DEFINE_enum("conv_impl", "auto", ["auto", "xla", "onednn"],
                               "Convolution kernels (nc_jax.kernels); "
                               "oneDNN's for the CIFAR ResNets only.")
_NORM_IMPL = flags.DEFINE_enum("norm_impl", "auto", ["auto", "flax", "fused"],
                               "BatchNorm implementation (nc_jax.kernels).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_MIXUP = flags.DEFINE_float("mixup_alpha", 1.0, "Mixup alpha (0 = off).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object only.")


def _peak_memory_mb(devices) -> tuple[float, str]:
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2 ** 20, "device peak bytes in use"
  # ru_maxrss is in KiB on Linux.
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "host peak RSS (CPU backend)")


def run_benchmark(*, backbone: str, method: str, batch_size: int, dtype: str,
                  num_classes: int = 10, image_size: int = 32,
                  num_seeds: int = 1, seeds_mode: str = "auto",
                  conv_impl: str = "auto", norm_impl: str = "auto",
                  steps: int = 20, warmup: int = 3,
                  mixup_alpha: float = 1.0) -> dict:
  """Times the real compiled steps; returns the measurements as a dict."""
  import jax
  import numpy as np

  from nc_jax import builder
  from nc_jax import data as data_lib
  from nc_jax import sharding
  from nc_jax import steps as steps_lib
  from nc_jax.configs import cifar_lt

  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh)
  config = cifar_lt.get_config(f"method={method}")
  config.unlock()
  config.update(dict(backbone=backbone, compute_dtype=dtype,
                     num_seeds=num_seeds, seeds_mode=seeds_mode,
                     conv_impl=conv_impl, norm_impl=norm_impl,
                     mixup_alpha=float(mixup_alpha)))
  config.lock()
  layers = kernels.resolve(config, device_count=mesh.devices.size)
  # A CIFAR-10-LT-like profile (r = 0.01) over K classes, at least 1 each.
  counts = [max(1, c) for c in data_lib.long_tail_counts(
      max(50000 // num_classes, 1), 0.01, num_classes=num_classes)]
  shape = (image_size, image_size, 3)
  built = builder.build(config, num_classes=num_classes, image_shape=shape,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        class_counts=counts, steps_per_epoch=100,
                        total_steps=20000, mesh=mesh, layers=layers)
  train_step, eval_step, etf = built.train_step, built.eval_step, built.etf
  state = built.init_state()
  rng = np.random.default_rng(0)
  batch = sharding.to_global({
      "image": rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8),
      "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
  }, mesh)
  eval_batch = dict(batch, mask=sharding.to_global(
      {"m": np.ones(batch_size, bool)}, mesh)["m"])

  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch, etf).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, out = compiled(state, batch, etf)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, out = compiled(state, batch, etf)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t)
  loss = float(np.mean(jax.device_get(out["loss"])))

  eval_compiled = eval_step.lower(state, eval_batch, etf).compile()
  for _ in range(warmup):
    jax.block_until_ready(eval_compiled(state, eval_batch, etf))
  etimes = []
  for _ in range(max(steps // 2, 3)):
    t = time.perf_counter()
    jax.block_until_ready(eval_compiled(state, eval_batch, etf))
    etimes.append(time.perf_counter() - t)

  peak, peak_kind = _peak_memory_mb(jax.devices())
  med = statistics.median(times)
  return {
      "backbone": backbone, "method": method, "batch_size": batch_size,
      "dtype": dtype, "num_seeds": num_seeds,
      "seeds_mode": (steps_lib.resolve_replica_mode(seeds_mode)
                     if num_seeds > 1 else "single"),
      "image_size": image_size,
      **layers.record(),
      "kernels_note": layers.note,
      "compile_seconds": round(compile_s, 2),
      "train_step_ms_median": round(1e3 * med, 2),
      "train_step_ms_min": round(1e3 * min(times), 2),
      "train_images_per_sec": round(batch_size * num_seeds / med, 1),
      "train_images_per_sec_per_seed": round(batch_size / med, 1),
      "eval_images_per_sec": round(
          batch_size * num_seeds / statistics.median(etimes), 1),
      "peak_memory_mb": round(peak, 1), "peak_memory_kind": peak_kind,
      "final_loss": loss,
      "backend": jax.default_backend(), "device_count": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "timed_steps": steps,
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  xla_setup.apply(dict(backbone=_BACKBONE.value, compute_dtype=_DTYPE.value,
                       conv_impl=_CONV_IMPL.value))
  r = run_benchmark(backbone=_BACKBONE.value, method=_METHOD.value,
                    batch_size=_BATCH.value, dtype=_DTYPE.value,
                    num_classes=_NUM_CLASSES.value, image_size=_IMAGE.value,
                    num_seeds=_SEEDS.value, seeds_mode=_SEEDS_MODE.value,
                    conv_impl=_CONV_IMPL.value, norm_impl=_NORM_IMPL.value,
                    steps=_STEPS.value,
                    warmup=_WARMUP.value, mixup_alpha=_MIXUP.value)
  if _JSON.value:
    print(json.dumps(r))
    return
  width = max(len(k) for k in r)
  for k, v in r.items():
    print(f"{k:<{width}}  {v}")
  sys.stdout.flush()


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
