"""CPU runtime defaults of the entry points: XLA flags and malloc settings.

Both are applied by `apply()` before jax starts its backends, and only where
the user set nothing of their own.

## malloc

XLA's CPU runtime allocates one temporary buffer per executed step (305 MB
for the ResNet-32 train step at batch 128), from a worker thread. glibc
serves an allocation that large on a non-main-arena thread with a fresh
mmap and returns it with munmap on free, so every step page-faulted its way
through 305 MB again: 78,286 minor faults and 160 ms of kernel time per
step, measured with getrusage around 20 steps. `apply()` therefore sets, by
mallopt, one malloc arena, no mmap'd chunks and no trimming, so the buffer
is carved from the heap once and reused: 0 faults, 7 ms of kernel time, and
the step went from about 420 to 335 ms. The process keeps its peak heap
instead of returning it to the OS. Opt out with NC_JAX_NO_MALLOC_TUNING=1;
it is also left alone when GLIBC_TUNABLES or MALLOC_ARENA_MAX is set, and
off glibc.

## XLA flags

Which flags depend on who computes the convolutions (`nc_jax.models.conv`):

* nc_jax's oneDNN kernels (`conv_impl="auto"` on one CPU device in float32,
  the CIFAR ResNets): no flags. With the convolutions out of XLA's hands,
  XLA's own CPU defaults ran the rest of the ResNet-32 step (BatchNorm,
  ReLU, loss, SGD) about 4% faster than the YNNPACK flags below. Measured
  interleaved, three rounds, `python -m experiments.benchmark --json
  --steps 30` (median / min ms per step):
      no flags (XLA defaults)                 419 / 383, 410 / 391, 421 / 385
      ynn=dot,eltwise,reduce + onednn convs   517 / 408, 436 / 398, 427 / 407
      ynn=eltwise,reduce                      444 / 400, 463 / 423, 428 / 398
* XLA's convolutions (bfloat16, several devices or processes, DenseNet,
  ResNet-50, `conv_impl="xla"`): two library back-ends built into jaxlib:
    --xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce
        elementwise ops, reductions and dots through YNNPACK fusions;
    --xla_cpu_experimental_onednn_fusion_type=individual_convolution
        every convolution through oneDNN instead of Eigen.
  ResNet-32 step with XLA's convolutions: 612-676 ms with these flags,
  1176 ms with none.

Users who set XLA_FLAGS themselves keep exactly their flags;
NC_JAX_NO_XLA_DEFAULTS=1 sets none.

The flag sweep for XLA's convolutions (jaxlib 0.10.2, 2-core AVX-512 EPYC,
ResNet-32 ETF+DR train step, batch 128, mixup, median ms per step; runs
drift by up to +-10% on this VM, so compare rows measured together). With
Flax's BatchNorm, before `nc_jax.models.norm`:
  ynn=dot,eltwise,reduce + onednn=individual_convolution (default)   674
  ynn=dot,eltwise,reduce alone (Eigen convs)                         712
  + onednn=individual_convolution,dot                                749
  ynn=eltwise + onednn convs                                         749
  ynn=reduce + onednn convs                                          924
  ynn= (empty) + onednn convs                                       1087
  onednn=individual_convolution,eltwise,reduce,dot, no ynn          1056
  no flags at all (XLA's own default sends convs to YNN)   about 1230
With the fused BatchNorm of `nc_jax.models.norm` the default runs 612-676
ms (XLA's own defaults 1176 ms; ynn=eltwise,reduce + onednn convs 620-654).
Without YNN elementwise fusions, XLA's own loop fusions fold whole chains
of BatchNorm/ReLU/residual arithmetic into the transposes that feed the
weight-gradient convolutions and recompute them there; that costs 0.5-0.8 s
a step (the transposes are gone with nc_jax's oneDNN kernels). Earlier
trials (Eigen convs): xla_cpu_use_xnnpack, individual_dot,
use_thunk_runtime=false, prefer_vector_width=512, the concurrency-optimized
scheduler and fast-math changed nothing or lost 3-10%; YNN convolutions
lost 15-25%; bfloat16 compute lost 20%. OpenMP settings for the oneDNN
kernels (OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=0) changed nothing
measurable; OMP_PROC_BIND=true lost 20%; OMP_NUM_THREADS=1 lost 40%.
"""

from __future__ import annotations

import ctypes
import os
import platform

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
             "--xla_cpu_experimental_onednn_fusion_type=individual_convolution")


def expects_onednn_convs(backbone: str, compute_dtype: str, conv_impl: str,
                         *, multi_process: bool = False) -> bool:
  """Whether a run will (on CPU) use nc_jax's oneDNN convolution kernels.

  Decided from the config alone, before jax starts its backends (the flags
  must be in place by then), following `nc_jax.models.conv`: a backbone
  with a `conv_impl` option, float32 compute, conv_impl other than "xla",
  one process. A wrong guess costs speed, never correctness.
  """
  from nc_jax import models  # imports jax, but starts no backend

  return (conv_impl != "xla" and compute_dtype == "float32"
          and not multi_process and backbone in models.BACKBONES
          and "conv_impl" in models.backbone_options(backbone))


# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_malloc() -> bool:
  """One arena, no mmap'd chunks, no trimming (see the module docstring).

  Must run before the threads that allocate (XLA's workers) exist. Returns
  whether the settings were applied.
  """
  if (os.environ.get("NC_JAX_NO_MALLOC_TUNING")
      or os.environ.get("GLIBC_TUNABLES")
      or os.environ.get("MALLOC_ARENA_MAX")
      or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def apply(*, backbone: str | None = None, compute_dtype: str = "float32",
          conv_impl: str = "auto", multi_process: bool = False) -> None:
  """Applies the malloc settings and, for CPU, the XLA flags.

  Args:
    backbone, compute_dtype, conv_impl, multi_process: the run's config, to
      tell whether its convolutions will be nc_jax's oneDNN kernels
      (`expects_onednn_convs`; with `backbone=None`, XLA's), in which case
      XLA's own flag defaults are kept.

  XLA_FLAGS is left alone if set, or if NC_JAX_NO_XLA_DEFAULTS is set. Must
  run first thing in the process: before jax (or anything that starts
  threads) is imported.
  """
  # First: a thread that allocates before this gets its own malloc arena.
  tune_malloc()
  if os.environ.get("NC_JAX_NO_XLA_DEFAULTS") or os.environ.get("XLA_FLAGS"):
    return
  if backbone is not None and expects_onednn_convs(
      backbone, compute_dtype, conv_impl, multi_process=multi_process):
    return
  os.environ["XLA_FLAGS"] = " ".join(CPU_FLAGS)
