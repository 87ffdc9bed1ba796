"""The method layer: registry, each method's loss against numpy references,
DRW switching and its combination with mixup in the real train step, ETF
ownership, post-hoc logit adjustment, and config checks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax import builder
from nc_jax import etf as etf_lib
from nc_jax import losses
from nc_jax import methods
from nc_jax import models
from nc_jax import sharding
from nc_jax import steps as steps_lib
from nc_jax import validation
from tests import tiny_step

K, D, B = 5, 8, 12
COUNTS = np.array([400, 120, 40, 9, 2])
OPTIONS = methods.LossOptions(dict(
    given_ew=True, dr_form="reference", e_w=1.0, e_h=1.0, reg_lam=0.0,
    la_tau=1.0, ldam_max_margin=0.5, ldam_scale=30.0, drw_epoch=3,
    cb_beta=0.9999))


# ----------------------------------------------------------- numpy references
def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y]


def np_cb_weights(counts, beta):
  """Cui et al.: (1 - beta) / (1 - beta^n), normalised to sum K (float64)."""
  w = (1.0 - beta) / (1.0 - np.power(beta, np.asarray(counts, np.float64)))
  return w / w.sum() * len(counts)


def np_ldam_drw(cos, y, counts, *, epoch, drw_epoch, beta, max_m, s):
  """The authors' LDAMLoss + DRW, written out (PyTorch weighted CE)."""
  m = 1.0 / np.sqrt(np.sqrt(np.asarray(counts, np.float64)))
  m = m * (max_m / m.max())
  z = np.array(cos, np.float64)
  z[np.arange(len(y)), y] -= m[y]
  per = np_ce(s * z, y)
  w = np_cb_weights(counts, beta) if epoch >= drw_epoch else np.ones(
      len(counts))
  return (w[y] * per).sum() / w[y].sum()


def np_lengths(y, k):
  uniq, cnt = np.unique(y, return_counts=True)
  out = np.ones(k)
  out[uniq] = np.sqrt(len(y) / len(uniq) / cnt)
  return out


def _ctx(seed=0, *, epoch=0, options=OPTIONS, unit=True):
  rng = np.random.default_rng(seed)
  feats = rng.standard_normal((B, D))
  if unit:
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  etf = np.asarray(etf_lib.simplex_etf(K, D, seed=seed), np.float64)
  labels = rng.integers(0, K, B).astype(np.int32)
  logits = np.clip(rng.standard_normal((B, K)) * 0.4, -1, 1)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  ctx = methods.LossContext(
      logits=f32(logits), features=f32(feats), labels=jnp.asarray(labels),
      classifier=f32(etf), class_counts=f32(COUNTS),
      lengths=losses.batch_class_lengths(jnp.asarray(labels), K),
      step=jnp.int32(epoch * 10), epoch=jnp.int32(epoch),
      batch_labels=jnp.asarray(labels), partner_labels=jnp.asarray(labels),
      lam=jnp.float32(1.0), options=options)
  return ctx, dict(logits=logits, feats=feats, etf=etf, labels=labels)


# ------------------------------------------------------------------ losses
@pytest.mark.parametrize("seed", [0, 1])
def test_each_loss_matches_its_numpy_reference(seed):
  ctx, r = _ctx(seed)
  z, h, m, y = r["logits"], r["feats"], r["etf"], r["labels"]
  pi = COUNTS / COUNTS.sum()
  t = (m[:, y] * np_lengths(y, K)[y]).T
  dot = (h * t).sum(1)
  hn = np.linalg.norm(h, axis=1)
  want = {
      "etf_dr": np.mean(0.5 * (dot - np.linalg.norm(t, axis=1) * hn) ** 2
                        / hn),
      "etf_dot": np.mean(-dot),
      "etf_ce": np.mean(np_ce(z, y)),
      "ce": np.mean(np_ce(z, y)),
      "ce_frozen": np.mean(np_ce(z, y)),
      "la": np.mean(np_ce(z + np.log(pi), y)),
      "bs": np.mean(np_ce(z + np.log(COUNTS), y)),
      "ldam_drw": np_ldam_drw(z, y, COUNTS, epoch=0, drw_epoch=3,
                              beta=0.9999, max_m=0.5, s=30.0),
  }
  assert set(want) == set(methods.METHODS)
  for name, value in want.items():
    got = jax.jit(methods.get_method(name).loss)(ctx)
    chex.assert_shape(got, ())
    np.testing.assert_allclose(got, value, rtol=2e-5, atol=1e-6,
                               err_msg=name)


def test_la_tau_and_dr_paper_form_options():
  ctx, r = _ctx(3)
  z, y = r["logits"], r["labels"]
  opts = methods.LossOptions(dict(OPTIONS, la_tau=2.5))
  pi = COUNTS / COUNTS.sum()
  np.testing.assert_allclose(
      methods.logit_adjusted(ctx.replace(options=opts)),
      np.mean(np_ce(z + 2.5 * np.log(pi), y)), rtol=1e-5)
  paper = methods.LossOptions(dict(OPTIONS, dr_form="paper", given_ew=False,
                                   e_w=4.0, e_h=1.0))
  t = 2.0 * r["etf"][:, y].T
  want = np.mean(((r["feats"] * t).sum(1) - 2.0) ** 2 / 4.0)
  np.testing.assert_allclose(methods.dot_regression(ctx.replace(
      options=paper)), want, rtol=1e-5)


def test_drw_weights_switch_at_the_configured_epoch():
  for epoch in (0, 2, 3, 7):
    ctx, r = _ctx(4, epoch=epoch)
    w = np.asarray(jax.jit(methods.drw_class_weights)(ctx))
    want = np_cb_weights(COUNTS, 0.9999) if epoch >= 3 else np.ones(K)
    np.testing.assert_allclose(w, want, rtol=1e-4)
    np.testing.assert_allclose(
        methods.ldam_drw(ctx),
        np_ldam_drw(r["logits"], r["labels"], COUNTS, epoch=epoch,
                    drw_epoch=3, beta=0.9999, max_m=0.5, s=30.0), rtol=1e-5)


def test_unknown_option_names_the_config_fix():
  with pytest.raises(KeyError, match=r"c\.loss\.focal_gamma"):
    OPTIONS["focal_gamma"]  # pylint: disable=pointless-statement
  assert hash(OPTIONS) == hash(methods.LossOptions(dict(OPTIONS)))


# ----------------------------------------------------------------- registry
def test_registry_names_and_unknown_names():
  assert set(methods.METHODS) == {"etf_dr", "etf_ce", "etf_dot", "ce",
                                  "ce_frozen", "la", "bs", "ldam_drw"}
  for m in methods.METHODS.values():
    assert m.head in models.HEADS
  assert methods.get_method("ldam_drw").head == "cosine"
  assert methods.get_method("etf_dr").fixed_classifier
  assert not methods.get_method("la").fixed_classifier
  with pytest.raises(ValueError, match="Unknown method 'focal'.*etf_dr"):
    methods.get_method("focal")
  with pytest.raises(ValueError, match="already registered"):
    methods.register_method("ce", methods.Method(head="linear",
                                                 loss=methods.ce_loss))
  with pytest.raises(ValueError, match="valid heads"):
    methods.register_method("x", methods.Method(head="mlp",
                                                loss=methods.ce_loss))
  assert "x" not in methods.METHODS


# ----------------------------------------------------- the real train step
def _batch(seed=0, b=16):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (b, 16, 16, 3), dtype=np.uint8),
          "label": rng.integers(0, 10, b).astype(np.int32)}


@pytest.mark.slow
def test_ldam_drw_with_mixup_in_the_train_step():
  """Each mixup term is weighted by its own labels' DRW weights, and the
  weights switch on at epoch drw_epoch (step drw_epoch * spe), in one
  compiled program."""
  built = tiny_step.tiny_build("ldam_drw", **{"loss.drw_epoch": 2})
  cfg = built.step_config
  spe = cfg.steps_per_epoch
  step_fn = jax.jit(steps_lib.make_train_step(built.model, built.tx,
                                              built.schedule, cfg))
  state0 = built.init_state()
  batch = jax.tree.map(jnp.asarray, _batch())
  counts = np.asarray(tiny_step.COUNTS)
  for step in (2 * spe - 1, 2 * spe, 2 * spe + 3):
    state = state0.replace(step=jnp.int32(step))
    _, out = step_fn(state, batch, None)
    # The same forward pass, by hand.
    rng = jax.random.fold_in(state.rng, state.step)
    x = steps_lib.normalize(batch["image"], cfg.mean, cfg.std)
    x, perm, lam = steps_lib.mixup(rng, x, cfg.mixup_alpha)
    (cos, _), _ = built.model.apply(
        {"params": state.params, **state.model_state}, x, train=True,
        mutable=["batch_stats"])
    y_a = np.asarray(batch["label"])
    y_b = y_a[np.asarray(perm)]
    kw = dict(epoch=step // spe, drw_epoch=2, beta=0.9999, max_m=0.5, s=30.0)
    lam = float(lam)
    want = (lam * np_ldam_drw(cos, y_a, counts, **kw)
            + (1 - lam) * np_ldam_drw(cos, y_b, counts, **kw))
    np.testing.assert_allclose(out["loss"], want, rtol=2e-4, err_msg=step)
  assert step_fn._cache_size() == 1  # the switch is traced, not recompiled


@pytest.mark.slow
def test_a_method_with_its_own_mixup_gets_both_label_sets():
  """combine_mixup=False: the step calls the loss once, with the partners'
  labels and lam in the context; doing the reference's combination there
  by hand gives the generic method's loss exactly."""

  def own(ctx):
    per = losses.mixup_loss(losses.cross_entropy(ctx.logits, ctx.labels),
                            losses.cross_entropy(ctx.logits,
                                                 ctx.partner_labels), ctx.lam)
    return per.mean()

  methods.register_method("ce_own_mixup", methods.Method(
      head="linear", loss=own, combine_mixup=False), replace=True)
  try:
    batch = jax.tree.map(jnp.asarray, _batch())
    out = {}
    for name in ("ce", "ce_own_mixup"):
      built = tiny_step.tiny_build(name)
      step_fn = jax.jit(steps_lib.make_train_step(
          built.model, built.tx, built.schedule, built.step_config))
      _, out[name] = step_fn(built.init_state(), batch, None)
    np.testing.assert_allclose(out["ce_own_mixup"]["loss"], out["ce"]["loss"],
                               rtol=1e-6)
  finally:
    methods.METHODS.pop("ce_own_mixup")


@pytest.mark.slow
def test_bfloat16_train_step_keeps_float32_state():
  built = tiny_step.tiny_build("etf_dr", compute_dtype="bfloat16")
  step_fn = jax.jit(steps_lib.make_train_step(
      built.model, built.tx, built.schedule, built.step_config))
  state = built.init_state()
  batch = jax.tree.map(jnp.asarray, _batch())
  for _ in range(3):
    state, out = step_fn(state, batch, built.etf)
  assert np.isfinite(float(out["loss"]))
  for leaf in jax.tree.leaves((state.params, state.model_state,
                               state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype
      assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.slow
def test_etf_has_one_owner():
  """The ETF the steps use is the one built from etf_seed (+ r per replica),
  what the metrics report, and never part of params or optimiser state."""
  s = 2
  built = tiny_step.tiny_build("etf_dr", num_seeds=s, etf_seed=5,
                               nc_metrics=True)
  assert tiny_step.tiny_config("etf_dr").etf_rotation == "uniform01"
  want = np.stack([np.asarray(etf_lib.simplex_etf(10, 64, seed=5 + r,
                                                  rotation="uniform01"))
                   for r in range(s)])
  np.testing.assert_array_equal(np.asarray(built.etf), want)
  state = built.init_state()
  for tree in (state.params, state.opt_state, state.model_state):
    for leaf in jax.tree.leaves(tree):
      assert leaf.shape[-2:] != (64, 10), leaf.shape
  np.testing.assert_array_equal(built.classifiers(state), want)
  mesh = sharding.make_mesh()
  batch = sharding.to_global(_batch(1), mesh)
  state, _ = built.train_step(state, batch, built.etf)
  eval_batch = sharding.to_global(dict(_batch(2), mask=np.ones(16, bool)),
                                  mesh)
  out = built.eval_step(state, eval_batch, built.etf)
  labels = np.asarray(eval_batch["label"])
  for r in range(s):
    pred = np.argmax(np.asarray(out["features"][r]) @ want[r], -1)
    correct = np.bincount(labels[pred == labels], minlength=10)
    np.testing.assert_array_equal(out["correct1"][r], correct)
  # A rebuilt (e.g. resumed) run gets the identical matrices.
  again = tiny_step.tiny_build("etf_dr", num_seeds=s, etf_seed=5)
  np.testing.assert_array_equal(np.asarray(again.etf), want)
  assert tiny_step.tiny_build("ce").etf is None


@pytest.mark.slow
def test_posthoc_logit_adjustment_and_eval_scale():
  plain = tiny_step.tiny_build("ce")
  tau = 1.5
  adjusted = tiny_step.tiny_build("ce", eval_logit_adjust_tau=tau)
  state = plain.init_state()
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(3)
  b = {"image": rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8),
       "label": rng.integers(0, 10, 32).astype(np.int32),
       "mask": np.ones(32, bool)}
  logits, _ = plain.model.apply(
      {"params": state.params, **state.model_state},
      steps_lib.normalize(b["image"], (0.5,) * 3, (0.25,) * 3), train=False)
  logits = np.asarray(logits, np.float64)
  counts = np.asarray(tiny_step.COUNTS, np.float64)
  for built, z in ((plain, logits),
                   (adjusted, logits - tau * np.log(counts / counts.sum()))):
    out = built.eval_step(state, sharding.to_global(b, mesh), None)
    hit = np.argmax(z, -1) == b["label"]
    np.testing.assert_array_equal(
        out["correct1"], np.bincount(b["label"][hit], minlength=10))
  ldam = tiny_step.tiny_build("ldam_drw").step_config
  z = jnp.full((2, 10), 0.1)
  np.testing.assert_allclose(steps_lib.eval_logits(ldam, z), 3.0, rtol=1e-6)


# ----------------------------------------------------------- config checks
@pytest.mark.parametrize("method,override,match", [
    ("la", {"loss.la_tau": -0.5}, "la_tau must be >= 0"),
    ("ldam_drw", {"loss.cb_beta": 1.0}, r"cb_beta must lie in \(0, 1\)"),
    ("ldam_drw", {"loss.cb_beta": 0.0}, r"cb_beta must lie in \(0, 1\)"),
    ("ldam_drw", {"loss.drw_epoch": 10}, "past the end of training"),
    ("ldam_drw", {"loss.ldam_scale": 0.0}, "ldam_scale must be > 0"),
    ("etf_dot", {"l2_normalize": False}, "needs l2_normalize=True"),
    ("ce", {"eval_logit_adjust_tau": -1.0}, "eval_logit_adjust_tau must be"),
    ("focal", {}, "Unknown method 'focal'"),
])
def test_validation_refuses_configs_that_cannot_work(method, override,
                                                    match):
  cfg = tiny_step.tiny_config(method, num_epochs=10.0, **override)
  with pytest.raises(ValueError, match=match):
    validation.check_values(cfg)
    validation.validate_length(cfg, steps_per_epoch=10)  # 100 steps


def test_posthoc_adjustment_needs_every_class():
  cfg = tiny_step.tiny_config("ce", eval_logit_adjust_tau=1.0)
  with pytest.raises(ValueError, match="every class"):
    builder.step_config(cfg, methods.get_method("ce"), num_classes=3,
                        mean=(0.5,), std=(0.5,), class_counts=(5, 0, 2),
                        steps_per_epoch=1)


@pytest.mark.parametrize("mode", ["vmap", "unroll"])
@pytest.mark.slow
def test_learnt_heads_run_as_replicas_without_an_etf(mode):
  built = tiny_step.tiny_build("ldam_drw", num_seeds=2, seeds_mode=mode)
  assert built.etf is None
  mesh = sharding.make_mesh()
  state = built.init_state()
  state, out = built.train_step(state, sharding.to_global(_batch(), mesh),
                                None)
  assert out["loss"].shape == (2,)
  assert not np.allclose(out["loss"][0], out["loss"][1])
  counts = built.eval_step(state, sharding.to_global(
      dict(_batch(1), mask=np.ones(16, bool)), mesh), None)
  assert counts["count"].shape == (2, 10)
  w = built.classifiers(state)
  assert w.shape == (2, 64, 10)
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_eval_reports_honest_loss_and_no_ece_for_cosine_logits():
  """ETF heads: no ECE (softmax of cosines is not a probability they were
  trained for) and, for DR, the DR loss against unit targets as eval loss;
  the linear CE head keeps both; ece_bins sets the number of bins."""
  import numpy as np
  from nc_jax import methods as methods_lib
  from nc_jax import metrics as metrics_lib
  assert not methods_lib.get_method("etf_dr").calibrated
  assert not methods_lib.get_method("etf_ce").calibrated
  assert methods_lib.get_method("ce").calibrated
  assert methods_lib.get_method("ldam_drw").calibrated
  rng = np.random.default_rng(0)
  h = rng.normal(size=(6, 4)).astype(np.float32)
  h /= np.linalg.norm(h, axis=1, keepdims=True)
  m = np.linalg.qr(rng.normal(size=(4, 3)))[0].astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2], np.int32)
  ctx = methods_lib.LossContext(
      logits=jnp.asarray(h @ m), features=jnp.asarray(h), labels=y,
      classifier=jnp.asarray(m), class_counts=jnp.ones(3),
      lengths=jnp.ones(3), step=0, epoch=0, batch_labels=y,
      partner_labels=y, lam=jnp.ones(()),
      options=methods_lib.LossOptions({"given_ew": True}))
  per = methods_lib.dot_regression_eval(ctx)
  cos = np.sum(h * m[:, y].T, axis=1)
  np.testing.assert_allclose(per, 0.5 * (cos - 1) ** 2, rtol=1e-5,
                             atol=1e-6)
  counts = metrics_lib.batch_counts(jnp.asarray(h @ m), y, num_classes=3,
                                    num_bins=7, per_example_loss=per)
  assert counts["bin_count"].shape == (7,)
  np.testing.assert_allclose(counts["loss_sum"], np.sum(per), rtol=1e-5)


@pytest.mark.slow
def test_trained_etf_run_has_no_ece_and_ce_run_has_one(tiny_image_folder,
                                                       tmp_path):
  from nc_jax import train
  from tests.test_train import tiny_config
  out = {}
  for method in ("etf_dr", "ce"):
    config = tiny_config(tiny_image_folder, arg=f"method={method},steps=2",
                         **{"ece_bins": 5})
    out[method] = train.train_and_evaluate(config, tmp_path / method)
  assert out["etf_dr"]["final"]["ece"] is None
  assert out["ce"]["final"]["ece"] is not None
  assert out["etf_dr"]["final"]["loss"] < 1.0  # DR loss, not CE on cosines
