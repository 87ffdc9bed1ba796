"""Default XLA flags for CPU runs, applied only when the user set none.

XLA's default CPU convolutions are slow for small CIFAR networks; routing
dots, elementwise ops and reductions through the YNNPACK fusion emitter made
the ResNet-32 train step about 3x faster on a 2-core machine (see README,
Performance). Users who set XLA_FLAGS themselves keep exactly their flags.
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
