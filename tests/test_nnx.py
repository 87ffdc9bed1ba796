"""The NNX ETF head, `nc_jax.nnx.ETFHead`.

It must be the Linen head's twin (same logits, features and BatchNorm
statistics for the same variables, in both modes), and its ETF must stay
out of every optimiser over `nnx.Param`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nc_jax import etf as etf_lib
from nc_jax import losses
from nc_jax.models import heads
from nc_jax.nnx import ETF, ETFHead

K, D, B = 6, 8, 16


def _features(seed: int = 0) -> jax.Array:
  # Off-centre, unequal scales: BatchNorm has something to undo.
  x = jax.random.normal(jax.random.PRNGKey(seed), (B, D))
  return 3.0 * x * jnp.arange(1, D + 1) + 1.5


def _linen_and_nnx(l2_normalize: bool):
  """A Linen head with non-trivial variables and an NNX head holding them."""
  etf = etf_lib.simplex_etf(K, D, seed=3)
  linen = heads.ETFHead(num_classes=K, feature_dim=D,
                        l2_normalize=l2_normalize)
  variables = linen.init(jax.random.PRNGKey(0), _features(), classifier=etf)
  r = np.random.default_rng(1)
  variables = {
      "params": {"bn": {"scale": r.uniform(0.5, 2.0, D).astype(np.float32),
                        "bias": r.normal(size=D).astype(np.float32)}},
      "batch_stats": {"bn": {"mean": r.normal(size=D).astype(np.float32),
                             "var": r.uniform(0.5, 3.0, D).astype(np.float32)}},
  }
  model = ETFHead(K, D, l2_normalize=l2_normalize, classifier=etf,
                  rngs=nnx.Rngs(0))
  for name, collection in (("scale", "params"), ("bias", "params"),
                           ("mean", "batch_stats"), ("var", "batch_stats")):
    getattr(model.bn, name)[...] = jnp.asarray(variables[collection]["bn"][name])
  return linen, variables, model, etf


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_nnx_head_equals_linen_head_in_train_and_eval_mode(l2_normalize):
  linen, variables, model, etf = _linen_and_nnx(l2_normalize)
  x = _features(1)

  (want_logits, want_h), updates = linen.apply(
      variables, x, train=True, classifier=etf, mutable=["batch_stats"])
  model.train()
  logits, h = model(x)
  chex.assert_trees_all_close((logits, h), (want_logits, want_h),
                              rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(
      {"mean": model.bn.mean[...], "var": model.bn.var[...]},
      dict(updates["batch_stats"]["bn"]), rtol=1e-6, atol=1e-6)

  # Eval with the statistics both heads now hold.
  variables = {"params": variables["params"], **updates}
  want_logits, want_h = linen.apply(variables, x, train=False, classifier=etf)
  model.eval()
  logits, h = model(x)
  chex.assert_trees_all_close((logits, h), (want_logits, want_h),
                              rtol=1e-6, atol=1e-6)
  # Eval reads the running statistics, never writes them.
  chex.assert_trees_all_equal(model.bn.mean[...],
                              updates["batch_stats"]["bn"]["mean"])


def test_nnx_head_matches_a_numpy_reference():
  _, variables, model, etf = _linen_and_nnx(l2_normalize=True)
  x = np.asarray(_features(2), np.float64)
  p, s = variables["params"]["bn"], variables["batch_stats"]["bn"]
  # Eval mode: running statistics, PyTorch's epsilon 1e-5.
  h = (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]
  h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-8)
  logits, got_h = model(jnp.asarray(x, jnp.float32), use_running_average=True)
  np.testing.assert_allclose(got_h, h, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, h @ np.asarray(etf, np.float64),
                             rtol=1e-5, atol=1e-6)
  chex.assert_shape((logits, got_h), [(B, K), (B, D)])
  chex.assert_type((logits, got_h), jnp.float32)


def test_nnx_head_defaults_to_train_mode_and_pytorch_batchnorm():
  model = ETFHead(K, D, rngs=nnx.Rngs(0))
  assert model.bn.use_running_average is False  # NNX modules start in train
  assert (model.bn.momentum, model.bn.epsilon) == (0.9, 1e-5)
  chex.assert_trees_all_equal(model.bn.scale[...], jnp.ones(D))
  chex.assert_trees_all_equal(model.bn.bias[...], jnp.zeros(D))
  # The default ETF is nc_jax.etf's, from etf_seed.
  chex.assert_trees_all_equal(
      ETFHead(K, D, etf_seed=5, rngs=nnx.Rngs(1)).classifier[...],
      etf_lib.simplex_etf(K, D, seed=5))
  x = _features()
  model(x)
  np.testing.assert_allclose(model.bn.mean[...], 0.1 * np.mean(x, axis=0),
                             rtol=1e-5, atol=1e-6)


def test_the_etf_is_no_param():
  model = ETFHead(K, D, rngs=nnx.Rngs(0))
  param_paths = set(nnx.to_flat_state(nnx.state(model, nnx.Param)).paths)
  assert param_paths == {("bn", "scale"), ("bn", "bias")}
  fixed = dict(nnx.to_flat_state(nnx.state(model, ETF)))
  assert set(fixed) == {("classifier",)}
  chex.assert_shape(fixed[("classifier",)][...], (D, K))
  # nnx.grad's default (Params) has no entry for it either.
  grads = nnx.grad(lambda m: m(_features())[0].sum())(model)
  assert ("classifier",) not in nnx.to_flat_state(grads).paths


class _Toy(nnx.Module):
  """A linear backbone under the ETF head."""

  def __init__(self, rngs: nnx.Rngs):
    self.backbone = nnx.Linear(4, D, rngs=rngs)
    self.head = ETFHead(K, D, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.head(self.backbone(x))


def test_optimizer_steps_train_params_and_leave_the_etf_bit_identical():
  model = _Toy(nnx.Rngs(0))
  etf_before = np.array(model.head.classifier[...])
  params_before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  tx = optax.chain(optax.add_decayed_weights(5e-4),
                   optax.sgd(0.1, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, 4))
  y = jnp.arange(B) % K

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      _, h = model(x)
      t = losses.etf_targets(model.head.classifier[...], y,
                             lengths=losses.batch_class_lengths(y, K))
      return losses.dot_regression_loss(h, t).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  first = [float(step(model, optimizer)) for _ in range(5)]
  assert first[-1] < first[0]
  np.testing.assert_array_equal(np.asarray(model.head.classifier[...]),
                                etf_before)
  params_after = nnx.state(model, nnx.Param)
  for before, after in zip(jax.tree.leaves(params_before),
                           jax.tree.leaves(params_after)):
    assert not np.array_equal(before, after)
  # The optimiser state mirrors the Params only (momentum per Param).
  trace_shapes = {leaf.shape for leaf in jax.tree.leaves(optimizer.opt_state)}
  assert (D, K) not in trace_shapes


def test_a_gradient_over_every_variable_leaves_the_etf_alone():
  model = ETFHead(K, D, rngs=nnx.Rngs(0))
  grads = nnx.grad(lambda m: m(_features())[0].sum(),
                   argnums=nnx.DiffState(0, nnx.Variable))(model)
  chex.assert_trees_all_equal(grads.classifier[...], jnp.zeros((D, K)))


@pytest.mark.parametrize("kwargs, match", [
    ({"classifier": np.zeros((K, D), np.float32)}, r"shape .*\(8, 6\)"),
    ({"classifier": np.zeros((D, K), np.int32)}, "float array"),
])
def test_bad_classifier_is_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ETFHead(K, D, rngs=nnx.Rngs(0), **kwargs)


def test_bad_dims_and_features_are_refused():
  with pytest.raises(ValueError):
    ETFHead(10, 5, rngs=nnx.Rngs(0))  # a 10-simplex needs d >= 9
  with pytest.raises(ValueError, match=r"\(B, 8\)"):
    ETFHead(K, D, rngs=nnx.Rngs(0))(jnp.zeros((B, D + 1)))
