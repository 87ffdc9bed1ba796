r"""nc_jax's train step against the authors' code, step by step, same inputs.

    python benchmarks/step_parity.py --reference PATH --data_dir DATA \
        [--method etf_dr|ce] [--mode resync|free] [--steps 50] [--epoch 0] \
        [--json OUT]

`PATH` is a checkout of NeuralCollapseApplications/ImbalancedLearning,
imported as `benchmarks/reference_run.py` imports it (nothing copied or
edited); `DATA` is any `--config.data_dir` form of CIFAR-10. Both programs
start from the same weights, the same fixed classifier and the same
batches, and each takes `--steps` SGD steps with its own code:

- nc_jax: `builder.build` on the paper preset (`cifar10_r0.01_etf_dr`, or
  `cifar10_r0.01_ce` with `method=ce_frozen`, which is what their CIFAR
  baseline trains), its compiled train step, its default implementations.
- theirs: the ResNet-32 trunk and `ETF_Classifier` (or the frozen
  `Classifier`), their `train` loop run on a one-batch loader per step,
  their DR loss / cross entropy and `produce_Ew`, their SGD with the recipe
  of their yaml file and their `adjust_learning_rate` for `--epoch` (the
  learning rates must agree, or the script stops).

What is made equal, so that no randomness is under test:
- Weights: nc_jax's initial variables are written into their modules
  (OIHW <- HWIO kernels; BatchNorm scale/bias/running statistics; the ETF
  into `ori_M`, or the frozen linear layer). The two initialisations are
  compared apart, as distributions (std ratio per weight tensor).
- Batches: `--steps` batches of 128 from the long-tailed training subset,
  cropped and flipped once, given to both as uint8.
- Mixup: nc_jax draws lambda and the partner permutation from its step key;
  their `mixup_data` is replaced by one that mixes with those two values
  (the arithmetic is theirs: `lam * x + (1 - lam) * x[index]`).

`--mode resync` (default) sets their weights, BatchNorm statistics and SGD
momentum buffers to nc_jax's before every step, so each row is one step of
each program from the same state, at a new point of the trajectory.
`--mode free` lets both run on from the common start; float rounding then
grows from step to step, in both directions alike.

Printed per step: both losses, and the relative difference
`||a - b|| / ||b||` over all trainable weights and over the BatchNorm
running means after the step. Running variances are shown apart: theirs
use the unbiased batch variance, nc_jax's (Flax's) the biased one
(`docs/fidelity.md`), so they differ by design.

The size of "equal up to float rounding" comes from a control: nc_jax
again with `conv_impl=xla` against its default implementation (on CPU,
oneDNN's kernels), the same function with different rounding, run on the
same steps. Needs torch and yacs, like `reference_run.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import reference_run as rr  # pylint: disable=g-import-not-at-top,wrong-import-position

BATCH = 128


def torch_names(key: str) -> tuple[str, tuple[str, ...], str]:
  """A torch state-dict key -> (collection, nc_jax module path, leaf).

  `layer2.3.bn1.running_var` -> ("batch_stats", ("backbone", "layer2_3",
  "bn1"), "var"); `BN_H.weight` -> ("params", ("head", "bn"), "scale");
  `fc.weight` (their frozen classifier) -> ("frozen", ("head",), "kernel").
  """
  *mods, leaf = key.split(".")
  if mods[0] == "BN_H":
    path = ("head", "bn")
  elif mods[0] == "fc":
    path = ("head",)
  else:
    path = ("backbone", *(f"{a}_{b}" if b.isdigit() else a
                          for a, b in _pairs(mods)))
  if leaf in ("running_mean", "running_var"):
    return "batch_stats", path, {"running_mean": "mean",
                                 "running_var": "var"}[leaf]
  if mods[0] == "fc":  # their frozen classifier: nc_jax's `frozen` collection
    return "frozen", path, {"weight": "kernel", "bias": "bias"}[leaf]
  if mods[-1].startswith("bn") or mods[0] == "BN_H":
    return "params", path, {"weight": "scale", "bias": "bias"}[leaf]
  return "params", path, {"weight": "kernel", "bias": "bias"}[leaf]


def _pairs(mods: list[str]):
  """["layer1", "0", "conv1"] -> [("layer1", "0"), ("conv1", "")]."""
  out, i = [], 0
  while i < len(mods):
    if i + 1 < len(mods) and mods[i + 1].isdigit():
      out.append((mods[i], mods[i + 1]))
      i += 2
    else:
      out.append((mods[i], ""))
      i += 1
  return out


def _leaf(tree, path, leaf):
  for p in path:
    tree = tree[p]
  return np.asarray(tree[leaf])


def jax_variables(state) -> dict:
  """One replica's variables as numpy: {"params", "batch_stats", ...}."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, jax.device_get(
      {"params": state.params, **state.model_state}))


def to_torch_layout(value: np.ndarray) -> np.ndarray:
  """nc_jax's layout of a weight -> PyTorch's (a view)."""
  if value.ndim == 4:  # HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:  # (d, K) -> Linear's (K, d)
    return value.T
  return value


def load_into_torch(torch, modules: dict, variables: dict) -> None:
  """Writes nc_jax's variables into their modules (in place)."""
  for prefix, module in modules.items():
    for key, tensor in module.state_dict().items():
      if key.endswith("num_batches_tracked"):
        continue
      full = f"{prefix}{key}"
      coll, path, leaf = torch_names(full)
      value = to_torch_layout(_leaf(variables[coll], path, leaf))
      if tuple(value.shape) != tuple(tensor.shape):
        raise SystemExit(f"shape mismatch at {full}: nc_jax "
                         f"{value.shape}, torch {tuple(tensor.shape)}")
      with torch.no_grad():
        tensor.copy_(torch.from_numpy(np.array(value)))  # a writable copy


def load_momentum(torch, optimizer, torch_modules: dict, state) -> None:
  """Sets their SGD momentum buffers to nc_jax's momentum trace."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  trace = jax.tree.map(np.asarray, jax.device_get(
      optax.tree_utils.tree_get(state.opt_state, "trace")))
  for prefix, module in torch_modules.items():
    for key, p in module.named_parameters():
      if not p.requires_grad:
        continue
      _, path, leaf = torch_names(f"{prefix}{key}")
      value = to_torch_layout(_leaf(trace, path, leaf))
      optimizer.state[p]["momentum_buffer"] = torch.from_numpy(
          np.array(value))


def compare(torch_modules: dict, variables: dict) -> dict:
  """Relative differences nc_jax vs torch, by kind of variable."""
  num = {"weights": 0.0, "running_mean": 0.0, "running_var": 0.0}
  den = dict.fromkeys(num, 0.0)
  for prefix, module in torch_modules.items():
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    for key, tensor in module.state_dict().items():
      if key.endswith("num_batches_tracked"):
        continue
      full = f"{prefix}{key}"
      coll, path, leaf = torch_names(full)
      if key.endswith("running_mean"):
        kind = "running_mean"
      elif key.endswith("running_var"):
        kind = "running_var"
      elif key in trainable:
        kind = "weights"
      else:
        continue
      ours = to_torch_layout(_leaf(variables[coll], path, leaf))
      theirs = tensor.detach().numpy().astype(np.float64)
      num[kind] += float(np.sum((ours - theirs) ** 2))
      den[kind] += float(np.sum(theirs ** 2))
  return {k: float(np.sqrt(num[k] / max(den[k], 1e-30))) for k in num}


def jax_compare(a: dict, b: dict) -> dict:
  """The same relative differences between two nc_jax variable trees."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for kind, (coll, leafname) in {"weights": ("params", None),
                                 "running_mean": ("batch_stats", "mean"),
                                 "running_var": ("batch_stats", "var")
                                 }.items():
    pa = jax.tree_util.tree_flatten_with_path(a[coll])[0]
    pb = dict((jax.tree_util.keystr(p), v) for p, v in
              jax.tree_util.tree_flatten_with_path(b[coll])[0])
    num = den = 0.0
    for p, v in pa:
      k = jax.tree_util.keystr(p)
      if leafname and not k.endswith(f"['{leafname}']"):
        continue
      num += float(np.sum((v.astype(np.float64) - pb[k]) ** 2))
      den += float(np.sum(pb[k].astype(np.float64) ** 2))
    out[kind] = float(np.sqrt(num / max(den, 1e-30)))
  return out


def init_spread(torch_modules: dict, variables: dict) -> dict:
  """Range over trainable weight tensors of std(nc_jax init) / std(their
  init): two independent draws, so 1 up to sampling noise when the
  initialisations are the same distribution. BatchNorm's constant 1 and 0
  are left out (compared exactly by the first step's loss)."""
  ratios = []
  for prefix, module in torch_modules.items():
    for key, p in module.named_parameters():
      if p.dim() < 2 or not p.requires_grad:
        continue
      coll, path, leaf = torch_names(f"{prefix}{key}")
      ours = _leaf(variables[coll], path, leaf)
      ratios.append(float(np.std(ours) / p.detach().numpy().std()))
  return {"layers": len(ratios), "min": min(ratios), "max": max(ratios)}


def make_batches(images, labels, steps: int, seed: int):
  """`steps` uint8 batches: a fixed permutation, zero-pad-4 crops, flips."""
  rng = np.random.RandomState(seed)
  n = steps * BATCH
  if n > len(labels):
    raise SystemExit(f"--steps {steps} needs {n} images; the subset has "
                     f"{len(labels)}.")
  idx = rng.permutation(len(labels))[:n]
  dy, dx = rng.randint(0, 9, n), rng.randint(0, 9, n)
  flip = rng.rand(n) < 0.5
  crops = rr.crop_flip(rr.pad4(images[idx]), np.arange(n), dy, dx, flip)
  return [(crops[s * BATCH:(s + 1) * BATCH],
           labels[idx][s * BATCH:(s + 1) * BATCH].astype(np.int32))
          for s in range(steps)]


def build_nc_jax(method: str, conv_impl: str, counts, steps_per_epoch):
  """The paper preset's model, steps and initial state (one replica)."""
  from nc_jax.configs import cifar_lt  # pylint: disable=g-import-not-at-top
  from nc_jax import builder, sharding  # pylint: disable=g-import-not-at-top
  config = cifar_lt.get_config(
      "cifar10_r0.01_etf_dr" if method == "etf_dr" else "cifar10_r0.01_ce")
  if method == "ce":
    config.method = "ce_frozen"
  config.conv_impl = conv_impl
  built = builder.build(
      config, num_classes=10, image_shape=(32, 32, 3),
      mean=rr.MEAN.tolist(), std=rr.STD.tolist(), class_counts=counts,
      steps_per_epoch=steps_per_epoch,
      total_steps=steps_per_epoch * config.num_epochs,
      mesh=sharding.make_mesh())
  return config, built


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reference", required=True, type=pathlib.Path)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--method", default="etf_dr", choices=("etf_dr", "ce"))
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--epoch", type=int, default=0,
                 help="0-based epoch whose learning rate the steps use")
  p.add_argument("--seed", type=int, default=0, help="batches' seed")
  p.add_argument("--mode", default="resync", choices=("resync", "free"),
                 help="resync: before every step their weights, BatchNorm "
                 "statistics and momentum are set to nc_jax's, so each row "
                 "is one step from the same state; free: both run on from "
                 "the common start (rounding differences then grow)")
  p.add_argument("--json", type=pathlib.Path, default=None)
  args = p.parse_args(argv)
  if args.steps < 1 or args.epoch < 0:
    rr.fail("--steps must be >= 1 and --epoch >= 0.")

  ref_train, resnet_cifar, config = rr.import_reference(args.reference)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from nc_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from nc_jax.data import archive, in_memory, sources  # pylint: disable=g-import-not-at-top

  name = ("Res_cifar10_imb001_ETF_DR" if args.method == "etf_dr"
          else "Res_cifar10_imb001")
  config.defrost()
  config.merge_from_file(str(args.reference / "config" / "cifar10" /
                             f"{name}.yaml"))
  try:
    root = archive.resolve_data_dir(args.data_dir)
    sources.check_source(sources.check_data_dir("cifar10", root))
    train = in_memory.load_train_lt("cifar10", root,
                                    float(config.imb_factor), "exp", 0)
  except (ValueError, FileNotFoundError) as e:
    rr.fail(str(e))
  counts = [int(c) for c in train.counts]
  steps_per_epoch = len(train.labels) // BATCH
  batches = make_batches(train.images, np.asarray(train.labels), args.steps,
                         args.seed)

  ncfg, built = build_nc_jax(args.method, "auto", counts, steps_per_epoch)
  _, control = build_nc_jax(args.method, "xla", counts, steps_per_epoch)
  start = args.epoch * steps_per_epoch
  state = built.init_state()
  # The schedule reads the optimiser's own step count, which a fresh state
  # has at 0: both counters start at the epoch's first step.
  state = state.replace(step=jnp.int32(start), opt_state=optax.tree_utils.tree_set(
      state.opt_state, count=jnp.int32(start)))
  cstate = jax.tree.map(jnp.copy, state)
  etf = built.etf

  np.random.seed(args.seed)
  torch.manual_seed(args.seed)
  model = getattr(resnet_cifar, config.backbone)()
  if args.method == "etf_dr":
    classifier = resnet_cifar.ETF_Classifier(feat_in=64, num_classes=10)
    classifier.ori_M = torch.from_numpy(np.array(etf, np.float32))
    criterion = config.criterion
  else:
    classifier = resnet_cifar.Classifier(feat_in=64, num_classes=10)
    criterion = torch.nn.CrossEntropyLoss()
  modules = {"": model}
  if args.method == "etf_dr":
    modules["BN_H."] = classifier.BN_H
  else:
    modules["fc."] = classifier.fc
  init = init_spread(modules, jax_variables(state))
  load_into_torch(torch, modules, jax_variables(state))
  optimizer = torch.optim.SGD(
      [{"params": model.parameters()}, {"params": classifier.parameters()}],
      config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
  with contextlib.redirect_stdout(io.StringIO()):  # their "lr now:" lines
    ref_train.adjust_learning_rate(optimizer, args.epoch, config)
  lr_theirs = optimizer.param_groups[0]["lr"]
  lr_ours = float(built.schedule(start))
  if not np.isclose(lr_theirs, lr_ours, rtol=1e-6):
    rr.fail(f"learning rates differ at epoch {args.epoch}: theirs "
            f"{lr_theirs}, nc_jax {lr_ours}")

  # Their loss, recorded as they compute it; their mixup, fed our draws.
  seen = []
  dot_loss, mix_crit = ref_train.dot_loss, ref_train.mixup_criterion
  ref_train.dot_loss = lambda *a, **k: seen.append(dot_loss(*a, **k)) or seen[-1]
  ref_train.mixup_criterion = (
      lambda *a, **k: seen.append(mix_crit(*a, **k)) or seen[-1])
  draw = {}

  def mixup_data(x, y, alpha=1.0, use_cuda=True):
    del alpha, use_cuda
    lam, index = draw["lam"], torch.from_numpy(draw["perm"])
    return lam * x + (1 - lam) * x[index, :], y, y[index], lam
  ref_train.mixup_data = mixup_data
  logger = logging.getLogger("step_parity")
  logger.addHandler(logging.NullHandler())
  logger.propagate = False

  print(f"{args.method}, {args.mode}, epoch {args.epoch} (lr {lr_ours:g}), "
        f"{args.steps} steps of {BATCH}; nc_jax implementations "
        f"{built.layers.conv}/{built.layers.norm}, control xla/"
        f"{control.layers.norm}", flush=True)
  print(f"initialisation, std of nc_jax's / std of theirs over "
        f"{init['layers']} weight tensors: {init['min']:.3f} to "
        f"{init['max']:.3f} (independent draws; conv1 has 432 values)")
  print(f"{'step':>4} {'loss nc_jax':>12} {'loss theirs':>12} "
        f"{'weights':>9} {'run mean':>9} {'run var':>9} | control: "
        f"{'loss':>12} {'weights':>9} {'run mean':>9}")
  rows = []
  for s, (images, labels) in enumerate(batches):
    if args.mode == "resync":  # every step from nc_jax's current state
      load_into_torch(torch, modules, jax_variables(state))
      load_momentum(torch, optimizer, modules, state)
      cstate = jax.tree.map(jnp.copy, state)
    key = jax.random.fold_in(state.rng, state.step)
    _, perm, lam = steps_lib.mixup(key, jnp.zeros((BATCH, 1)),
                                   ncfg.mixup_alpha)
    draw.update(lam=float(lam), perm=np.asarray(perm, np.int64))
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    state, out = built.train_step(state, batch, etf)
    cstate, cout = control.train_step(cstate, batch, etf)

    class OneBatch:  # what their train() reads of a DataLoader
      dataset, batch_size = labels, BATCH

      def __iter__(self):
        yield (rr.to_tensor(torch, images),
               torch.as_tensor(labels.astype(np.int64)))

      def __len__(self):
        return 1
    seen.clear()
    ref_train.train(OneBatch(), model, classifier, criterion, optimizer,
                    args.epoch, config, logger, None)
    if args.method == "etf_dr":  # loss_a, loss_b as their loop combines them
      theirs = (draw["lam"] * seen[0].item()
                + (1 - draw["lam"]) * seen[1].item())
    else:
      theirs = seen[0].item()
    ours_vars = jax_variables(state)
    d = compare(modules, ours_vars)
    c = jax_compare(jax_variables(cstate), ours_vars)
    row = {"step": s + 1, "loss_nc_jax": float(out["loss"]),
           "loss_theirs": theirs, "control_loss": float(cout["loss"]),
           **{f"rel_{k}": v for k, v in d.items()},
           **{f"control_rel_{k}": v for k, v in c.items()}}
    rows.append(row)
    print(f"{s + 1:>4} {row['loss_nc_jax']:>12.7f} {theirs:>12.7f} "
          f"{d['weights']:>9.2e} {d['running_mean']:>9.2e} "
          f"{d['running_var']:>9.2e} | control: {row['control_loss']:>12.7f} "
          f"{c['weights']:>9.2e} {c['running_mean']:>9.2e}", flush=True)
  loss_gap = max(abs(r["loss_nc_jax"] - r["loss_theirs"]) for r in rows)
  ctrl_gap = max(abs(r["loss_nc_jax"] - r["control_loss"]) for r in rows)
  w_gap = max(r["rel_weights"] for r in rows)
  wc_gap = max(r["control_rel_weights"] for r in rows)
  print(f"max over the {args.steps} steps, nc_jax vs theirs (vs the "
        f"control): |loss difference| {loss_gap:.2e} ({ctrl_gap:.2e}), "
        f"relative weight difference {w_gap:.2e} ({wc_gap:.2e})")
  if args.json:
    args.json.write_text(json.dumps({
        "method": args.method, "mode": args.mode, "epoch": args.epoch,
        "lr": lr_ours,
        "steps": args.steps, "batch_size": BATCH, "init_std_ratio": init,
        "implementations": [built.layers.conv, built.layers.norm],
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
