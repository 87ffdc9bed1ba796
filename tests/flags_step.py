"""Run by test_xla_setup.py in a subprocess: a few train steps, as JSON.

Applies `nc_jax.kernels.xla_setup` first, exactly as the entry points do,
so the environment decides which XLA flags compile the step; CONV_IMPL
(default "xla") picks the model's convolution kernels.
"""

import json
import os

from nc_jax.kernels import xla_setup

CONV_IMPL = os.environ.get("CONV_IMPL", "xla")
xla_setup.apply(dict(backbone="resnet8", conv_impl=CONV_IMPL))

import jax  # noqa: E402  (after the flags, as in the entry points)
import numpy as np  # noqa: E402

from nc_jax import sharding  # noqa: E402
from tests.tiny_step import tiny_build  # noqa: E402


def main():
  mesh = sharding.make_mesh()
  built = tiny_build("etf_dr", conv_impl=CONV_IMPL, mesh=mesh)
  train_step, etf = built.train_step, built.etf
  state = built.init_state()
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(3):
    batch = sharding.to_global({
        "image": rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 32).astype(np.int32)}, mesh)
    state, out = train_step(state, batch, etf)
    losses.append(float(out["loss"]))
  leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "losses": losses,
                    "params": np.concatenate([x.ravel() for x in leaves])
                              .tolist()}))


if __name__ == "__main__":
  main()
