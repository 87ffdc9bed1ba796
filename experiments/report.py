r"""Figures and a comparison table for finished (or running) training runs.

    python -m experiments.report --workdir runs/etf_dr --workdir runs/ce \
        --out runs/report

Reads each workdir's `results.json` (if finished) and `metrics.jsonl`, and
writes into --out:
  per_class_accuracy.png  final per-class test accuracy against train count
  learning_curves.png     test top-1 over epochs and training loss over steps
  nc_metrics.png          neural-collapse statistics over training (when the
                          runs logged them, config.nc_metrics=True)
  report.md               a markdown table comparing the runs
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from absl import app
from absl import flags

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Run directories.")
_OUT = flags.DEFINE_string("out", "report", "Output directory.")
flags.mark_flag_as_required("workdir")

NC_KEYS = ("nc1", "cos_mean_h", "self_duality", "minority_cos_w",
           "minority_cos_h", "norm_spread_h")


def load_run(workdir: str | pathlib.Path) -> dict[str, Any]:
  """Reads a run directory into {name, config, results, train, eval}."""
  wd = pathlib.Path(workdir)
  if not wd.is_dir():
    raise FileNotFoundError(f"--workdir {wd} does not exist.")
  cfg_path, res_path, met_path = (wd / "config.json", wd / "results.json",
                                  wd / "metrics.jsonl")
  if not cfg_path.exists():
    raise FileNotFoundError(
        f"{wd} has no config.json: it is not a run directory of "
        "experiments.cifar_lt.")
  records = []
  if met_path.exists():
    records = [json.loads(l) for l in met_path.read_text().splitlines() if l]
  return {
      "name": wd.name,
      "config": json.loads(cfg_path.read_text()),
      "results": json.loads(res_path.read_text()) if res_path.exists() else None,
      "train": [r for r in records if r["kind"] == "train"],
      "eval": [r for r in records if r["kind"] == "eval"],
  }


def _fmt(block: dict | None, std: dict | None, key: str) -> str:
  if not block or block.get(key) is None:
    return "-"
  s = f"{block[key]:.2f}"
  if std and std.get(key) is not None:
    s += f" ± {std[key]:.2f}"
  return s


def table(runs: list[dict]) -> str:
  """Markdown table: one row per run (mean ± std over seeds)."""
  head = ("| run | dataset | r | method | backbone | seeds | final top-1 | "
          "head | medium | tail | ECE | best top-1 |")
  rows = [head, "|" + "---|" * 12]
  for run in runs:
    c, res = run["config"], run["results"]
    fin = res["final"] if res else None
    fstd = res.get("final_std") if res else None
    best = res["best"] if res else None
    bstd = res.get("best_std") if res else None
    status = "" if res else " (unfinished)"
    rows.append(
        f"| {run['name']}{status} | {c['dataset']} | {c['imb_factor']} | "
        f"{c['method']} | {c['backbone']} | {c.get('num_seeds', 1)} | "
        f"{_fmt(fin, fstd, 'top1')} | {_fmt(fin, fstd, 'head')} | "
        f"{_fmt(fin, fstd, 'medium')} | {_fmt(fin, fstd, 'tail')} | "
        f"{_fmt(fin, fstd, 'ece')} | {_fmt(best, bstd, 'top1')} |")
  return "\n".join(rows) + "\n"


def plot_per_class(runs: list[dict], path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for run in runs:
    res = run["results"]
    if not res:
      continue
    counts, acc = res["train_counts"], res["final"]["per_class"]
    pts = sorted((n, a) for n, a in zip(counts, acc) if a is not None)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=run["name"])
  ax.set_xscale("log")
  ax.set_xlabel("training images in the class")
  ax.set_ylabel("final test accuracy of the class (%)")
  ax.set_title("Per-class accuracy against class size")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(runs: list[dict], path: pathlib.Path) -> None:
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  for run in runs:
    ev = [r for r in run["eval"] if "top1" in r]
    if ev:
      spe = _steps_per_epoch(run)
      a1.plot([r["step"] / spe for r in ev], [r["top1"] for r in ev], "o-",
              label=run["name"])
    tr = run["train"]
    if tr:
      a2.plot([r["step"] for r in tr], [r["loss"] for r in tr],
              label=run["name"], alpha=0.8)
  a1.set_xlabel("epoch")
  a1.set_ylabel("test top-1 (%)")
  a1.set_title("Test accuracy")
  a2.set_xlabel("step")
  a2.set_ylabel("training loss")
  a2.set_yscale("log")
  a2.set_title("Training loss (each method's own loss)")
  for a in (a1, a2):
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _steps_per_epoch(run: dict) -> float:
  res = run["results"]
  c = run["config"]
  if res:
    return max(res["num_train_examples"] // c["batch_size"], 1)
  return 1.0


def plot_nc(runs: list[dict], path: pathlib.Path) -> bool:
  """NC statistics over training; False when no run logged them."""
  keys = [k for k in NC_KEYS
          if any(f"nc_test/{k}" in r for run in runs for r in run["eval"])]
  if not keys:
    return False
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4))
  axes = [axes] if len(keys) == 1 else axes
  for ax, key in zip(axes, keys):
    for run in runs:
      for split, style in (("test", "o-"), ("train", "s--")):
        pts = [(r["step"], r[f"nc_{split}/{key}"]) for r in run["eval"]
               if f"nc_{split}/{key}" in r]
        if pts:
          ax.plot(*zip(*pts), style, label=f"{run['name']} ({split})")
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write_report(workdirs: list[str], out: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes the figures and report.md; returns the paths written."""
  runs = [load_run(w) for w in workdirs]
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  plot_per_class(runs, out / "per_class_accuracy.png")
  plot_curves(runs, out / "learning_curves.png")
  written += [out / "per_class_accuracy.png", out / "learning_curves.png"]
  if plot_nc(runs, out / "nc_metrics.png"):
    written.append(out / "nc_metrics.png")
  md = ["# Run comparison", "", table(runs)]
  md += [f"![{p.stem}]({p.name})" for p in written]
  (out / "report.md").write_text("\n".join(md) + "\n")
  written.append(out / "report.md")
  return written


def main(argv: list[str]) -> None:
  del argv
  for p in write_report(_WORKDIRS.value, _OUT.value):
    print(f"wrote {p}")
  print((pathlib.Path(_OUT.value) / "report.md").read_text())


if __name__ == "__main__":
  app.run(main)
