"""nc-jax-paper-table (`nc_jax.cli.paper_table`): cells, configs, the table, and its errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from nc_jax.cli import paper_table as pt
from nc_jax.configs import cifar_lt as cfg_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cells_rows_and_presets():
  assert pt.parse_cells("cifar10") == [
      f"cifar10_r{r}_{m}" for r in ("0.005", "0.01", "0.02")
      for m in ("ce", "etf_dr")]
  assert pt.parse_cells("cifar10_r0.01_etf_dr,cifar10,imagenet_lt_ce")[:2] == [
      "cifar10_r0.01_etf_dr", "cifar10_r0.005_ce"]
  assert "svhn_r0.02_ce_densenet" in pt.parse_cells("svhn_r0.02_ce_densenet")
  with pytest.raises(pt.UsageError, match="Did you mean 'cifar10_r0.01_etf_dr'"
                     ".*Valid cells"):
    pt.parse_cells("cifar10_r0.01_etfdr")


def test_cell_config_seeds_length_and_data_dir():
  c = pt.cell_config("cifar100_r0.02_ce", seeds=3, epochs=2, steps=None,
                     data_dir="/d")
  assert (c.dataset, c.imb_factor, c.method, c.num_seeds) == (
      "cifar100", 0.02, "ce", 3)
  assert (c.num_epochs, c.num_steps, c.data_dir) == (2.0, None, "/d")
  c = pt.cell_config("cifar10_r0.01_etf_dr", seeds=1, epochs=None, steps=7,
                     data_dir=None)
  assert (c.num_epochs, c.num_steps) == (None, 7)
  with pytest.raises(pt.UsageError, match="not both"):
    pt.cell_config("cifar10_r0.01_etf_dr", seeds=1, epochs=1, steps=1,
                   data_dir=None)
  with pytest.raises(AttributeError):
    c.num_seed = 2  # locked


def _fake_result(root, cell, top1s, epochs, steps=None):
  """A results.json as training writes it, for len(top1s) seeds."""
  c = cfg_lib.get_config(cell).to_dict()
  c["num_epochs"], c["num_steps"] = epochs, steps
  block = lambda t: {"top1": t, "head": t + 10, "medium": t, "tail": t - 10,
                     "epoch": epochs}
  per = [{"final": block(t), "best": dict(block(t + 1), epoch=epochs - 1)}
         for t in top1s]
  mean = sum(top1s) / len(top1s)
  std = (sum((t - mean) ** 2 for t in top1s) / len(top1s)) ** 0.5
  res = {"config": c, "num_seeds": len(top1s), "num_train_examples": 12406,
         "final": block(mean), "best": dict(block(mean + 1), epoch=epochs - 1),
         "final_std": {"top1": std}, "best_std": {"top1": std},
         "per_seed": per, "provenance": {"wall_s": 12.0}}
  (root / cell).mkdir(parents=True)
  (root / cell / "results.json").write_text(json.dumps(res))


def test_table_full_and_short_budget(tmp_path):
  _fake_result(tmp_path, "cifar10_r0.01_etf_dr", [78.0, 79.0], 200.0)
  table = pt.write_tables(tmp_path, ["cifar10_r0.01_etf_dr",
                                     "cifar10_r0.01_ce"])
  rows = {r["cell"]: r for r in table["rows"]}
  done = rows["cifar10_r0.01_etf_dr"]
  assert done["seeds"] == 2 and done["final_top1"] == 78.5
  assert done["paper_top1"] == 78.5 and done["final_minus_paper"] == 0.0
  assert abs(done["final_top1_std"] - 0.5) < 1e-9
  assert rows["cifar10_r0.01_ce"]["status"] == "missing"
  assert not table["short_budget"]
  md = (tmp_path / "paper_table.md").read_text()
  assert "78.50 ± 0.50" in md and "not run yet" in md
  assert "Short budget" not in md
  assert json.loads((tmp_path / "paper_table.json").read_text()) == table

  short = tmp_path / "short"
  _fake_result(short, "cifar10_r0.01_ce", [40.0], 3.0)
  table = pt.write_tables(short, ["cifar10_r0.01_ce"])
  assert table["short_budget"]
  assert (short / "paper_table.md").read_text().startswith("**Short budget**")


@pytest.mark.parametrize("args, message", [
    (["--cells", "cifar10_r0.01_etfdr"], "Unknown cell"),
    (["--cells", "cifar10_r0.01_etf_dr", "--epochs", "1", "--steps", "2"],
     "not both"),
])
def test_cli_errors_before_any_work(tmp_path, args, message):
  out = subprocess.run(
      [sys.executable, "-m", "nc_jax.cli.paper_table", "--root",
       str(tmp_path / "root"), *args],
      capture_output=True, text=True, timeout=120, cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 2, out.stderr
  assert message in out.stderr and "Traceback" not in out.stderr
  assert not (tmp_path / "root").exists()


def _paper_table(tmp_path, *args):
  return subprocess.run(
      [sys.executable, "-m", "nc_jax.cli.paper_table", *map(str, args)],
      capture_output=True, text=True, timeout=120, cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=str(REPO)))


def _one_error(out) -> str:
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, out.stderr
  return errors[0]


def test_cli_errors_name_the_cell_and_this_commands_flags(
    tiny_image_folder, tmp_path):
  """The cell at fault is named (not the first), and the fix in this
  command's flags: --data_dir, --root."""
  error = _one_error(_paper_table(
      tmp_path, "--root", tmp_path / "root", "--cells",
      "cifar10_r0.01_etf_dr,cifar100_r0.01_etf_dr", "--steps", "2",
      "--data_dir", tmp_path / "nowhere"))
  assert error.startswith("error: cell cifar10_r0.01_etf_dr: data_dir ")
  assert "--config.data_dir" not in error and "--data_dir=" in error
  error = _one_error(_paper_table(
      tmp_path, "--root", tmp_path / "root", "--cells",
      "cifar10_r0.01_etf_dr,cifar100_r0.01_etf_dr", "--steps", "2",
      "--data_dir", tiny_image_folder))
  assert error.startswith("error: cell cifar100_r0.01_etf_dr: "), error
  (tmp_path / "afile").write_text("x")
  error = _one_error(_paper_table(
      tmp_path, "--root", tmp_path / "afile" / "r", "--cells",
      "cifar10_r0.01_etf_dr", "--steps", "2"))
  assert "--root" in error and "afile is a file" in error, error
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
