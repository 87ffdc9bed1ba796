"""The weight transfer of `benchmarks/step_parity.py`.

The parity script needs the authors' checkout, which CI does not have; what
it can get wrong on its own is moving nc_jax's variables into PyTorch
modules named as theirs. Here the modules are `benchmarks/torch_reference.py`'s
ResNet-32 (the same module names as their `resnet32_fe`): after the
transfer, with non-trivial BatchNorm statistics, both programs must give
the same evaluation logits, and the momentum buffers must be nc_jax's trace.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import step_parity  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _random_state(built, seed: int):
  """A train state of `built`'s shapes (traced, never compiled) with every
  float leaf of params, batch statistics and the momentum trace random
  (variances positive, BatchNorm scales near 1)."""
  rng = np.random.default_rng(seed)

  def rand(path, x):
    if not np.issubdtype(x.dtype, np.floating):
      return np.zeros(x.shape, x.dtype)
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 2.0, x.shape).astype(x.dtype)
    return (rng.standard_normal(x.shape) * 0.1 + (
        1.0 if name.endswith("['scale']") else 0.0)).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(
      rand, jax.eval_shape(built.init_state))


@pytest.mark.parametrize("method", ["etf_dr", "ce"])
def test_transferred_weights_give_the_same_logits_and_momentum(method):
  _, built = step_parity.build_nc_jax(method, "xla", COUNTS, 96)
  state = _random_state(built, seed=1)
  variables = step_parity.jax_variables(state)
  trunk = torch_reference.ResNet32()
  if method == "etf_dr":
    head = torch_reference.ETFClassifier(64, 10)
    modules = {"": trunk, "BN_H.": head.bn}
  else:
    head = torch.nn.Linear(64, 10).requires_grad_(False)  # theirs is frozen
    modules = {"": trunk, "fc.": head}
  step_parity.load_into_torch(torch, modules, variables)
  diffs = step_parity.compare(modules, variables)
  assert diffs == {"weights": 0.0, "running_mean": 0.0, "running_var": 0.0}

  images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3),
                                             dtype=np.uint8)
  x = jnp.asarray(step_parity.rr.to_tensor(torch, images).numpy()
                  .transpose(0, 2, 3, 1))  # their normalisation, NHWC
  ours, _ = built.model.apply(
      {"params": state.params, **state.model_state}, x, train=False,
      classifier=built.etf)
  trunk.eval()
  head.eval()
  with torch.no_grad():
    feat = trunk(step_parity.rr.to_tensor(torch, images))
    if method == "etf_dr":
      theirs = head(feat) @ torch.from_numpy(np.array(built.etf))
    else:
      theirs = head(feat)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-4,
                             atol=1e-4)

  opt = torch.optim.SGD([p for m in modules.values()
                         for p in m.parameters()], lr=0.1, momentum=0.9)
  step_parity.load_momentum(torch, opt, modules, state)
  trace = optax.tree_utils.tree_get(state.opt_state, "trace")
  kernel = np.asarray(trace["backbone"]["layer2_3"]["conv1"]["kernel"])
  np.testing.assert_array_equal(
      opt.state[trunk.layer2[3].conv1.weight]["momentum_buffer"].numpy(),
      kernel.transpose(3, 2, 0, 1))
  assert len(opt.state) == sum(p.requires_grad for m in modules.values()
                               for p in m.parameters())


def test_torch_names_map_their_keys():
  assert step_parity.torch_names("layer2.3.bn1.running_var") == (
      "batch_stats", ("backbone", "layer2_3", "bn1"), "var")
  assert step_parity.torch_names("conv1.weight") == (
      "params", ("backbone", "conv1"), "kernel")
  assert step_parity.torch_names("BN_H.weight") == (
      "params", ("head", "bn"), "scale")
  assert step_parity.torch_names("fc.bias") == ("frozen", ("head",), "bias")


def test_crop_flip_is_a_pad4_window_mirrored_on_width():
  rr = step_parity.rr
  images = np.random.default_rng(0).integers(
      1, 256, (3, 32, 32, 3)).astype(np.uint8)
  padded = rr.pad4(images)
  crops = rr.crop_flip(padded, np.array([2, 0, 1]), np.array([4, 0, 8]),
                       np.array([4, 0, 3]), np.array([False, False, True]))
  np.testing.assert_array_equal(crops[0], images[2])
  assert not crops[1, :4].any() and not crops[1, :, :4].any()
  np.testing.assert_array_equal(crops[1, 4:, 4:], images[0, :28, :28])
  np.testing.assert_array_equal(crops[2, :28, ::-1][:, 1:30],
                                images[1, 4:, :29])
