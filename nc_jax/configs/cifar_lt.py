"""Configs for long-tailed training: CIFAR-10/100-LT, SVHN-LT, STL-10-LT, ImageNet-LT.

Use as `--config nc_jax/configs/cifar_lt.py:ARGS` where ARGS is a comma
list of `key=value` and bare variant names, e.g.

    dataset=cifar10,imb=0.01,method=etf_dr
    dataset=cifar100,imb=0.005,method=ce,seed=3
    dataset=svhn,imb=0.01,backbone=densenet_bc
    quick                         (a 2-core-CPU CIFAR-10-LT run, < 30 min)
    imagenet_lt                   (the ImageNet-LT recipe)
    cub200                        (fine-tuning on CUB-200-2011; needs
                                   --config.pretrained=resnet50.pth)
    cifar10_r0.01_etf_dr          (a named preset, see `presets()`)

Recognised keys: dataset, imb, method (etf_dr, etf_ce, etf_dot, ce,
ce_frozen, la, bs, ldam_drw: `nc_jax.methods.METHODS`), backbone, mixup
(alpha; 0 = off), seed, profile, pipeline, sampler (random or
class_balanced), epochs, steps (the training length; giving one clears the
other). Every field can then be overridden with
`--config.FIELD=VALUE`; the returned config is locked, so a misspelt field
stops the run before any work.

The reference code released 24 small-data configs, all ResNet-32: dataset
in {cifar10, cifar100, svhn, stl10} x imb in {0.005, 0.01, 0.02} x {the
baseline, ETF + DR}, plus the ImageNet-LT pair. `presets()` names them
`{dataset}_r{imb}_{ce|etf_dr}` and `imagenet_lt_{ce|etf_dr}`; each name is
also a valid config argument. The `_ce` presets train the paper's learnable
classifier (`method=ce`); the reference's CIFAR baseline code actually
freezes it (`method=ce_frozen`). DenseNet-BC variants (`..._densenet`,
`densenet_presets()`) are this package's additions: no DenseNet config was
released, and a public attempt with 3 seeds on CIFAR-100-LT found ETF + DR
below learnable CE there (reference repository, issue #5).
"""

from __future__ import annotations

import difflib

import ml_collections

from nc_jax import schedule_fit

# Per-dataset defaults: the reference's backbone and class groups live in the
# data and model registries; only choices made by the recipe are here.
DATASET_BACKBONE = {
    "cifar10": "resnet32",
    "cifar100": "resnet32_c100",
    "svhn": "resnet32",
    "stl10": "resnet32",
    "imagenet_lt": "resnet50",
    "cub200": "resnet50_standard",
}
VARIANTS = ("quick", "imagenet_lt", "cub200", "tiny")
PAPER_DATASETS = ("cifar10", "cifar100", "svhn", "stl10")
PAPER_RATIOS = ("0.005", "0.01", "0.02")
PAPER_METHODS = ("ce", "etf_dr")
KEYS = ("dataset", "imb", "method", "backbone", "mixup", "seed", "profile",
        "pipeline", "sampler", "epochs", "steps")


def presets() -> dict[str, str]:
  """Name -> config argument of the reference's released configs.

  The 24 small-data configs (`{dataset}_r{imb}_{ce|etf_dr}`, all ResNet-32)
  and the ImageNet-LT pair (`imagenet_lt_ce`, `imagenet_lt_etf_dr`).
  """
  out = {}
  for ds in PAPER_DATASETS:
    for imb in PAPER_RATIOS:
      for m in PAPER_METHODS:
        out[f"{ds}_r{imb}_{m}"] = f"dataset={ds},imb={imb},method={m}"
  for m in PAPER_METHODS:
    out[f"imagenet_lt_{m}"] = f"imagenet_lt,method={m}"
  return out


def densenet_presets() -> dict[str, str]:
  """The DenseNet-BC variants of the small-data presets.

  NOT released by the reference (its hyper-parameters for DenseNet are
  unknown; these reuse the ResNet-32 recipe), and a public report on the
  reference repository (issue #5, 3 seeds, CIFAR-100-LT) did not reproduce
  the paper's DenseNet rows: ETF + DR 43.02 +- 0.56 vs learnable CE
  44.66 +- 0.24 at r = 0.01.
  """
  return {f"{name}_densenet": f"{arg},backbone=densenet_bc"
          for name, arg in presets().items()
          if not name.startswith("imagenet_lt")}


def fine_grained_presets() -> dict[str, str]:
  """Fine-tuning an ImageNet-pretrained ResNet-50 on CUB-200-2011.

  The paper's first version lists CUB-200-2011 (ETF + DR, 87.0 top-1) but
  its recipe was never released. These presets use a common published one
  instead, the ERM fine-tuning baseline of the Transfer-Learning-Library
  (thuml, `examples/task_adaptation/image_classification/erm.py` with
  `--finetune`): SGD with Nesterov momentum 0.9, weight decay 5e-4, batch
  48, rate 0.01 for the new head and 0.001 for the pretrained backbone,
  10,000 steps with x0.1 after 6,000 (here 80 epochs of CUB's 124 steps,
  decay after epoch 48), random resized crop to 224 with scale (0.2, 1) and
  a flip, no colour jitter and no mixup; evaluation resizes to 256 and
  crops 224. The head follows the reference's ImageNet config (no L2
  normalisation of the features, reg_lam 0.01). They need the weights
  (`--config.pretrained=`, `nc_jax.pretrained`); nothing is downloaded.
  """
  return {f"cub200_{m}": f"cub200,method={m}" for m in PAPER_METHODS}


def _parse(arg: str | None) -> tuple[dict[str, str], list[str]]:
  kv, flags = {}, []
  items = [s.strip() for s in (arg or "").split(",")]
  named = {**presets(), **densenet_presets(), **fine_grained_presets()}
  # A preset name expands in place into its own arguments.
  items = [x for item in items
           for x in (named[item].split(",") if item in named else [item])]
  for item in filter(None, items):
    if "=" in item:
      k, v = item.split("=", 1)
      if k not in KEYS:
        close = difflib.get_close_matches(k, KEYS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown config argument {k!r} in {arg!r}.{hint} Valid keys: "
            f"{', '.join(KEYS)} (other fields: --config.FIELD=VALUE).")
      kv[k] = v
    elif item in VARIANTS:
      flags.append(item)
    else:
      close = difflib.get_close_matches(item, list(VARIANTS) + list(named),
                                        n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(
          f"Unknown config variant or preset {item!r}.{hint} Valid variants: "
          f"{', '.join(VARIANTS)}; presets such as cifar10_r0.01_etf_dr "
          "(all in nc_jax.configs.cifar_lt.presets()); or key=value "
          f"with keys {', '.join(KEYS)}.")
  return kv, flags


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked training config for `arg` (see the module doc)."""
  kv, variants = _parse(arg)
  c = ml_collections.ConfigDict()
  _data_fields(c, kv)
  _model_fields(c, kv)
  _loss_fields(c, kv)
  _optim_fields(c, kv)
  _run_fields(c, kv)
  _seed_fields(c, kv)

  # --- variants
  for name, apply in VARIANT_SETTINGS.items():
    if name in variants or c.dataset == name:
      apply(c, kv)

  # The training length from the argument wins over the variants' defaults.
  if "epochs" in kv and "steps" in kv:
    raise ValueError("Give epochs= or steps=, not both.")
  for key, kind in (("epochs", float), ("steps", int)):
    if key in kv:
      try:
        ok = kind(kv[key]) > 0
      except ValueError:
        ok = False
      if not ok:
        raise ValueError(f"{key}={kv[key]} must be a number > 0 (the "
                         f"training length), e.g. {key}=20.")
  if "epochs" in kv or "steps" in kv:
    recipe = c.num_epochs or None  # None: a variant that counts steps
    c.optim.fit_to_run = schedule_fit.recipe_entries(c) if recipe else ()
    c.optim.fit_from_epochs = recipe
  if "epochs" in kv:
    c.num_epochs, c.num_steps = float(kv["epochs"]), None
  if "steps" in kv:
    c.num_epochs, c.num_steps = None, int(kv["steps"])

  c.lock()
  return c


def _data_fields(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """The data: which dataset, its long-tailed subset, the input pipeline."""
  c.dataset = kv.get("dataset", "cifar10")
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.imb_factor = float(kv.get("imb", 0.01))
  c.imb_profile = kv.get("profile", "exp")
  c.selection_seed = 0  # which images form the long-tailed subset
  # Source splits that are subsampled and concatenated; "" = the dataset's
  # (SVHN: "train,extra"). "train" trains SVHN on its train split alone.
  c.train_splits = ""
  c.pipeline = kv.get("pipeline", "device")  # "device" or "tfdata"
  c.imagenet_lt_train_list = ml_collections.FieldReference(None, field_type=str)
  # ImageNet-LT's ColorJitter(brightness, contrast, saturation) strength,
  # after the random resized crop and flip (the reference's 0.4; 0 = off).
  c.color_jitter = 0.4
  # The streamed datasets' random resized crop: its smallest area, as a
  # fraction of the image (torchvision's default 0.08; CUB's recipe 0.2).
  c.crop_min_area = 0.08
  c.batch_size = 128  # global, over all devices and processes
  c.eval_batch_size = 500


def _model_fields(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """The model, the method and the layers' implementations."""
  c.method = kv.get("method", "etf_dr")
  backbone = kv.get("backbone", "resnet")
  if backbone == "resnet":
    backbone = DATASET_BACKBONE.get(c.dataset, "resnet32")
  c.backbone = backbone
  c.etf_seed = 0  # seed of the fixed classifier; replica r uses etf_seed + r
  # How the fixed ETF's random rotation is drawn (nc_jax.etf.simplex_etf):
  # "uniform01" (the reference's QR of a uniform [0, 1) matrix: one class
  # vector near the all-ones direction; needs feature_dim >= num_classes),
  # the reference's, so the presets reproduce its runs; or "gaussian" (a
  # uniformly random frame; feature_dim >= num_classes - 1), the default
  # until 2026-11-29 and what a config.json without this field means.
  c.etf_rotation = "uniform01"
  c.l2_normalize = True  # the ETF head's feature normalisation
  # ImageNet-pretrained backbone weights to start from (nc_jax.pretrained):
  # a torchvision ResNet-50 state_dict (.pth) or a timm .safetensors file,
  # for resnet50_standard. Read once, at step 0. None: random init.
  c.pretrained = ml_collections.FieldReference(None, field_type=str)
  # Presets that fine-tune refuse to start without `pretrained`.
  c.pretrained_required = False
  c.compute_dtype = "float32"
  # Implementations (nc_jax.kernels decides "auto" once at
  # start-up; the choice is recorded in config.json and results.json). Convolutions of the CIFAR
  # ResNets: "auto" = oneDNN's own primitives (nc_jax.kernels) on a
  # single CPU device in float32 when they build, else XLA's; "xla" or
  # "onednn" force one. BatchNorm: "auto" = "fused" (a hand-written
  # gradient for XLA's CPU fusion) on CPU, "flax" (flax.linen.BatchNorm) on
  # GPU/TPU; same variables either way.
  c.conv_impl = "auto"
  c.norm_impl = "auto"
  # A resume whose resolved kernels differ from the recorded ones (say, on
  # a machine without a C++ compiler) stops unless this is True.
  c.allow_kernel_change = False


def _loss_fields(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """The loss block: the methods' hyper-parameters, mixup, the sampler."""
  c.loss = ml_collections.ConfigDict()
  c.loss.given_ew = True  # per-batch class lengths (the reference default)
  c.loss.dr_form = "reference"  # or "paper" (Eq. 6 with e_w, e_h)
  c.loss.e_w = 1.0
  c.loss.e_h = 1.0
  c.loss.reg_lam = 0.0
  # Long-tail baselines (docs/method.md, Long-tail baselines; nc_jax.methods).
  c.loss.la_tau = 1.0  # method=la: CE(z + la_tau * log(prior))
  c.loss.ldam_max_margin = 0.5  # method=ldam_drw: the rarest class's margin
  c.loss.ldam_scale = 30.0  # method=ldam_drw: scale of the cosine logits
  # method=ldam_drw: 0-based epoch from which the loss is re-weighted by
  # class_balanced_weights(counts, cb_beta) (160 of 200: the first decay).
  c.loss.drw_epoch = 160
  c.loss.cb_beta = 0.9999
  c.mixup_alpha = float(kv.get("mixup", 1.0))  # 0 turns mixup off
  # "random" (each image once per epoch) or "class_balanced" (the
  # reference's CLS_BALAN: N draws with replacement, weight 1/n_c per image,
  # so every class is equally likely); works with every method.
  c.sampler = kv.get("sampler", "random")


def _optim_fields(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """The training length, the optimiser and its schedule."""
  del kv
  c.num_epochs = ml_collections.FieldReference(200.0, field_type=float)
  c.num_steps = ml_collections.FieldReference(None, field_type=int)
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 2e-4
  c.optim.schedule = "step"  # or "cosine"
  c.optim.warmup_epochs = ml_collections.FieldReference(5, field_type=int)
  c.optim.warmup_steps = ml_collections.FieldReference(None, field_type=int)
  c.optim.decay_epochs = (160, 180)
  c.optim.decay_factor = 0.1
  # The backbone's learning rate relative to the head's (fine-tuning).
  c.optim.backbone_lr_scale = 1.0
  # A run shorter than the recipe it came from scales the recipe's schedule
  # to its length (nc_jax.schedule_fit): set, with the recipe's values and
  # length, when the config argument gives epochs=N or steps=N; a field
  # set to another value (or given with --config.FIELD=) stays as given.
  c.optim.fit_to_run = ()
  c.optim.fit_from_epochs = ml_collections.FieldReference(None,
                                                          field_type=float)


def _run_fields(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """Evaluation, checkpoints, logging and pre-emption."""
  del kv
  # After every epoch, as the reference (its "best" is the best of these).
  c.eval_every_epochs = ml_collections.FieldReference(1.0, field_type=float)
  c.eval_every_steps = ml_collections.FieldReference(None, field_type=int)
  c.checkpoint_every_epochs = ml_collections.FieldReference(5.0, field_type=float)
  c.checkpoint_every_steps = ml_collections.FieldReference(None, field_type=int)
  c.keep_checkpoints = 2
  c.log_every_steps = 20
  # Train steps per compiled call (nc_jax.dispatch): k > 1 runs up to k
  # steps in one jax.lax.scan over k batches already on the devices, cutting
  # the host's per-step dispatch; the same numbers as 1. Chunks stop at
  # every log, evaluation and checkpoint step, so k > log_every_steps gains
  # nothing; a stop signal waits for the chunk in flight (up to k steps).
  c.steps_per_dispatch = 1
  # After SIGTERM/SIGINT the run saves a checkpoint at the next step
  # boundary; if none comes within this many seconds (a long compilation)
  # it exits without one (nc_jax.preemption). Fits a 30 s notice.
  c.preemption_grace_seconds = 25.0
  # What each evaluation measures: names of nc_jax.evaluators.EVALUATORS.
  c.evals = ("classification",)
  c.nc_metrics = False  # neural-collapse statistics at each evaluation
  c.nc_train_metrics = False  # ...also on the (unaugmented) train subset
  c.ece_bins = 15
  # Post-hoc logit adjustment at evaluation: logits - tau * log(prior)
  # before top-1/top-5/ECE (Menon et al. 2021); 0 = off.
  c.eval_logit_adjust_tau = 0.0


def _seed_fields(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """Seeds and replicas."""
  c.seed = int(kv.get("seed", 0))  # init, data order, mixup
  c.num_seeds = 1  # independent replicas trained in one program
  # How replicas share the program: "vmap" batches them (grouped convs; best
  # on GPU/TPU), "unroll" gives each its own copy of the graph (best on CPU,
  # where grouped convs are slow); "auto" picks by backend.
  c.seeds_mode = "auto"


# --------------------------------------------------------------- variants


def _quick(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """About 20 min per run on a 2-core CPU with ResNet-32 on CIFAR-10-LT;
  large enough that ETF+DR and CE separate."""
  del kv
  c.num_epochs = 16.0
  c.optim.warmup_epochs = 1
  c.optim.decay_epochs = (12, 14)
  c.loss.drw_epoch = 12  # DRW starts with the first decay, as at 160/200
  c.eval_every_epochs = 4.0
  c.checkpoint_every_epochs = 2.0


def _tiny(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """For tests: seconds, not minutes."""
  del kv
  c.batch_size = 16
  c.eval_batch_size = 32
  c.num_epochs = 1.0
  c.optim.warmup_epochs = 0
  c.optim.decay_epochs = ()  # a test's few steps end before any decay
  c.loss.drw_epoch = 0  # one epoch: re-weight from the start
  c.log_every_steps = 1


def _imagenet_lt(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """The reference's ImageNet-LT recipe."""
  c.dataset = "imagenet_lt"
  c.backbone = kv.get("backbone", DATASET_BACKBONE["imagenet_lt"])
  c.pipeline = kv.get("pipeline", "tfdata")
  c.l2_normalize = False
  c.batch_size = 1024
  c.num_epochs = 90.0
  c.optim.schedule = "cosine"
  c.optim.warmup_epochs = None
  c.optim.weight_decay = 5e-4
  c.mixup_alpha = float(kv.get("mixup", 0.2))
  c.loss.reg_lam = 0.01
  c.checkpoint_every_epochs = 1.0


def _cub200(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """Fine-tuning on CUB-200-2011; `fine_grained_presets` gives the recipe
  and its source."""
  c.dataset = "cub200"
  c.backbone = kv.get("backbone", DATASET_BACKBONE["cub200"])
  c.imb_factor = float(kv.get("imb", 1.0))  # < 1: the long-tailed variant
  c.pipeline = kv.get("pipeline", "tfdata")
  c.pretrained_required = True
  c.l2_normalize = False
  c.loss.reg_lam = 0.01
  c.batch_size = 48
  c.eval_batch_size = 96
  c.num_epochs = 80.0
  c.optim.lr = 0.01
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.warmup_epochs = 0
  c.optim.decay_epochs = (48,)
  c.optim.backbone_lr_scale = 0.1
  c.loss.drw_epoch = 48
  c.mixup_alpha = float(kv.get("mixup", 0.0))
  c.color_jitter = 0.0
  c.crop_min_area = 0.2
  c.eval_every_epochs = 4.0
  c.checkpoint_every_epochs = 4.0


# Applied in this order (a dataset's variant also applies when the dataset
# is named with dataset=).
VARIANT_SETTINGS = {"quick": _quick, "tiny": _tiny,
                    "imagenet_lt": _imagenet_lt, "cub200": _cub200}
