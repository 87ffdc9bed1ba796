"""nc-jax-report (`nc_jax.cli.report`) on two real (tiny) runs, unfinished runs, mistakes."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nc_jax.cli import report
from nc_jax import train
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow  # trains runs to report on

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_report_writes_figures_and_table(tiny_image_folder, tmp_path):
  runs = []
  for method in ("etf_dr", "ce"):
    wd = tmp_path / method
    config = tiny_config(tiny_image_folder, arg=f"steps=4,method={method}",
                         eval_every_steps=2, eval_every_epochs=None,
                         nc_metrics=True)
    train.train_and_evaluate(config, wd)
    runs.append(str(wd))
  written = report.write_report(runs, tmp_path / "report")
  names = {p.name for p in written}
  assert {"per_class_accuracy.png", "learning_curves.png", "nc_metrics.png",
          "report.md"} <= names
  for p in written:
    assert p.stat().st_size > 0
    if p.suffix == ".png":
      with Image.open(p) as im:
        assert im.size[0] > 300 and im.size[1] > 200
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank canvas
  md = (tmp_path / "report" / "report.md").read_text()
  assert "| etf_dr |" in md and "| ce |" in md


def test_report_rejects_non_run_dirs(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    report.load_run(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="config.json"):
    report.load_run(tmp_path)


def _unfinished_run(wd, *, logged=True):
  """A workdir as a run leaves it before its end (no results.json)."""
  wd.mkdir(parents=True)
  config = {"dataset": "cifar10", "imb_factor": 0.01, "method": "etf_dr",
            "backbone": "resnet32", "num_seeds": 1, "batch_size": 10,
            "num_epochs": 4.0, "num_steps": None}
  (wd / "config.json").write_text(json.dumps(config))
  (wd / "train_subset.json").write_text(json.dumps(
      {"classes": ["a", "b"], "images": [["a/1"] * 60, ["b/1"] * 40]}))
  if logged:
    lines = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in
             range(1, 16)]
    lines.append({"step": 10, "kind": "eval", "top1": 31.0})
    (wd / "metrics.jsonl").write_text(
        "".join(json.dumps(l) + "\n" for l in lines))
  return wd


def test_report_on_an_unfinished_run(tmp_path):
  wd = _unfinished_run(tmp_path / "half")
  written = {p.name for p in report.write_report([wd], tmp_path / "out")}
  # No final numbers yet: no per-class figure, but the curves so far.
  assert written == {"learning_curves.png", "report.md"}
  with Image.open(tmp_path / "out" / "learning_curves.png") as im:
    assert len(np.unique(np.asarray(im.convert("L")))) > 10
  md = (tmp_path / "out" / "report.md").read_text()
  assert "| half (unfinished) |" in md
  assert "half: unfinished (step 15 of 40)" in md  # 100 images / batch 10


def test_runs_with_the_same_folder_name_are_told_apart(tmp_path):
  runs = [_unfinished_run(tmp_path / parent / "etf_dr")
          for parent in ("jpeg", "original")]
  report.write_report(runs, tmp_path / "out")
  md = (tmp_path / "out" / "report.md").read_text()
  assert "| jpeg/etf_dr (unfinished) |" in md
  assert "| original/etf_dr (unfinished) |" in md


def test_a_partial_last_line_is_what_a_live_run_leaves(tmp_path):
  """The last line of metrics.jsonl may be half-written (a run killed
  mid-write, or writing now): it is left out. A damaged line before it,
  or a damaged results.json, is named."""
  wd = _unfinished_run(tmp_path / "half")
  with open(wd / "metrics.jsonl", "a") as f:
    f.write('{"step": 16, "kind": "tr')
  run = report.load_run(wd)
  assert len(run["train"]) == 15 and len(run["eval"]) == 1
  lines = (wd / "metrics.jsonl").read_text().splitlines()
  (wd / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
  with pytest.raises(report.ReportError, match="line 1 is not JSON"):
    report.load_run(wd)
  (wd / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
  (wd / "results.json").write_bytes(b"\x93NUMPY")
  with pytest.raises(report.ReportError, match="results.json is not valid "
                     "JSON"):
    report.load_run(wd)


def test_report_with_nothing_to_show_writes_nothing(tmp_path):
  wd = _unfinished_run(tmp_path / "fresh", logged=False)
  with pytest.raises(report.ReportError, match="nothing to report yet"):
    report.write_report([wd], tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make,fragment", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "has no config.json"),
    (lambda p: _unfinished_run(p, logged=False), "nothing to report yet"),
    (lambda p: (_unfinished_run(p), (p.parent / "out").write_text("x")),
     "--out out is a file"),
])
def test_report_cli_mistakes_are_one_line(tmp_path, make, fragment):
  make(tmp_path / "run")
  out = subprocess.run(
      [sys.executable, "-m", "nc_jax.cli.report", "--workdir", "run",
       "--out", "out"], cwd=tmp_path, capture_output=True, text=True,
      timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and fragment in errors[0], out.stderr[-2000:]
  assert not (tmp_path / "out").is_dir()
