"""experiments.report on two real (tiny) runs."""


import numpy as np
import pytest
from PIL import Image

from experiments import report
from nc_jax import train
from tests.test_train import tiny_config


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
