"""Default XLA flags for CPU runs, applied only when the user set none.

XLA's default CPU convolutions are slow for small CIFAR networks; routing
dots, elementwise ops and reductions through the YNNPACK fusion emitter made
the ResNet-32 train step about 3x faster on a 2-core machine (see README,
Performance). Users who set XLA_FLAGS themselves keep exactly their flags.

Re-measured (jaxlib 0.10.2, 2-core AVX-512 EPYC, ResNet-32 ETF+DR train step,
batch 128, mixup; `experiments.benchmark`, median images/s, load average
1.1-1.7 = this run alone; under a load of 3-4 from other jobs every number
halves, e.g. 81 for this default):
  ynn=dot,eltwise,reduce (this default)             164-177
  + xla_cpu_use_xnnpack / + individual_dot          173 / 172 (no change)
  + xla_cpu_use_thunk_runtime=false                 162
  + xla_cpu_prefer_vector_width=512                 157
  + xla_cpu_enable_concurrency_optimized_scheduler  160
  + xla_cpu_enable_fast_math (not numerics-neutral) 161
  + individual_convolution (YNN convs)              128-149
  ynn=eltwise,reduce / dot,eltwise / eltwise        150 / 147 / 143
  ynn= (empty: all-Eigen, no YNN)                   121
  xnn=dot,eltwise,reduce instead of ynn             124
  no flags at all (XLA's own default sends convs to YNN)  104
  oneDNN (use_onednn + onednn_custom_call)          no oneDNN calls emitted
  bfloat16 compute (--dtype bfloat16)               141
Convolutions stay on Eigen: per layer Eigen beats YNN 1.2-2.5x (forward,
input and weight gradients), and rewriting them as im2col or shifted dots
is 3-10x slower. About 460 of the ~730 ms step are convolutions.
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",)


def apply() -> None:
  """Adds `CPU_FLAGS` to XLA_FLAGS unless XLA_FLAGS or NC_JAX_NO_XLA_DEFAULTS is set.

  Must run before jax creates its backends (before the first jax
  computation).
  """
  if os.environ.get("NC_JAX_NO_XLA_DEFAULTS") or os.environ.get("XLA_FLAGS"):
    return
  os.environ["XLA_FLAGS"] = " ".join(CPU_FLAGS)
