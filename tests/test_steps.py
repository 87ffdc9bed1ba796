"""Compiled steps: replicas by vmap and by unrolling agree, compile once."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from nc_jax import sharding
from nc_jax import steps as steps_lib
from tests.tiny_step import tiny_build

pytestmark = pytest.mark.slow  # compiles replicated train steps

S = 2


def _batches(n=2, b=8):
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (b, 16, 16, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, b).astype(np.int32),
           "mask": np.ones(b, bool)} for _ in range(n)]


def _run(mode):
  mesh = sharding.make_mesh()
  built = tiny_build("etf_dr", mesh=mesh, num_seeds=S, seeds_mode=mode)
  train_step, eval_step, etf = built.train_step, built.eval_step, built.etf
  state = built.init_state()
  outs = []
  for b in _batches():
    batch = sharding.to_global({k: v for k, v in b.items() if k != "mask"},
                               mesh)
    state, out = train_step(state, batch, etf)
    outs.append(out)
  counts = eval_step(state, sharding.to_global(_batches(1)[0], mesh), etf)
  assert train_step._cache_size() == 1  # one compiled program for all steps
  return state, outs, counts


@pytest.fixture(scope="module")
def both_modes():
  return {mode: _run(mode) for mode in ("vmap", "unroll")}


def test_unroll_equals_vmap(both_modes):
  (sv, ov, cv), (su, ou, cu) = both_modes["vmap"], both_modes["unroll"]
  chex.assert_trees_all_equal_shapes(sv, su)
  chex.assert_trees_all_close(sv.params, su.params, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(sv.model_state, su.model_state, atol=1e-4,
                              rtol=1e-4)
  for a, b in zip(ov, ou):
    assert a["loss"].shape == (S,)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
  chex.assert_trees_all_close(cv, cu, atol=1e-6)


def test_replicas_are_independent(both_modes):
  state, outs, _ = both_modes["unroll"]
  leaves = jax.tree.leaves(state.params)
  assert all(x.shape[0] == S for x in leaves)
  assert not np.allclose(outs[-1]["loss"][0], outs[-1]["loss"][1])


def test_replica_mode_resolution():
  assert steps_lib.resolve_replica_mode("auto", "cpu") == "unroll"
  assert steps_lib.resolve_replica_mode("auto", "gpu") == "vmap"
  assert steps_lib.resolve_replica_mode("auto", "tpu") == "vmap"
  assert steps_lib.resolve_replica_mode("vmap", "cpu") == "vmap"
  with pytest.raises(ValueError, match="replica mode 'pmap'"):
    steps_lib.resolve_replica_mode("pmap")
