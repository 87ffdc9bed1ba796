"""Run by test_distributed.py in a subprocess with 8 fake CPU devices.

Trains a few steps of the real compiled train step on a mesh of 8 devices
and on a mesh of 1 device from the same initial state and batches, and
prints the largest parameter difference as JSON, one line per method named
on the command line (one process for all: one start-up). Also checks that
a batch that does not divide over the devices is refused.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import sharding
from tests.tiny_step import tiny_build


def main(method: str):
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
              "label": rng.integers(0, 10, 16).astype(np.int32)}
             for _ in range(3)]
  results = {}
  for n in (8, 1):
    mesh = sharding.make_mesh(jax.devices()[:n])
    # XLA's convolutions on both meshes (a 1-device mesh would otherwise
    # get oneDNN's): this compares data parallelism, not kernels.
    built = tiny_build(method, conv_impl="xla", mesh=mesh)
    train_step, e = built.train_step, built.etf
    state = built.init_state()
    losses = []
    for b in batches:
      gb = sharding.to_global(b, mesh)
      assert len(gb["image"].sharding.device_set) == n
      state, out = train_step(state, gb, e)
      losses.append(float(out["loss"]))
    results[n] = (jax.device_get(state.params), losses,
                  jax.device_get(state.model_state))
  p8, l8, s8 = results[8]
  p1, l1, s1 = results[1]
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p1, s1))))
  try:
    sharding.check_batch_size(12, sharding.make_mesh())
    refused = None
  except ValueError as err:
    refused = str(err)
  print(json.dumps({"method": method, "max_param_diff": diff,
                    "losses_8": l8, "losses_1": l1, "refused": refused}))


if __name__ == "__main__":
  for name in sys.argv[1:] or ["etf_dr"]:
    main(name)
