"""Default XLA flags for CPU runs, applied only when the user set none.

XLA's default CPU code for small CIFAR networks is slow. Two library
back-ends built into jaxlib do better, and both are switched on here:
  --xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce
      elementwise ops, reductions and dots through YNNPACK fusions;
  --xla_cpu_experimental_onednn_fusion_type=individual_convolution
      every convolution through oneDNN (the library PyTorch's CPU
      convolutions use) instead of Eigen.
Users who set XLA_FLAGS themselves keep exactly their flags.

Measured (jaxlib 0.10.2, 2-core AVX-512 EPYC, ResNet-32 ETF+DR train step,
batch 128, mixup; `python -m experiments.benchmark --json`, median ms per
step, quiet machine; runs drift by up to +-10% on this VM, so compare rows
measured together). With Flax's BatchNorm, before `nc_jax.models.norm`:
  ynn=dot,eltwise,reduce + onednn=individual_convolution (default)   674
  ynn=dot,eltwise,reduce alone (Eigen convs; the previous default)   712
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
weight-gradient convolutions and recompute them there, element by element,
in transposed order; that costs 0.5-0.8 s a step. Per layer, oneDNN's
forward convolution is 1.1-1.7x faster than Eigen's at these sizes.
Earlier trials (Eigen convs): xla_cpu_use_xnnpack, individual_dot,
use_thunk_runtime=false, prefer_vector_width=512, the concurrency-optimized
scheduler and fast-math changed nothing or lost 3-10%; YNN convolutions
(ynn individual_convolution) lost 15-25%; bfloat16 compute lost 20%.
Rewriting convolutions as im2col or shifted dots was 3-10x slower, because
XLA's CPU code for the patch copies is slow.
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
             "--xla_cpu_experimental_onednn_fusion_type=individual_convolution")


def apply() -> None:
  """Adds `CPU_FLAGS` to XLA_FLAGS unless XLA_FLAGS or NC_JAX_NO_XLA_DEFAULTS is set.

  Must run before jax creates its backends (before the first jax
  computation).
  """
  if os.environ.get("NC_JAX_NO_XLA_DEFAULTS") or os.environ.get("XLA_FLAGS"):
    return
  os.environ["XLA_FLAGS"] = " ".join(CPU_FLAGS)
