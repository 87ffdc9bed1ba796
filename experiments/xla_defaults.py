"""Default XLA flags for CPU runs, applied only when the user set none.

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

import os

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


def apply(*, onednn_convs: bool = False) -> None:
  """Sets XLA_FLAGS for CPU unless XLA_FLAGS or NC_JAX_NO_XLA_DEFAULTS is set.

  Args:
    onednn_convs: the run's convolutions are nc_jax's oneDNN kernels
      (`expects_onednn_convs`); then XLA's own defaults are kept.

  Must run before jax creates its backends (before the first jax
  computation).
  """
  if os.environ.get("NC_JAX_NO_XLA_DEFAULTS") or os.environ.get("XLA_FLAGS"):
    return
  if onednn_convs:
    return
  os.environ["XLA_FLAGS"] = " ".join(CPU_FLAGS)
