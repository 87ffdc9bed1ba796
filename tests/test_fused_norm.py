"""The fused BatchNorm(+residual+ReLU) of `nc_jax.kernels.fused_norm`
against flax.linen.BatchNorm, and both norm factories inside a model
(`layers.batch_norm`, `fused_norm.fused_batch_norm`): same variables
(checkpoints move between them), same numbers."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax import etf as etf_lib
from nc_jax import models
from nc_jax.kernels import fused_norm as norm
from nc_jax.models import layers

FACTORIES = {"fused": norm.fused_batch_norm, "flax": layers.batch_norm}


def _inputs(seed=0, shape=(6, 5, 4, 7)):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(3.0 * rng.standard_normal(shape) + 1.5, jnp.float32)
  res = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  cot = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return x, res, cot


def _variables(c, seed=1):
  """Non-trivial params and running stats, shared by both layers."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"params": {"scale": 1.0 + 0.3 * f(c), "bias": 0.5 * f(c)},
          "batch_stats": {"mean": f(c), "var": 1.0 + jnp.abs(f(c))}}


def _reference(train, activation):
  bn = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                    epsilon=1e-5)

  def apply(variables, x, res):
    y, upd = bn.apply(variables, x, mutable=["batch_stats"])
    if res is not None:
      y = y + res
    if activation == "relu":
      y = jax.nn.relu(y)
    return y, upd

  return apply


def _ours(train, activation, impl="fused"):
  bn = FACTORIES[impl](train, activation=activation)

  def apply(variables, x, res):
    return bn.apply(variables, x, res, mutable=["batch_stats"])

  return apply


@pytest.mark.parametrize("impl", ["fused", "flax"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_matches_flax_values_grads_and_running_stats(activation, with_residual,
                                                     train, impl):
  x, res, cot = _inputs()
  res = res if with_residual else None
  v = _variables(x.shape[-1])
  results = []
  for apply in (_reference(train, activation), _ours(train, activation, impl)):

    def loss(params, x, res):
      y, upd = apply({"params": params, "batch_stats": v["batch_stats"]},
                     x, res)
      return jnp.vdot(y, cot), (y, upd)

    (_, (y, upd)), grads = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True))(v["params"], x, res)
    results.append((y, upd, grads))
  (y0, u0, g0), (y1, u1, g1) = results
  np.testing.assert_allclose(y1, y0, atol=2e-5, rtol=1e-5)
  chex.assert_trees_all_close(u1, u0, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(g1, g0, atol=5e-5, rtol=1e-4)
  if train:  # the running statistics moved
    assert not np.allclose(u1["batch_stats"]["mean"], v["batch_stats"]["mean"])


@pytest.mark.parametrize("with_residual", [False, True])
def test_gradient_matches_finite_differences_in_float64(with_residual):
  from jax.test_util import check_grads
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x = jnp.asarray(2.0 * rng.standard_normal((4, 3, 3, 5)) + 0.5)
    res = jnp.asarray(rng.standard_normal((4, 3, 3, 5))) if with_residual \
        else None
    scale = jnp.asarray(np.linspace(0.5, 1.5, 5))
    bias = jnp.asarray(np.linspace(-0.2, 0.3, 5))

    def f(x, scale, bias, res):
      y = norm.batch_norm_act(x, scale, bias, res, 1e-5, "relu")[0]
      return jnp.sum(jnp.sin(y))

    assert f(x, scale, bias, res).dtype == jnp.float64
    args = (x, scale, bias) + ((res,) if with_residual else ())
    check_grads(lambda *a: f(*a[:3], a[3] if with_residual else None), args,
                order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


def test_bfloat16_input_keeps_float32_statistics():
  x, res, _ = _inputs()
  bn = norm.BatchNorm(use_running_average=False, dtype=jnp.bfloat16,
                      activation="relu")
  v = bn.init(jax.random.PRNGKey(0), x.astype(jnp.bfloat16))
  chex.assert_trees_all_equal_dtypes(v, jax.tree.map(
      lambda a: jnp.zeros((), jnp.float32), v))
  y, _ = bn.apply(v, x.astype(jnp.bfloat16), res.astype(jnp.bfloat16),
                  mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  gx, gr = jax.grad(lambda xx, rr: jnp.sum(bn.apply(
      v, xx, rr, mutable=["batch_stats"])[0].astype(jnp.float32)),
                    argnums=(0, 1))(x.astype(jnp.bfloat16),
                                    res.astype(jnp.bfloat16))
  assert gx.dtype == gr.dtype == jnp.bfloat16


def test_init_does_not_move_running_statistics():
  x, _, _ = _inputs()
  v = norm.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(v["batch_stats"]["var"], 1.0)


def test_bad_arguments_raise():
  x, res, _ = _inputs()
  with pytest.raises(ValueError, match="activation"):
    norm.BatchNorm(use_running_average=False, activation="gelu").init(
        jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="residual shape"):
    norm.BatchNorm(use_running_average=False).init(
        jax.random.PRNGKey(0), x, res[:, :2])


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
@pytest.mark.parametrize("backbone,head", [("resnet8", "etf"),
                                           ("resnet8", "linear")])
def test_models_with_either_batchnorm_share_checkpoints_and_numbers(backbone,
                                                                    head):
  """A checkpoint of a CPU run (fused) restores into the model an
  accelerator builds (flax) and computes the same things, and back."""
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
  labels = jnp.arange(8) % 10
  built = {impl: models.create_model(backbone, num_classes=10, head=head,
                                     norm=FACTORIES[impl])
           for impl in ("fused", "flax")}
  etf = (etf_lib.simplex_etf(10, built["flax"].feature_dim)
         if head == "etf" else None)
  variables = {impl: m.init(jax.random.PRNGKey(0), images, classifier=etf)
               for impl, m in built.items()}
  # Same tree, shapes and dtypes, and the same initial values.
  chex.assert_trees_all_equal_shapes_and_dtypes(variables["fused"],
                                                variables["flax"])
  chex.assert_trees_all_equal(variables["fused"], variables["flax"])
  # Non-trivial running statistics, as a checkpoint would hold.
  v = variables["fused"]
  stats = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size, dtype=a.dtype)
                       .reshape(a.shape) / a.size, v["batch_stats"])
  v = dict(v, batch_stats=stats)

  outs = {}
  for impl, model in built.items():
    def loss_fn(params, model=model):
      (logits, _), upd = model.apply(dict(v, params=params), images,
                                     train=True, mutable=["batch_stats"],
                                     classifier=etf)
      return jnp.mean((logits - jax.nn.one_hot(labels, 10)) ** 2), upd

    (loss, upd), grads = jax.jit(jax.value_and_grad(
        loss_fn, has_aux=True))(v["params"])
    eval_logits, _ = model.apply(v, images, train=False, classifier=etf)
    outs[impl] = (loss, upd, grads, eval_logits)
  (l0, u0, g0, e0), (l1, u1, g1, e1) = outs["fused"], outs["flax"]
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  chex.assert_trees_all_close(u1, u0, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(g1, g0, atol=2e-5, rtol=1e-3)
  np.testing.assert_allclose(e1, e0, atol=1e-5, rtol=1e-5)
