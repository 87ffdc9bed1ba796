"""Backbones, heads and the `create_model` registry."""

import functools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nc_jax import etf as etf_lib
from nc_jax import models
from nc_jax.models import densenet, heads, layers, resnet, resnet_cifar

# Compiling threefry for ~100 differently shaped parameters takes XLA:CPU
# several times longer than the network itself; the models do not care which
# PRNG feeds them, so the tests init from the cheaper-to-compile RBG one.
KEY = jax.random.key(0, impl="unsafe_rbg")


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def _etf(k: int, d: int, seed: int = 7) -> np.ndarray:
  # Often first called while tracing: build it eagerly, keep it as numpy.
  with jax.ensure_compile_time_eval():
    return np.asarray(etf_lib.simplex_etf(k, d, seed=seed))


def _clf(model) -> dict:
  """The `classifier=` keyword an etf-head model needs (the fixed ETF is an
  input of the head, never built by it); nothing for learnt heads."""
  if model.head_name == "etf":
    return {"classifier": _etf(model.num_classes, model.feature_dim)}
  return {}


def _shapes(model, images):
  """Variables' shapes without allocating them (cheap for big models)."""
  return jax.eval_shape(
      lambda k: model.init(k, images, train=False, **_clf(model)), KEY)


def _images(shape=(4, 8, 8, 3), seed=1):
  # Tests share one batch shape where they can: eager ops compile once per
  # shape, and later tests then reuse the compiled kernels.
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@functools.lru_cache(maxsize=None)
def _variables(name: str, k: int, head: str, freeze: bool = False):
  """Initialised variables, built once per variable layout.

  Compiling `init` costs seconds on CPU, and variables depend neither on the
  input's spatial size nor on the etf head's seed or normalisation option.
  """
  opts = {"freeze_classifier": True} if freeze else {}
  model = models.create_model(name, num_classes=k, head=head, **opts)
  return jax.jit(lambda key: model.init(key, _images((1, 8, 8, 3)),
                                       **_clf(model)))(KEY)


# ---------------------------------------------------------------------------
# Parameter counts.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,k,head,total,backbone", [
    ("resnet32", 10, "linear", 464_154, 463_504),
    ("resnet32", 10, "etf", 463_632, 463_504),
    ("resnet32_c100", 100, "linear", 1_861_508, 1_848_608),
    ("resnet32_c100", 100, "etf", 1_848_864, 1_848_608),
])
def test_cifar_resnet_param_counts(name, k, head, total, backbone):
  model = models.create_model(name, num_classes=k, head=head)
  variables = _shapes(model, jnp.zeros((1, 32, 32, 3)))
  assert _count(variables["params"]) == total
  assert _count(variables["params"]["backbone"]) == backbone
  assert set(variables) == {"params", "batch_stats"}


def _densenet_bc_count(depth=150, k=12, theta=0.5) -> tuple[int, int]:
  """Huang et al.'s DenseNet-BC, counted by hand: (backbone params, dim)."""
  n = (depth - 4) // 6
  c = 2 * k
  total = 3 * 3 * 3 * c  # Stem conv, no BN before the first block.
  for block in range(3):
    for _ in range(n):
      total += 2 * c + c * 4 * k  # BN(c), conv1x1 c -> 4k.
      total += 2 * 4 * k + 9 * 4 * k * k  # BN(4k), conv3x3 4k -> k.
      c += k
    if block < 2:
      out = math.floor(theta * c)
      total += 2 * c + c * out  # BN(c), conv1x1 c -> floor(theta c).
      c = out
  total += 2 * c  # Final BN.
  return total, c


def test_densenet_bc_param_count_and_feature_dim():
  expected, dim = _densenet_bc_count()
  assert dim == 510 == 222 + 24 * 12
  model = models.create_model("densenet_bc", num_classes=10, head="etf")
  assert model.feature_dim == 510
  variables = _shapes(model, jnp.zeros((1, 8, 8, 3)))
  assert _count(variables["params"]["backbone"]) == expected == 1_509_780
  assert _count(variables["params"]["head"]) == 2 * 510
  assert densenet.channel_plan(150, 12, 0.5, True) == [
      (24, 312), (156, 444), (222, 510)]


def _bottleneck_resnet_count(planes, blocks=(3, 4, 6, 3)) -> int:
  """torchvision's bottleneck ResNet backbone (no fc), counted by hand."""
  total = 7 * 7 * 3 * 64 + 2 * 64
  c = 64
  for p, n in zip(planes, blocks):
    for j in range(n):
      total += c * p + 2 * p + 9 * p * p + 2 * p + p * 4 * p + 2 * 4 * p
      if j == 0:  # Projection shortcut.
        total += c * 4 * p + 2 * 4 * p
      c = 4 * p
  return total


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
@pytest.mark.parametrize("wide,dim", [(True, 4096), (False, 2048)])
def test_resnet50_param_count_and_shapes(wide, dim):
  # The linear head: building a K = 1000 ETF takes seconds (its QR); the
  # etf head on this backbone is exercised below with fewer classes.
  model = models.create_model("resnet50", num_classes=1000, head="linear",
                              wide_layer4=wide)
  assert model.feature_dim == dim
  images = jnp.zeros((2, 64, 64, 3))
  variables = _shapes(model, images)
  planes = (64, 128, 256, 1024 if wide else 512)
  count = _count(variables["params"]["backbone"])
  assert count == _bottleneck_resnet_count(planes)
  assert _count(variables["params"]["head"]) == dim * 1000 + 1000
  if not wide:  # torchvision's resnet50: 25,557,032 less fc (2,049,000).
    assert count == 23_508_032
  logits, feats = jax.eval_shape(
      lambda v: model.apply(v, images, train=False), variables)
  assert logits.shape == (2, 1000) and feats.shape == (2, dim)
  assert logits.dtype == feats.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Shapes, attributes, dtypes.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "etf"])
@pytest.mark.parametrize("shape", [
    (4, 8, 8, 3),
    (1, 9, 9, 3),  # Odd sizes: option-A shortcut and strided conv agree.
    (1, 96, 96, 3),  # STL-10 resolution.
])
def test_resnet32_forward_shapes(shape, head):
  model = models.create_model("resnet32", num_classes=10, head=head)
  assert (model.num_classes, model.feature_dim, model.head_name) == (
      10, 64, head)
  logits, feats = model.apply(_variables("resnet32", 10, head),
                              _images(shape), train=False, **_clf(model))
  chex.assert_shape(logits, (shape[0], 10))
  chex.assert_shape(feats, (shape[0], 64))
  chex.assert_tree_all_finite((logits, feats))
  assert logits.dtype == feats.dtype == jnp.float32


@pytest.mark.parametrize("head", ["linear", "etf"])
@pytest.mark.parametrize("name,k,dim", [
    ("resnet32_c100", 100, 128),
    # The two big backbones are heavy for the fast tier (setup.cfg's `slow`).
    pytest.param("densenet_bc", 10, 510, marks=pytest.mark.slow),
    pytest.param("resnet50", 100, 4096, marks=pytest.mark.slow),
])
def test_other_backbones_output_shapes(name, k, dim, head):
  # Shapes only (eval_shape traces the whole network without compiling);
  # a real forward through the same DenseNet code runs below.
  model = models.create_model(name, num_classes=k, head=head)
  assert (model.num_classes, model.feature_dim, model.head_name) == (
      k, dim, head)
  images = jnp.zeros((2, 32, 32, 3))
  variables = _shapes(model, images)
  for train in (False, True):
    (logits, feats), new_vars = jax.eval_shape(
        lambda v, train=train: model.apply(v, images, train=train,
                                           mutable=["batch_stats"],
                                           **_clf(model)),
        variables)
    assert logits.shape == (2, k) and feats.shape == (2, dim)
    assert logits.dtype == feats.dtype == jnp.float32
    chex.assert_trees_all_equal_shapes(new_vars["batch_stats"],
                                       variables["batch_stats"])


# Heavy for the fast tier (setup.cfg's `slow`); the full suite runs it.
@pytest.mark.slow
def test_small_densenet_forward_matches_its_feature_dim():
  model = densenet.DenseNet(depth=16, growth_rate=4, reduction=0.5)
  images = _images((2, 8, 8, 3))
  variables = jax.jit(model.init)(KEY, images)
  feats, _ = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats"]))(variables, images)
  # (16 - 4) // 6 = 2 layers a block: 8 -> 16 -> 8 -> 16 -> 8 -> 16.
  assert model.feature_dim == 16
  chex.assert_shape(feats, (2, 16))
  chex.assert_tree_all_finite(feats)
  assert set(variables["params"]) == {"conv1", "bn", "trans1", "trans2"} | {
      f"block{b}_{j}" for b in (1, 2, 3) for j in (0, 1)}


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = models.create_model("resnet32", num_classes=10, head="etf",
                              dtype=jnp.bfloat16)
  images = _images()
  for leaf in jax.tree.leaves(_shapes(model, images)):
    assert leaf.dtype == jnp.float32
  variables = _variables("resnet32", 10, "etf")
  (logits, feats), _ = model.apply(variables, images, train=True,
                                   mutable=["batch_stats"], **_clf(model))
  assert logits.dtype == feats.dtype == jnp.float32
  ref = models.create_model("resnet32", num_classes=10, head="etf")
  ref_logits, _ = ref.apply(variables, images, train=False, **_clf(ref))
  bf_logits, _ = model.apply(variables, images, train=False, **_clf(model))
  np.testing.assert_allclose(bf_logits, ref_logits, atol=0.1)


def test_kaiming_normal_fan_in_init():
  params = _variables("resnet32", 10, "linear")["params"]
  kernel = params["backbone"]["layer3_1"]["conv1"]["kernel"]  # (3, 3, 64, 64)
  assert abs(float(jnp.std(kernel)) / math.sqrt(2 / (9 * 64)) - 1) < 0.03
  fc = params["head"]["kernel"]  # (64, 10)
  assert abs(float(jnp.std(fc)) / math.sqrt(2 / 64) - 1) < 0.15
  assert float(jnp.max(jnp.abs(params["head"]["bias"]))) <= 1 / 8
  bn = params["backbone"]["bn1"]
  chex.assert_trees_all_equal(bn["scale"], jnp.ones(16))
  chex.assert_trees_all_equal(bn["bias"], jnp.zeros(16))


def _rel_std(kernel, fan) -> float:
  """Empirical std of `kernel` over the Kaiming-normal std for `fan`, - 1."""
  return float(jnp.std(kernel)) / math.sqrt(2 / fan) - 1


def test_resnet32_conv_init_is_fan_in():
  # A conv whose fan-in (3*3*16) and fan-out (3*3*32) differ.
  kernel = _variables("resnet32", 10, "linear")["params"]["backbone"][
      "layer2_0"]["conv1"]["kernel"]
  assert kernel.shape == (3, 3, 16, 32)
  assert abs(_rel_std(kernel, 3 * 3 * 16)) < 0.05
  assert abs(_rel_std(kernel, 3 * 3 * 32)) > 0.2


def test_flax_fan_out_of_hwio_kernel_is_torch_fan_out():
  # PyTorch's fan_out for a (out, in, kh, kw) weight is out * kh * kw.
  kernel = layers.KAIMING_NORMAL_FAN_OUT(KEY, (3, 3, 128, 32))
  assert abs(_rel_std(kernel, 32 * 3 * 3)) < 0.02


def test_densenet_conv_init_is_fan_out():
  layer = densenet.DenseLayer(growth_rate=32)
  params = jax.jit(functools.partial(layer.init, train=False))(
      KEY, jnp.zeros((1, 4, 4, 64)))["params"]
  conv1, conv2 = params["conv1"]["kernel"], params["conv2"]["kernel"]
  assert conv1.shape == (1, 1, 64, 128) and conv2.shape == (3, 3, 128, 32)
  assert abs(_rel_std(conv1, 128)) < 0.05
  assert abs(_rel_std(conv2, 3 * 3 * 32)) < 0.05
  assert abs(_rel_std(conv2, 3 * 3 * 128)) > 0.5  # Not fan-in.
  chex.assert_trees_all_equal(params["bn2"]["scale"], jnp.ones(128))
  chex.assert_trees_all_equal(params["bn2"]["bias"], jnp.zeros(128))


def test_resnet50_conv_init_is_fan_out():
  # ResNet-50's own stem and bottleneck code, one stage of one block.
  model = resnet.ResNet(stage_sizes=(1,), planes=(64,))
  params = jax.jit(model.init)(KEY, jnp.zeros((1, 8, 8, 3)))["params"]
  stem = params["conv1"]["kernel"]
  block = params["layer1_0"]
  assert stem.shape == (7, 7, 3, 64)
  assert abs(_rel_std(stem, 7 * 7 * 64)) < 0.05
  assert abs(_rel_std(block["conv2"]["kernel"], 3 * 3 * 64)) < 0.05
  assert abs(_rel_std(block["conv3"]["kernel"], 256)) < 0.05  # 64 -> 256
  assert abs(_rel_std(block["downsample_conv"]["kernel"], 256)) < 0.05
  chex.assert_trees_all_equal(params["bn1"]["scale"], jnp.ones(64))
  chex.assert_trees_all_equal(params["bn1"]["bias"], jnp.zeros(64))


def test_option_a_shortcut_pads_channels_symmetrically():
  x = _images((1, 5, 5, 16))
  y = resnet_cifar.option_a_shortcut(x, 32, 2)
  chex.assert_shape(y, (1, 3, 3, 32))
  chex.assert_trees_all_equal(y[..., 8:24], x[:, ::2, ::2, :])
  assert not np.any(y[..., :8]) and not np.any(y[..., 24:])


# ---------------------------------------------------------------------------
# BatchNorm train / eval behaviour.
# ---------------------------------------------------------------------------


def _backbone_features(model, variables, images, train):
  return model.apply(variables, images, train=train, mutable=["batch_stats"],
                     method=lambda m, x, train: m.backbone(x, train=train))[0]


def test_batchnorm_train_uses_batch_stats_and_updates_running_stats():
  model = models.create_model("resnet32", num_classes=10, head="etf",
                              l2_normalize=False)
  variables = _variables("resnet32", 10, "etf")
  images = _images()
  (_, feats), updates = model.apply(variables, images, train=True,
                                    mutable=["batch_stats"], **_clf(model))
  # Train mode: the head's BN normalises with this batch's statistics.
  np.testing.assert_allclose(feats.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(feats.var(0), 1.0, rtol=1e-2)
  # Running stats move by (1 - 0.9) towards the batch's (PyTorch's 0.1).
  h = _backbone_features(model, variables, images, train=True)
  new_bn = updates["batch_stats"]["head"]["bn"]
  np.testing.assert_allclose(new_bn["mean"], 0.1 * h.mean(0), atol=1e-5)
  np.testing.assert_allclose(new_bn["var"], 0.9 + 0.1 * h.var(0), rtol=1e-5)
  old_stem = variables["batch_stats"]["backbone"]["bn1"]["mean"]
  new_stem = updates["batch_stats"]["backbone"]["bn1"]["mean"]
  assert not np.allclose(old_stem, new_stem)
  # Eval mode: running stats (initially mean 0, var 1, eps 1e-5), so each
  # example's output is independent of the rest of the batch.
  _, eval_feats = model.apply(variables, images, train=False, **_clf(model))
  h_eval = _backbone_features(model, variables, images, train=False)
  np.testing.assert_allclose(eval_feats, h_eval / np.sqrt(1 + 1e-5),
                             rtol=1e-5, atol=1e-5)
  others = images.at[1:].set(_images(seed=2)[1:])
  _, eval_others = model.apply(variables, others, train=False,
                               **_clf(model))
  np.testing.assert_allclose(eval_others[0], eval_feats[0], rtol=1e-4,
                             atol=1e-4)
  (_, train_others), _ = model.apply(variables, others, train=True,
                                     mutable=["batch_stats"], **_clf(model))
  assert not np.allclose(train_others[0], feats[0], atol=1e-3)
  # Eval mode after the update uses the new running statistics.
  _, eval_new = model.apply({**variables, **updates}, images, train=False,
                            **_clf(model))
  assert not np.allclose(eval_new, eval_feats, atol=1e-3)


# ---------------------------------------------------------------------------
# The ETF head.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def etf_model():
  model = models.create_model("resnet32", num_classes=10, head="etf")
  return model, _variables("resnet32", 10, "etf"), _images()


def test_etf_logits_are_unit_features_times_the_given_etf(etf_model):
  model, variables, images = etf_model
  m = np.asarray(etf_lib.simplex_etf(10, 64, seed=7), np.float64)
  etf = jnp.asarray(m, jnp.float32)
  chex.assert_trees_all_equal(
      models.classifier_weights(model, variables, classifier=etf), etf)
  for train in (False, True):
    (logits, feats), _ = model.apply(variables, images, train=train,
                                     mutable=["batch_stats"], classifier=etf)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(logits, np.asarray(feats, np.float64) @ m,
                               atol=1e-6)


def test_etf_is_not_a_variable_and_must_be_given(etf_model):
  model, variables, images = etf_model
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]["head"]) == {"bn"}
  for leaf in jax.tree.leaves(variables):
    assert leaf.shape != (64, 10)
  with pytest.raises(ValueError, match="needs its fixed classifier"):
    model.apply(variables, images)
  with pytest.raises(ValueError, match=r"shape \(64, 10\)"):
    model.apply(variables, images, classifier=jnp.zeros((10, 64)))
  with pytest.raises(ValueError, match="classifier="):
    models.classifier_weights(model, variables)
  linear = models.create_model("resnet32", num_classes=10, head="linear")
  with pytest.raises(ValueError, match="learns its own classifier"):
    linear.apply(_variables("resnet32", 10, "linear"), images,
                 classifier=jnp.zeros((64, 10)))


def test_sgd_step_changes_params_but_not_the_etf(etf_model):
  model, variables, images = etf_model
  labels = jnp.array([0, 3, 5, 9])
  etf = _etf(10, 64)
  etf_before = np.array(etf)

  def loss_fn(params):
    (logits, _), _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, images,
        train=True, mutable=["batch_stats"], classifier=etf)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  grads = jax.jit(jax.grad(loss_fn))(variables["params"])
  chex.assert_trees_all_equal_structs(grads, variables["params"])
  opt = optax.sgd(0.1, momentum=0.9)
  updates, _ = opt.update(grads, opt.init(variables["params"]),
                          variables["params"])
  new_params = optax.apply_updates(variables["params"], updates)
  assert not np.allclose(new_params["head"]["bn"]["scale"],
                         variables["params"]["head"]["bn"]["scale"])
  new_vars = {"params": new_params, "batch_stats": variables["batch_stats"]}
  chex.assert_trees_all_equal(etf_before, np.asarray(etf))
  logits, feats = model.apply(new_vars, images, train=False, classifier=etf)
  np.testing.assert_allclose(logits, np.asarray(feats) @ etf_before,
                             atol=1e-6)


def test_replica_etfs_and_l2_option():
  stacked = etf_lib.replica_etfs(10, 64, seed=3, num_replicas=2)
  assert stacked.shape == (2, 64, 10)
  for r in range(2):
    chex.assert_trees_all_equal(stacked[r],
                                etf_lib.simplex_etf(10, 64, seed=3 + r))
  chex.assert_trees_all_equal(etf_lib.replica_etfs(10, 64, seed=3),
                              stacked[0])
  raw = models.create_model("resnet32", num_classes=10, head="etf",
                            l2_normalize=False)
  variables = _variables("resnet32", 10, "etf")
  logits, feats = raw.apply(variables, _images(), **_clf(raw))
  assert not np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-2)
  np.testing.assert_allclose(logits, feats @ _etf(10, 64), atol=1e-4)


def test_l2_normalize_has_finite_gradient_at_zero():
  grad = jax.grad(lambda h: heads._l2_normalize(h).sum())(jnp.zeros((2, 4)))
  chex.assert_tree_all_finite(grad)


def test_feature_dim_too_small_for_etf_raises_etf_error():
  with pytest.raises(ValueError, match="needs feature_dim >= 99"):
    models.create_model("resnet32", num_classes=100, head="etf")
  # d = K - 1 is enough.
  model = models.create_model("resnet32", num_classes=65, head="etf")
  assert model.feature_dim == 64
  assert etf_lib.replica_etfs(65, 64, seed=0).shape == (64, 65)


# ---------------------------------------------------------------------------
# The linear head.
# ---------------------------------------------------------------------------


def test_frozen_linear_head_lives_outside_params():
  frozen = models.create_model("resnet32", num_classes=10, head="linear",
                               freeze_classifier=True)
  fv = _variables("resnet32", 10, "linear", freeze=True)
  lv = _variables("resnet32", 10, "linear")
  assert set(fv) == {"params", "batch_stats", "frozen"}
  assert set(fv["params"]) == {"backbone"}  # The optimizer sees no head.
  assert set(fv["frozen"]["head"]) == {"kernel", "bias"}
  assert "frozen" not in lv
  # Initialised exactly like the learnable layer.
  chex.assert_trees_all_equal(fv["frozen"]["head"], lv["params"]["head"])
  chex.assert_trees_all_equal(models.classifier_weights(frozen, fv),
                              lv["params"]["head"]["kernel"])
  # The logits still use it.
  images = _images()
  (logits, feats), updates = frozen.apply(fv, images, train=True,
                                          mutable=["batch_stats"])
  assert set(updates) == {"batch_stats"}
  np.testing.assert_allclose(
      logits, feats @ fv["frozen"]["head"]["kernel"] + fv["frozen"]["head"][
          "bias"], atol=1e-4)


def test_learnable_linear_head_features_are_pooled_backbone_output():
  model = models.create_model("resnet32", num_classes=10, head="linear")
  variables = _variables("resnet32", 10, "linear")
  images = _images()
  logits, feats = model.apply(variables, images)
  h = _backbone_features(model, variables, images, train=False)
  chex.assert_trees_all_close(feats, h)
  assert float(feats.min()) >= 0.0  # Post-ReLU average pool.
  w = models.classifier_weights(model, variables)
  chex.assert_trees_all_equal(w, variables["params"]["head"]["kernel"])
  np.testing.assert_allclose(
      logits, feats @ w + variables["params"]["head"]["bias"], atol=1e-4)


def test_cosine_head_gives_cosines_of_unit_features_and_columns():
  model = models.create_model("resnet32", num_classes=10, head="cosine")
  variables = _variables("resnet32", 10, "cosine")
  assert set(variables["params"]["head"]) == {"kernel"}  # No bias.
  kernel = variables["params"]["head"]["kernel"]
  assert kernel.shape == (64, 10) and float(jnp.max(jnp.abs(kernel))) <= 1
  images = _images()
  logits, feats = model.apply(variables, images)
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
  h = np.asarray(_backbone_features(model, variables, images, train=False),
                 np.float64)
  w = np.asarray(kernel, np.float64)
  want = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (
      w / np.linalg.norm(w, axis=0, keepdims=True))
  np.testing.assert_allclose(logits, want, atol=1e-5)
  assert float(jnp.max(jnp.abs(logits))) <= 1 + 1e-6
  cw = models.classifier_weights(model, variables)
  np.testing.assert_allclose(np.linalg.norm(cw, axis=0), 1.0, atol=1e-6)
  np.testing.assert_allclose(logits, feats @ cw, atol=1e-5)


# ---------------------------------------------------------------------------
# Registry errors.
# ---------------------------------------------------------------------------


def test_unknown_backbone_head_and_option_raise():
  with pytest.raises(ValueError, match="densenet_bc, resnet20, resnet32, "
                     "resnet32_c100, resnet50, resnet50_standard, "
                     "resnet8"):
    models.create_model("resnet18", num_classes=10, head="etf")
  with pytest.raises(ValueError, match="valid heads: cosine, etf, linear"):
    models.create_model("resnet32", num_classes=10, head="arcface")
  with pytest.raises(ValueError, match="valid options: .*l2_normalize"):
    models.create_model("resnet32", num_classes=10, head="etf", widht=2)
  # The ETF is an input of the head, not an option of it.
  with pytest.raises(ValueError, match="Unknown option 'etf_seed'"):
    models.create_model("resnet32", num_classes=10, head="etf", etf_seed=3)
  with pytest.raises(ValueError, match="wide_layer4"):
    models.create_model("resnet32", num_classes=10, head="etf",
                        wide_layer4=True)
  # Another head's option is accepted and ignored.
  model = models.create_model("resnet32", num_classes=10, head="linear",
                              l2_normalize=False)
  assert model.head_name == "linear"


def test_layers_are_given_not_decided():
  """A model takes its BatchNorm (`norm`) and, for the CIFAR ResNets, its
  convolution (`conv`) as factories; the defaults are Flax's BatchNorm and
  XLA's convolution, and `norm` reaches the backbone and the etf head."""
  from nc_jax.kernels import fused_norm  # pylint: disable=g-import-not-at-top
  from nc_jax.models import conv as conv_lib  # pylint: disable=g-import-not-at-top
  plain = models.create_model("resnet8", num_classes=10, head="etf")
  assert (plain.backbone.conv, plain.backbone.norm, plain.head.norm) == (
      conv_lib.Conv, layers.batch_norm, layers.batch_norm)
  fused = models.create_model("resnet8", num_classes=10, head="etf",
                              norm=fused_norm.fused_batch_norm)
  assert fused.backbone.norm is fused.head.norm is fused_norm.fused_batch_norm
  assert models.create_model(
      "densenet_bc", num_classes=10, head="linear",
      norm=fused_norm.fused_batch_norm).backbone.norm is (
          fused_norm.fused_batch_norm)
  assert models.takes_conv("resnet32")
  assert not models.takes_conv("resnet50")
  # Both BatchNorms have the same variables, and give the same numbers.
  x = jax.random.normal(KEY, (4, 8, 8, 3))
  etf = etf_lib.simplex_etf(10, 64)
  variables = plain.init(KEY, x, classifier=etf)
  a, _ = plain.apply(variables, x, train=True, classifier=etf,
                     mutable=["batch_stats"])
  b, _ = fused.apply(variables, x, train=True, classifier=etf,
                     mutable=["batch_stats"])
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)
  # No model file names an implementation: the plugin does (nc_jax.kernels).
  import pathlib as _p  # pylint: disable=g-import-not-at-top
  for f in _p.Path(models.__file__).parent.glob("*.py"):
    text = f.read_text().lower()
    for word in ("conv_impl", "norm_impl", "onednn", "cpu_kernels"):
      assert word not in text, (f.name, word)


def test_registries_are_explicit_dicts():
  assert set(models.BACKBONES) == {"resnet8", "resnet20", "resnet32",
                                   "resnet32_c100", "densenet_bc", "resnet50",
                                   "resnet50_standard"}
  assert set(models.HEADS) == {"linear", "cosine", "etf"}
  assert models.FIXED_CLASSIFIER_HEADS == {"etf"}
  assert isinstance(models.create_model("resnet32", num_classes=10,
                                        head="etf"), flax.linen.Module)
