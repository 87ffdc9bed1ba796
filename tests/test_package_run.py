"""`benchmarks/package_run.py`: what it commits and what it refuses.

Input: a committed run folder (results.json, metrics.jsonl, config.json,
train_subset.json), which is what a finished workdir holds besides its
checkpoints. The RUN.md figures must be recomputed from metrics.jsonl, and
a results.json that disagrees with it must stop the packaging.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import package_run  # pylint: disable=g-import-not-at-top,wrong-import-position

RUN = REPO / "results" / "cifar10_lt_r0.005_original_pixels" / "etf_dr"


@pytest.fixture
def workdir(tmp_path):
  w = tmp_path / "c10_run"
  shutil.copytree(RUN, w)
  (w / "RUN.md").unlink()
  (w / "checkpoints").mkdir()  # must not travel
  return w


def test_packages_files_and_recomputed_table(workdir, tmp_path, capsys):
  dest = tmp_path / "out"
  package_run.main([str(workdir), str(dest), "--title", "T", "--paper",
                    "72.9", "--note", "A note."])
  assert sorted(p.name for p in dest.iterdir()) == sorted(
      package_run.FILES + ("RUN.md",))
  text = (dest / "RUN.md").read_text()
  assert "| final | 70.03 | 83.77 | 73.65 | 51.47 | 200 |" in text
  assert "| best (test-selected) | 70.71 | 83.37 | 73.80 | 53.93 | 197 |" in text
  assert "-2.87 final, -2.19 best" in text
  assert "last 40 evaluations: 69.85" in text
  assert "--config.data_dir=cifar-10-python.tar.gz" in text
  assert "/work/" not in text and "A note." in text
  assert "best 70.71 (epoch 197)" in capsys.readouterr().out


def test_refuses_results_that_metrics_do_not_show(workdir, tmp_path, capsys):
  r = json.loads((workdir / "results.json").read_text())
  r["best"]["top1"] = 71.0
  (workdir / "results.json").write_text(json.dumps(r))
  with pytest.raises(SystemExit) as e:
    package_run.main([str(workdir), str(tmp_path / "out"), "--title", "T"])
  assert e.value.code == 2
  assert "results.json's best" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_refuses_a_step_evaluated_twice(workdir, tmp_path, capsys):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  ev = next(l for l in lines if '"eval"' in l)
  (workdir / "metrics.jsonl").write_text("\n".join(lines + [ev]) + "\n")
  with pytest.raises(SystemExit):
    package_run.main([str(workdir), str(tmp_path / "out"), "--title", "T"])
  assert "more than once" in capsys.readouterr().err


def test_refuses_an_unfinished_run(workdir, tmp_path, capsys):
  (workdir / "results.json").unlink()
  with pytest.raises(SystemExit):
    package_run.main([str(workdir), str(tmp_path / "out"), "--title", "T"])
  assert "has not finished" in capsys.readouterr().err


REF_RUN = (REPO / "results" / "cifar10_lt_r0.01_original_pixels" /
           "authors_code_ce")


@pytest.fixture
def reference_workdir(tmp_path):
  w = tmp_path / "ref_run"
  shutil.copytree(REF_RUN, w)
  (w / "RUN.md").unlink()
  (w / "checkpoint.pt").write_bytes(b"")  # must not travel
  return w


def test_packages_a_run_of_the_authors_code(reference_workdir, tmp_path):
  dest = tmp_path / "out"
  r = json.loads((reference_workdir / "results.json").read_text())
  r["provenance"]["device"] = "cuda"
  (reference_workdir / "results.json").write_text(json.dumps(r))
  # A run on a GPU: this machine's CPU is not its machine, so it is named.
  with pytest.raises(SystemExit):
    package_run.main([str(reference_workdir), str(dest), "--title", "T"])
  assert not dest.exists()
  package_run.main([str(reference_workdir), str(dest), "--title", "T",
                    "--machine", "an H100", "--paper", "70.4"])
  assert sorted(p.name for p in dest.iterdir()) == sorted(
      package_run.REFERENCE_FILES + ("RUN.md",))
  text = (dest / "RUN.md").read_text()
  assert ("PYTHONPATH=. python benchmarks/reference_run.py --reference "
          "ref-ImbalancedLearning --data_dir cifar-10-python.tar.gz") in text
  assert "ImbalancedLearning at 2ebb309dddcd0ac8b18222fd06357099260bc169" in text
  assert "`config/cifar10/Res_cifar10_imb001.yaml`" in text
  assert "| final | 72.40 | 94.97 | 73.45 | 48.43 | 200 |" in text
  assert "| best (test-selected) | 74.05 | 94.40 | 74.25 | 53.43 | 174 |" in text
  assert "Machine: an H100." in text and "/work/" not in text


def test_refuses_results_without_their_command(reference_workdir, tmp_path,
                                               capsys):
  r = json.loads((reference_workdir / "results.json").read_text())
  del r["provenance"]["command"]
  (reference_workdir / "results.json").write_text(json.dumps(r))
  with pytest.raises(SystemExit):
    package_run.main([str(reference_workdir), str(tmp_path / "out"),
                      "--title", "T", "--machine", "m"])
  assert "no provenance.command" in capsys.readouterr().err
