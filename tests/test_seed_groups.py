"""`nc-jax-report` pools the seeds of one experiment, and only those."""

import json
import pathlib

import numpy as np

from nc_jax import run_config
from nc_jax.cli import report

REPO = pathlib.Path(__file__).resolve().parents[1]

BASE = {"dataset": "cifar10", "imb_factor": 0.01, "method": "etf_dr",
        "backbone": "resnet32", "num_seeds": 1, "batch_size": 128,
        "num_epochs": 200.0, "seed": 0, "data_dir": "/data/cifar10",
        "etf_rotation": "uniform01", "crop_min_area": 0.08,
        "log_every_steps": 20,
        "optim": {"lr": 0.1, "fit_to_run": []}}


def _block(top1: float) -> dict:
  return {"top1": top1, "head": top1 + 10, "medium": top1, "tail": top1 - 10,
          "per_class": [top1 + 10, top1 - 10], "epoch": 200.0}


def _run(root: pathlib.Path, name: str, *, final: float, best: float,
         per_seed: list[tuple[float, float]] | None = None, finished=True,
         **fields) -> str:
  """A workdir as a run leaves it: config.json, metrics.jsonl and, when
  `finished`, results.json (with `per_seed`: a vmapped run's)."""
  wd = root / name
  wd.mkdir()
  config = json.loads(json.dumps(BASE))
  for k, v in fields.items():
    if k.startswith("optim_"):
      config["optim"][k[len("optim_"):]] = v
    elif v is None:
      config.pop(k)
    else:
      config[k] = v
  (wd / "config.json").write_text(json.dumps(config))
  (wd / "metrics.jsonl").write_text(
      json.dumps({"step": 1, "kind": "eval", "top1": final}) + "\n")
  if finished:
    res = {"config": config, "train_counts": [10, 1],
           "num_train_examples": 11, "final": _block(final),
           "best": _block(best)}
    if per_seed:
      res["per_seed"] = [{"final": _block(f), "best": _block(b)}
                         for f, b in per_seed]
    (wd / "results.json").write_text(json.dumps(res))
  return str(wd)


def test_seeds_pool_and_other_recipes_stay_apart(tmp_path):
  dirs = [
      _run(tmp_path, "s0", final=70.0, best=71.0),
      _run(tmp_path, "s1", final=72.0, best=72.5, seed=1,
           log_every_steps=50, conv_impl="xla",  # how it ran, not what
           data_dir="/elsewhere/cifar10/"),  # the same data, moved
      # Written before etf_rotation was a field: it ran the Gaussian draw.
      _run(tmp_path, "old", final=60.0, best=61.0, etf_rotation=None),
      # Written before crop_min_area was a field: it ran with 0.08.
      _run(tmp_path, "older", final=73.0, best=74.0, seed=4,
           crop_min_area=None),
      _run(tmp_path, "lr", final=50.0, best=51.0, seed=2, optim_lr=0.2),
      _run(tmp_path, "jpeg", final=40.0, best=41.0, seed=3,
           data_dir="/data/cifar10_jpeg"),
      _run(tmp_path, "vmap", final=0.0, best=0.0, seed=5, num_seeds=2,
           per_seed=[(74.0, 75.0), (76.0, 76.5)]),
      _run(tmp_path, "again", final=99.0, best=99.0, seed=1),  # a repeat
      _run(tmp_path, "half", final=10.0, best=10.0, seed=7, finished=False),
  ]
  runs = [report.load_run(d) for d in dirs]
  groups = {tuple(g["runs"]): g for g in report.seed_groups(runs)}
  pooled = ("s0", "s1", "older", "vmap", "again")
  assert set(groups) == {pooled, ("old",), ("lr",), ("jpeg",)}
  g = groups[pooled]
  assert g["seeds"] == ["0", "1", "4", "5/0", "5/1"]
  assert g["repeats"] == ["seed 1 in again"]
  final = np.array([70.0, 72.0, 73.0, 74.0, 76.0])
  best = np.array([71.0, 72.5, 74.0, 75.0, 76.5])
  text = report.seeds_table(runs)
  assert (f"| s0, s1, older, vmap, again | cifar10 | 0.01 | etf_dr | "
          f"0, 1, 4, 5/0, 5/1 "
          f"| {final.mean():.3f} ± {final.std(ddof=1):.2f} (70.00-76.00) "
          f"| {best.mean():.3f} ± {best.std(ddof=1):.2f} (71.00-76.50) |"
          in text), text
  assert "- seed 1 in again: a repeat, left out" in text
  # Groups of one seed have no row.
  assert "| old |" not in text and "| lr |" not in text

  report.write_report(dirs, tmp_path / "out")
  md = (tmp_path / "out" / "report.md").read_text()
  assert md.index("half: unfinished") < md.index("## Seeds pooled")


def test_no_pooled_table_without_two_seeds(tmp_path):
  runs = [report.load_run(_run(tmp_path, "a", final=1.0, best=2.0)),
          report.load_run(_run(tmp_path, "b", final=1.0, best=2.0,
                               method="ce"))]
  assert report.seeds_table(runs) is None


def test_recipe_keeps_what_is_computed():
  a = run_config.recipe_of({**BASE, "resolved": {"conv_impl": "xla"}})
  assert "seed" not in a and "num_seeds" not in a and "resolved" not in a
  assert "log_every_steps" not in a
  assert a["data_dir"] == "cifar10" and a["optim.lr"] == 0.1
  assert a["etf_rotation"] == "uniform01"
  # A field the config predates means what it ran with.
  assert run_config.recipe_of(
      {k: v for k, v in BASE.items() if k != "etf_rotation"}
  )["etf_rotation"] == "gaussian"


def test_a_learnt_classifier_ignores_the_etf_fields(tmp_path):
  """CE written before etf_rotation was a field (it meant the Gaussian
  draw, which CE never used) pools with CE written after; ETF + DR does
  not."""
  for method, pooled in (("ce", True), ("etf_dr", False)):
    runs = [report.load_run(_run(tmp_path, f"{method}{s}", final=70.0 + s,
                                 best=71.0 + s, seed=s, method=method,
                                 etf_rotation=rot))
            for s, rot in ((0, None), (1, "uniform01"))]
    assert len(report.seed_groups(runs)) == (1 if pooled else 2), method


def test_the_committed_r001_seeds():
  """The README's 77.045: the two Gaussian-draw seeds pooled, apart from
  the `uniform01` run and the authors' code."""
  root = REPO / "results" / "cifar10_lt_r0.01_original_pixels"
  runs = [report.load_run(root / n) for n in
          ("etf_dr", "etf_dr_seed1", "etf_dr_uniform01",
           "authors_code_etf_dr")]
  groups = report.seed_groups(runs)
  assert [g["runs"] for g in groups] == [
      ["etf_dr", "etf_dr_seed1"], ["etf_dr_uniform01"],
      ["authors_code_etf_dr"]]
  best = [b["top1"] for b in groups[0]["best"]]
  assert round(float(np.mean(best)), 3) == 77.045
