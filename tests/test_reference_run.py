"""`benchmarks/reference_run.py`: its checkpoint, resume and records.

The script imports the authors' checkout, which CI does not have. Here it
imports a stand-in written by the test with the same names and call
signatures (their `train.train`, `train.adjust_learning_rate`,
`models.resnet_cifar`, `utils.config`, a yaml per cell), tiny enough that
an epoch takes a fraction of a second, and drawing from both numpy's and
torch's random streams, as their mixup and ETF do. What is pinned is the
script's own behaviour: an interrupted run resumes to the numbers of an
uninterrupted one, each epoch is recorded once, and a workdir of another
run is refused.
"""

from __future__ import annotations

import json
import pathlib
import sys
import textwrap

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import reference_run  # pylint: disable=g-import-not-at-top,wrong-import-position

# The top-level names the authors' code (and so the stand-in) brings in.
THEIR_MODULES = ("train", "methods", "models", "utils", "datasets")

FILES = {
    "methods.py": "",
    "models/__init__.py": "",
    "models/resnet_cifar.py": """
        import os

        import torch

        class resnet32_fe(torch.nn.Module):
          def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 64)

          def forward(self, x):
            return self.fc(x.mean((2, 3)))

        class ETF_Classifier(torch.nn.Module):
          def __init__(self, feat_in, num_classes):
            super().__init__()
            # Not fixed by --seed: the test changes it between a stop and
            # the resume, so only the checkpoint can restore the ETF.
            g = torch.Generator().manual_seed(int(os.environ["ETF_DRAW"]))
            q, _ = torch.linalg.qr(torch.rand(feat_in, num_classes,
                                              generator=g))
            self.ori_M = q
            self.BN_H = torch.nn.BatchNorm1d(feat_in)

          def forward(self, x):
            return self.BN_H(x)

        class Classifier(torch.nn.Module):
          def __init__(self, feat_in, num_classes):
            super().__init__()
            self.fc = torch.nn.Linear(feat_in, num_classes)

          def forward(self, x):
            return self.fc(x)
        """,
    "utils/__init__.py": """
        from yacs.config import CfgNode
        config = CfgNode(new_allowed=True)
        """,
    "utils/logger.py": "",
    "train.py": """
        import numpy as np
        import torch

        def adjust_learning_rate(optimizer, epoch, config):
          for group in optimizer.param_groups:
            group["lr"] = config.lr / (epoch + 1)

        def train(loader, model, classifier, criterion, optimizer, epoch,
                  config, logger, block):
          model.train()
          classifier.train()
          total = 0.0
          for i, (images, target) in enumerate(loader):
            lam = np.random.beta(1.0, 1.0)
            perm = torch.randperm(images.shape[0])
            mixed = lam * images + (1 - lam) * images[perm]
            logits = classifier(model(mixed)) @ classifier.ori_M
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            logger.info(f"Epoch: [{epoch}] Loss {loss.item():.3f} "
                        f"({total / (i + 1):.3f})")
        """,
    "config/cifar10/Res_cifar10_imb001_ETF_DR.yaml": """
        num_classes: 10
        imb_factor: 0.1
        backbone: resnet32_fe
        ETF_classifier: true
        reg_dot_loss: false
        criterion: ce
        lr: 0.05
        momentum: 0.9
        weight_decay: 0.0005
        batch_size: 32
        num_epochs: 3
        head_class_idx: [0, 3]
        med_class_idx: [3, 7]
        tail_class_idx: [7, 10]
        """,
}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("reference_checkout")
  for name, text in FILES.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(textwrap.dedent(text))
  return root


@pytest.fixture
def run(checkout, tiny_image_folder, monkeypatch, capsys):
  """Calls the script's main() here, in this process (no second start-up
  of torch and TensorFlow); returns (exit code, stdout, stderr). Their
  modules, the search path and the `.cuda` no-ops are undone afterwards."""
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.setattr(torch.Tensor, "cuda", torch.Tensor.cuda)
  monkeypatch.setattr(torch.nn.Module, "cuda", torch.nn.Module.cuda)

  def call(workdir, *extra, etf_draw=0):
    monkeypatch.setenv("ETF_DRAW", str(etf_draw))
    capsys.readouterr()
    try:
      reference_run.main(
          ["--reference", str(checkout), "--data_dir", str(tiny_image_folder),
           "--workdir", str(workdir), "--threads", "1", *extra])
      code = 0
    except SystemExit as e:
      code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err

  yield call
  for name in list(sys.modules):
    if name.split(".")[0] in THEIR_MODULES:
      del sys.modules[name]


def _records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(l) for l in lines]


def test_resume_equals_uninterrupted_and_records_each_epoch_once(run,
                                                                 tmp_path):
  code, _, err = run(tmp_path / "full")
  assert code == 0, err
  # Stopped after epoch 1's checkpoint, with epoch 2's records already
  # written (a stop between them): the rerun trains epoch 2 again.
  code, _, err = run(tmp_path / "part", "--epochs", "1")
  assert code == 0, err
  with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 0, "kind": "train", "epoch": 2}) + "\n")
    f.write('{"step": 0, "kind": "ev')  # and a line cut short
  code, out, err = run(tmp_path / "part", etf_draw=1)
  assert code == 0, err
  assert "resumed after epoch 1" in out

  a = json.loads((tmp_path / "full" / "results.json").read_text())
  b = json.loads((tmp_path / "part" / "results.json").read_text())
  assert len(a["history"]) == 3
  assert b["history"] == a["history"]
  assert b["final"] == a["final"] and b["best"] == a["best"]
  assert b["provenance"]["resumes"] == 1 and a["provenance"]["resumes"] == 0
  assert a["provenance"]["reference_commit"] is None  # not a git clone
  assert a["train_counts"] == [int(40 * 0.1**(c / 9)) for c in range(10)]
  assert set(a["final"]) >= {"top1", "top5", "per_class", "head", "tail"}
  recs = _records(tmp_path / "part")
  assert [(r["kind"], r["epoch"]) for r in recs] == [
      (k, e) for e in (1, 2, 3) for k in ("train", "eval")]
  full_evals = [r for r in _records(tmp_path / "full") if r["kind"] == "eval"]
  assert ([r["per_class"] for r in recs if r["kind"] == "eval"]
          == [r["per_class"] for r in full_evals])
  # nc-jax-report takes the workdir beside nc_jax's own.
  from nc_jax.cli import report  # pylint: disable=g-import-not-at-top
  written = {p.name for p in report.write_report(
      [tmp_path / "full", tmp_path / "part"], tmp_path / "report")}
  assert {"learning_curves.png", "per_class_accuracy.png"} <= written
  assert "| full | cifar10 | 0.1 | etf_dr (authors' code) | resnet32_fe |" in (
      tmp_path / "report" / "report.md").read_text()
  # Their progress lines go to each run's own log, and only there.
  logs = [(tmp_path / d / "train.log").read_text() for d in ("full", "part")]
  assert logs[0].count("Epoch: [0]") == logs[1].count("Epoch: [0]") == 5


def test_a_workdir_of_another_run_is_refused(run, tmp_path):
  code, _, err = run(tmp_path, "--epochs", "1")
  assert code == 0, err
  before = (tmp_path / "checkpoint.pt").read_bytes()
  code, _, err = run(tmp_path, "--seed", "1")
  assert code == 2
  assert "pass another --workdir" in err and "Traceback" not in err
  assert (tmp_path / "checkpoint.pt").read_bytes() == before
