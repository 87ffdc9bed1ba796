r"""The authors' code, trained with their recipe on nc_jax's arrays.

    python benchmarks/reference_run.py --reference PATH --data_dir DATA \
        --workdir DIR [--method etf_dr|ce] [--imb 0.01] [--seed 0]

`PATH` is a checkout of NeuralCollapseApplications/ImbalancedLearning. Its
files are imported as they are, never copied or edited: the model
(`models/resnet_cifar.py`: the ResNet-32 trunk, `ETF_Classifier` or the
frozen `Classifier`), the loss and mixup (`methods.py`), and the epoch loop
and learning-rate schedule (`train.train`, `train.adjust_learning_rate`),
driven by the recipe in their yaml file for the cell
(`config/<dataset>/Res_<dataset>_imb<r>[_ETF_DR].yaml`).

What this script supplies instead of their `main_worker`:
- The data: nc_jax's reader (`DATA` is any `--config.data_dir` form, e.g.
  the CIFAR python release) and nc_jax's long-tailed subset, which is the
  reference's selection, so both programs see the same arrays. Their
  dataset classes need torchvision and a download, so their `datasets`
  package is replaced by an empty stand-in. Augmentation is theirs,
  written out in numpy: zero-pad 4, random 32x32 crop, horizontal flip,
  then their normalisation; batches of 128, reshuffled every epoch, the
  last partial batch kept (their loop runs `int(N / 128) + 1` batches).
- Seeds: numpy and torch are seeded with `--seed` (their released configs
  run unseeded), before the ETF is drawn.
- Evaluation after every epoch on the whole test split: top-1, top-5,
  per-class accuracy and their head/medium/tail index ranges, computed
  from their model's outputs as their `validate` does.
- A checkpoint after every epoch (model, classifier and its ETF, optimizer,
  numpy and torch RNG states, history), written atomically; rerunning the
  same command resumes from it. Their own loop does not restore the ETF
  or the optimizer; this one does, so a resumed run continues the same
  run.
- On a machine without CUDA, `.cuda()` on tensors and modules returns its
  argument unchanged (their code calls it unconditionally). With CUDA,
  model, classifier and evaluation run on the GPU, as in their `main`,
  and a checkpoint from either resumes on the other.

Writes `DIR/config.json` (nc_jax's names for the dataset, ratio, method,
backbone, batch and epochs, so that `nc-jax-report` takes DIR beside
nc_jax's workdirs), `DIR/results.json` (nc_jax's layout: config, train
counts, class groups, final, best, history, provenance: command, commits,
versions),
`DIR/metrics.jsonl` (one train and one eval record per epoch; the train
`loss` is their running mean at their last progress line of the epoch) and
`DIR/train.log` (their progress lines).
Needs torch and yacs (their config loader); not torchvision.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
import types

import numpy as np

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)  # their Normalize
STD = np.array([0.2023, 0.1994, 0.2010], np.float32)


def fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def import_reference(path: pathlib.Path):
  """Their `train`, `models.resnet_cifar` and yacs `config`, imported."""
  for f in ("train.py", "methods.py", "models/resnet_cifar.py",
            "utils/logger.py"):
    if not (path / f).is_file():
      fail(f"--reference {path} has no {f}: pass a checkout of "
           "NeuralCollapseApplications/ImbalancedLearning.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import yacs  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    fail(f"{e.name} is not installed: pip install torch yacs.")
  if not torch.cuda.is_available():
    # Their code calls .cuda() unconditionally; on a CPU it stays put.
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
  # Their dataset classes (torchvision, downloads) are not used here.
  pkg = types.ModuleType("datasets")
  pkg.__path__ = []
  sys.modules["datasets"] = pkg
  for mod, names in {"cifar10": ["CIFAR10_LT"], "cifar100": ["CIFAR100_LT"],
                     "stl10": ["STL10_LT"], "svhn": ["SVHN_LT"],
                     "imagenet": ["ImageNet_LT"]}.items():
    m = types.ModuleType(f"datasets.{mod}")
    for n in names:
      setattr(m, n, None)
    sys.modules[f"datasets.{mod}"] = m
  sys.path.insert(0, str(path))
  import train as ref_train  # pylint: disable=g-import-not-at-top
  from models import resnet_cifar  # pylint: disable=g-import-not-at-top
  from utils import config  # pylint: disable=g-import-not-at-top
  return ref_train, resnet_cifar, config


def pad4(images: np.ndarray) -> np.ndarray:
  """[N, 32, 32, C] -> [N, 40, 40, C], zero padding of 4 (their recipe)."""
  return np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))


def crop_flip(padded: np.ndarray, idx: np.ndarray, dy: np.ndarray,
              dx: np.ndarray, flip: np.ndarray) -> np.ndarray:
  """32x32 crops of `padded[idx]` at offsets (dy, dx), mirrored where `flip`.

  `idx`, `dy`, `dx` and `flip` are aligned, [B] each; returns [B, 32, 32, C].
  The draws are the caller's, so each script keeps its own random order.
  """
  crops = np.stack([padded[j, y:y + 32, x:x + 32]
                    for j, y, x in zip(idx, dy, dx)])
  return np.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


class EpochLoader:
  """One epoch of augmented batches, fixed by (seed, epoch).

  Has what their `train` reads of a DataLoader: iteration over
  `(images, targets)`, `len()`, `.dataset` and `.batch_size`.
  """

  def __init__(self, images, labels, batch_size, seed, epoch):
    import torch  # pylint: disable=g-import-not-at-top
    self._torch = torch
    self.dataset = labels
    self.batch_size = batch_size
    self._images, self._labels = images, labels
    self._rng = np.random.RandomState([seed, epoch, 7])

  def __len__(self):
    return math.ceil(len(self._labels) / self.batch_size)

  def __iter__(self):
    n, b = len(self._labels), self.batch_size
    order = self._rng.permutation(n)
    dy = self._rng.randint(0, 9, n)
    dx = self._rng.randint(0, 9, n)
    flip = self._rng.rand(n) < 0.5
    padded = pad4(self._images)
    for i in range(0, n, b):
      idx = order[i:i + b]
      crops = crop_flip(padded, idx, dy[idx], dx[idx], flip[idx])
      yield (to_tensor(self._torch, crops),
             self._torch.as_tensor(self._labels[idx].astype(np.int64)))


def to_tensor(torch, images):
  """uint8 NHWC -> their normalised float32 NCHW tensor."""
  x = (images.astype(np.float32) / 255.0 - MEAN) / STD
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def evaluate(torch, model, classifier, etf, images, labels, groups, k,
             device="cpu"):
  """Top-1/5, per-class and group accuracy (%) on a whole split."""
  model.eval()
  classifier.eval()
  preds, top5 = [], []
  with torch.no_grad():
    for i in range(0, len(labels), 500):
      x = to_tensor(torch, images[i:i + 500]).to(device)
      feat = classifier(model(x))
      out = feat @ classifier.ori_M if etf else feat
      preds.append(out.argmax(1).cpu().numpy())
      top5.append(out.topk(5, 1).indices.cpu().numpy())
  pred = np.concatenate(preds)
  hit5 = (np.concatenate(top5) == labels[:, None]).any(1)
  per_class = [100.0 * float(np.mean(pred[labels == c] == c))
               for c in range(k)]
  out = {"top1": 100.0 * float(np.mean(pred == labels)),
         "top5": 100.0 * float(hit5.mean()), "per_class": per_class}
  for name, (a, b) in groups.items():
    out[name] = float(np.mean(per_class[a:b]))
  return out


def _checkout_commit(path: pathlib.Path) -> str | None:
  """The commit of the authors' checkout, or None when it is no git clone."""
  try:
    out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"],
                         capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def _epoch_of(line: str) -> int | None:
  """The epoch of a metrics.jsonl record; None for a partial line (a stop
  mid-write)."""
  try:
    return int(json.loads(line)["epoch"])
  except (ValueError, KeyError, TypeError):
    return None


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reference", required=True, type=pathlib.Path,
                 help="a checkout of NeuralCollapseApplications/"
                 "ImbalancedLearning (imported, never modified)")
  p.add_argument("--data_dir", required=True,
                 help="the data, in any form nc_jax's --config.data_dir "
                 "takes (e.g. cifar-10-python.tar.gz)")
  p.add_argument("--workdir", required=True, type=pathlib.Path,
                 help="where the checkpoint and results go; rerunning the "
                 "same command resumes from it")
  p.add_argument("--method", default="etf_dr", choices=("etf_dr", "ce"),
                 help="their ETF + DR yaml, or their CE yaml (whose "
                 "classifier is frozen: compare with nc_jax's ce_frozen)")
  p.add_argument("--dataset", default="cifar10",
                 choices=("cifar10", "cifar100"))
  p.add_argument("--imb", default="0.01", choices=("0.005", "0.01", "0.02"),
                 help="imbalance ratio: picks their yaml for the cell")
  p.add_argument("--seed", type=int, default=0,
                 help="seeds numpy and torch before the model is built")
  p.add_argument("--epochs", type=int, default=None,
                 help="override their num_epochs (a short check)")
  p.add_argument("--threads", type=int, default=None,
                 help="torch CPU threads (default: torch's choice)")
  args = p.parse_args(argv)

  ref_train, resnet_cifar, config = import_reference(args.reference)
  import torch  # pylint: disable=g-import-not-at-top
  from nc_jax import provenance  # pylint: disable=g-import-not-at-top
  from nc_jax.data import archive, in_memory, sources  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  name = (f"Res_{args.dataset}_imb{args.imb.replace('.', '')}"
          + ("_ETF_DR" if args.method == "etf_dr" else ""))
  yaml = args.reference / "config" / args.dataset / f"{name}.yaml"
  if not yaml.is_file():
    fail(f"{yaml} does not exist: is --reference the authors' repository?")
  config.defrost()
  config.merge_from_file(str(yaml))
  if args.epochs:
    config.num_epochs = args.epochs
  k = int(config.num_classes)

  try:
    root = archive.resolve_data_dir(args.data_dir)
    src = sources.check_data_dir(args.dataset, root)
    sources.check_source(src)
    train = in_memory.load_train_lt(args.dataset, root,
                                    float(config.imb_factor), "exp", 0)
    test = in_memory.load_split(args.dataset, root, "test")
  except (ValueError, FileNotFoundError) as e:
    fail(str(e))
  wd = args.workdir
  wd.mkdir(parents=True, exist_ok=True)
  if not (wd / "config.json").is_file():
    # nc_jax's names for what the reports read (nc-jax-report takes this
    # workdir beside nc_jax's own).
    (wd / "config.json").write_text(json.dumps({
        "program": "the authors' code (benchmarks/reference_run.py)",
        "dataset": args.dataset, "imb_factor": float(config.imb_factor),
        "method": f"{args.method} (authors' code)",
        "backbone": str(config.backbone), "num_seeds": 1,
        "batch_size": int(config.batch_size),
        "num_epochs": float(config.num_epochs), "seed": args.seed,
        "data_dir": args.data_dir,
        "reference_yaml": str(yaml.relative_to(args.reference))}, indent=2))
  logger = logging.getLogger("reference")
  logger.setLevel(logging.INFO)
  logger.propagate = False  # their progress lines go to train.log only
  for h in list(logger.handlers):  # an earlier main() in this process
    logger.removeHandler(h)
    h.close()
  logger.addHandler(logging.FileHandler(wd / "train.log"))
  last = {}
  logger.addHandler(type("Last", (logging.Handler,), {
      "emit": lambda self, r: last.__setitem__("line", r.getMessage())})())

  np.random.seed(args.seed)
  torch.manual_seed(args.seed)
  model = getattr(resnet_cifar, config.backbone)()
  feat = 64 if args.dataset == "cifar10" else 128
  etf = bool(config.ETF_classifier)
  classifier = (resnet_cifar.ETF_Classifier if etf else
                resnet_cifar.Classifier)(feat_in=feat, num_classes=k)
  # Where CUDA is present their train() moves each batch to the GPU, so the
  # model goes there too, as their main() does.
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model.to(device)
  classifier.to(device)
  criterion = (config.criterion if config.reg_dot_loss
               else torch.nn.CrossEntropyLoss())
  optimizer = torch.optim.SGD(
      [{"params": model.parameters()}, {"params": classifier.parameters()}],
      config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
  groups = {"head": tuple(config.head_class_idx),
            "medium": tuple(config.med_class_idx),
            "tail": tuple(config.tail_class_idx)}

  ckpt = wd / "checkpoint.pt"
  run = {"method": args.method, "dataset": args.dataset, "imb": args.imb,
         "seed": args.seed}
  history, start, wall, resumes = [], 0, 0.0, 0
  if ckpt.is_file():
    # weights_only=False: the checkpoint holds numpy RNG state; it is this
    # script's own file.
    c = torch.load(ckpt, weights_only=False, map_location=device)
    if c.get("run", run) != run:  # checkpoints before 2026-11-30 lack it
      fail(f"{wd} holds a run of {c['run']}, not {run}: pass another "
           "--workdir, or that run's options to resume it.")
    model.load_state_dict(c["model"])
    classifier.load_state_dict(c["classifier"])
    if etf:
      classifier.ori_M = c["ori_M"]
    optimizer.load_state_dict(c["optimizer"])
    np.random.set_state(c["np_rng"])
    torch.set_rng_state(c["torch_rng"].cpu())
    if c.get("cuda_rng") is not None and torch.cuda.is_available():
      torch.cuda.set_rng_state_all([t.cpu() for t in c["cuda_rng"]])
    history, start, wall = c["history"], c["epoch"], c["wall_s"]
    resumes = c["resumes"] + 1
    print(f"resumed after epoch {start} from {ckpt}", flush=True)

  mpath = wd / "metrics.jsonl"
  if mpath.is_file():
    # A stop between an epoch's records and its checkpoint leaves records
    # of an epoch that is trained again: keep each epoch once.
    keep = [l for l in mpath.read_text().splitlines()
            if _epoch_of(l) is not None and _epoch_of(l) <= start]
    mpath.write_text("".join(l + "\n" for l in keep))
  mlog = open(mpath, "a")  # pylint: disable=consider-using-with
  steps_per_epoch = len(EpochLoader(train.images, train.labels, 128, 0, 0))
  for epoch in range(start, int(config.num_epochs)):
    t0 = time.time()
    ref_train.adjust_learning_rate(optimizer, epoch, config)
    loader = EpochLoader(train.images, train.labels,
                         int(config.batch_size), args.seed, epoch)
    ref_train.train(loader, model, classifier, criterion, optimizer, epoch,
                    config, logger, None)
    t1 = time.time()
    ev = evaluate(torch, model, classifier, etf, test.images,
                  np.asarray(test.labels), groups, k, device)
    t2 = time.time()
    wall += t2 - t0
    m = re.search(r"Loss\s+\S+\s+\(\s*([-\d.e]+)\)", last.get("line", ""))
    step = (epoch + 1) * steps_per_epoch
    mlog.write(json.dumps({
        "step": step, "kind": "train", "epoch": epoch + 1,
        "lr": optimizer.param_groups[0]["lr"],
        "loss": float(m.group(1)) if m else None,
        "images_per_sec": len(train.labels) / (t1 - t0)}) + "\n")
    mlog.write(json.dumps({"step": step, "kind": "eval", "split": "test",
                           "epoch": epoch + 1, "eval_seconds": t2 - t1,
                           **ev}) + "\n")
    mlog.flush()
    history.append({"epoch": float(epoch + 1), "step": step, **ev})
    print(f"epoch {epoch + 1}/{config.num_epochs}: top1 {ev['top1']:.2f} "
          f"(head {ev['head']:.2f} / medium {ev['medium']:.2f} / tail "
          f"{ev['tail']:.2f}) train {t1 - t0:.0f}s eval {t2 - t1:.1f}s",
          flush=True)
    state = {"run": run, "epoch": epoch + 1, "model": model.state_dict(),
             "classifier": classifier.state_dict(),
             "ori_M": classifier.ori_M if etf else None,
             "optimizer": optimizer.state_dict(),
             "np_rng": np.random.get_state(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": (torch.cuda.get_rng_state_all()
                          if torch.cuda.is_available() else None),
             "history": history,
             "wall_s": wall, "resumes": resumes}
    torch.save(state, wd / "checkpoint.pt.tmp")
    os.replace(wd / "checkpoint.pt.tmp", ckpt)

  mlog.close()
  best = max(history, key=lambda h: h["top1"])
  results = {
      "program": "the authors' code (benchmarks/reference_run.py)",
      "config": {"reference_yaml": str(yaml.relative_to(args.reference)),
                 **{k_: v for k_, v in config.items()
                    if isinstance(v, (int, float, str, bool, list))},
                 "seed": args.seed, "data_dir": args.data_dir},
      "train_counts": list(train.counts),
      "num_train_examples": int(train.labels.size),
      "class_groups": {
          "note": "the reference yaml's head/med/tail_class_idx ranges",
          **{g: list(range(a, b)) for g, (a, b) in groups.items()}},
      "final": {**history[-1]}, "best": {**best}, "history": history,
      "provenance": {
          "versions": {"torch": torch.__version__,
                       "numpy": np.__version__},
          "command": provenance.command(),
          "commit": provenance.git_commit(),
          "reference_commit": _checkout_commit(args.reference),
          "python": platform.python_version(), "host": platform.node(),
          "machine": platform.machine(),
          "device": ("cuda" if torch.cuda.is_available() else "cpu"),
          "threads": torch.get_num_threads(), "wall_s": round(wall, 1),
          "resumes": resumes}}
  (wd / "results.json").write_text(json.dumps(results, indent=2))
  print(f"done: final top1 {history[-1]['top1']:.2f}, best "
        f"{best['top1']:.2f} at epoch {best['epoch']:.0f}; "
        f"{wd / 'results.json'}", flush=True)


if __name__ == "__main__":
  main()
