r"""Figures and a comparison table for finished (or running) training runs.

    nc-jax-report --workdir runs/etf_dr --workdir runs/ce --out runs/report

(or `python -m nc_jax.cli.report ...`). Reads each workdir's `results.json`
(if finished) and `metrics.jsonl`, and writes into --out:
  per_class_accuracy.png  final per-class test accuracy against train count
                          (finished runs only)
  learning_curves.png     test top-1 over epochs and training loss over steps
                          (unfinished runs too, as far as they got)
  nc_metrics.png          neural-collapse statistics over training (when the
                          runs logged them, config.nc_metrics=True)
  report.md               a markdown table comparing the runs and, where
                          several runs (or vmapped replicas) are seeds of
                          one experiment, a table pooling them: mean, std
                          and range over the seeds
A workdir of `benchmarks/reference_run.py` (the authors' code) is read the
same way. A figure with nothing to show is not written. A workdir that
does not exist, is no run directory, or has not logged anything yet stops
the report with one `error:` line (exit status 2).
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m: the extra first, in one line
  from nc_jax.cli import exit_without_extra
  exit_without_extra("report")

import json
import pathlib
from typing import Any

from absl import flags

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nc_jax import run_config  # noqa: E402
from nc_jax.cli import app as cli  # noqa: E402

_WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Run directories.")
_OUT = flags.DEFINE_string("out", "report", "Output directory.")
flags.mark_flag_as_required("workdir")

NC_KEYS = ("nc1", "cos_mean_h", "self_duality", "minority_cos_w",
           "minority_cos_h", "norm_spread_h")


class ReportError(FileNotFoundError):
  """A workdir the report cannot use; the message names the fix."""


def load_run(workdir: str | pathlib.Path) -> dict[str, Any]:
  """Reads a run directory into {name, config, results, train, eval,
  subset_size}.

  Raises:
    ReportError: `workdir` does not exist or is not a run directory.
  """
  wd = pathlib.Path(workdir).expanduser()
  if not wd.exists():
    raise ReportError(
        f"--workdir {wd} does not exist. Pass the --workdir of a run of "
        "nc-jax-train.")
  if not wd.is_dir():
    raise ReportError(f"--workdir {wd} is a file, not a run directory.")
  cfg_path, res_path, met_path = (wd / "config.json", wd / "results.json",
                                  wd / "metrics.jsonl")
  if not cfg_path.exists():
    raise ReportError(
        f"{wd} has no config.json: it is not a run directory of "
        "nc-jax-train, or that run stopped "
        "before it started training.")
  records = []
  if met_path.exists():
    lines = [l for l in met_path.read_text().splitlines() if l.strip()]
    for i, line in enumerate(lines):
      try:
        records.append(json.loads(line))
      except ValueError:
        if i < len(lines) - 1:
          raise ReportError(f"{met_path} line {i + 1} is not JSON: the "
                            "file is damaged.") from None
        # The last line of a run killed mid-write (or being written now).
  subset = wd / "train_subset.json"
  subset_size = None
  if subset.exists():
    subset_size = sum(len(c) for c in _read_json(subset)["images"])
  return {
      "name": wd.name,
      "config": _read_json(cfg_path),
      "results": _read_json(res_path) if res_path.exists() else None,
      "train": [r for r in records if r["kind"] == "train"],
      "eval": [r for r in records if r["kind"] == "eval"],
      "subset_size": subset_size,
  }


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ReportError(f"{path} is not valid JSON ({type(e).__name__}): "
                      "restore it, or leave this run out.") from None


def _distinct_names(runs: list[dict], workdirs: list[str]) -> None:
  """Runs whose folders share a name are labelled with their parent folder
  too (`jpeg/etf_dr`, `original/etf_dr`), in tables and legends."""
  names = [run["name"] for run in runs]
  for run, wd in zip(runs, workdirs):
    if names.count(run["name"]) > 1:
      path = pathlib.Path(wd).expanduser().resolve()
      run["name"] = f"{path.parent.name}/{path.name}"


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
        f"{c.get('method')} | {c.get('backbone')} | {c.get('num_seeds', 1)} | "
        f"{_fmt(fin, fstd, 'top1')} | {_fmt(fin, fstd, 'head')} | "
        f"{_fmt(fin, fstd, 'medium')} | {_fmt(fin, fstd, 'tail')} | "
        f"{_fmt(fin, fstd, 'ece')} | {_fmt(best, bstd, 'top1')} |")
  return "\n".join(rows) + "\n"


def _seeds_of(run: dict) -> list[tuple[str, dict, dict]]:
  """(label, final, best) of each seed a finished run trained: its `seed`,
  or `seed/r` for replica r of a vmapped run (`num_seeds` > 1)."""
  res, seed = run["results"], run["config"].get("seed", 0)
  if res.get("per_seed"):
    return [(f"{seed}/{r}", p["final"], p["best"])
            for r, p in enumerate(res["per_seed"])]
  return [(str(seed), res["final"], res["best"])]


def seed_groups(runs: list[dict]) -> list[dict]:
  """Finished runs that compute the same thing but for their seeds
  (`run_config.recipe_of`), pooled, in the order of their first runs.

  Each group: `runs` (their names), `seeds` (labels), `final` and `best`
  (one block per seed) and `repeats` (a seed met again in another run of
  the group: counted once, from its first run).
  """
  groups: dict[str, dict] = {}
  for run in runs:
    if not run["results"]:
      continue
    key = json.dumps(run_config.recipe_of(run["config"]), sort_keys=True,
                     default=str)
    g = groups.setdefault(key, {"config": run["config"], "runs": [],
                                "seeds": [], "final": [], "best": [],
                                "repeats": []})
    g["runs"].append(run["name"])
    for label, final, best in _seeds_of(run):
      if label in g["seeds"]:
        g["repeats"].append(f"seed {label} in {run['name']}")
        continue
      g["seeds"].append(label)
      g["final"].append(final)
      g["best"].append(best)
  return list(groups.values())


def _stats(blocks: list[dict], key: str) -> str:
  """`mean ± std (min-max)` of `key` over the seeds (std with n - 1)."""
  vals = [b[key] for b in blocks if b.get(key) is not None]
  if not vals:
    return "-"
  m = sum(vals) / len(vals)
  sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
  return f"{m:.3f} ± {sd:.2f} ({min(vals):.2f}-{max(vals):.2f})"


def seeds_table(runs: list[dict]) -> str | None:
  """Markdown table of the experiments with two or more seeds; None when
  there is none."""
  groups = [g for g in seed_groups(runs) if len(g["seeds"]) > 1]
  if not groups:
    return None
  rows = ["| runs | dataset | r | method | seeds | final top-1 | best top-1 "
          "| final head | final medium | final tail |", "|" + "---|" * 10]
  notes = []
  for g in groups:
    c = g["config"]
    rows.append(
        f"| {', '.join(g['runs'])} | {c['dataset']} | {c['imb_factor']} | "
        f"{c.get('method')} | {', '.join(g['seeds'])} | "
        f"{_stats(g['final'], 'top1')} | {_stats(g['best'], 'top1')} | "
        + " | ".join(_stats(g["final"], k) for k in ("head", "medium", "tail"))
        + " |")
    notes += [f"- {r}: a repeat, left out" for r in g["repeats"]]
  return "\n".join(
      ["## Seeds pooled", "",
       "Runs whose configs differ only in their seeds (as a resume compares "
       "configs, on data_dirs of the same name): mean ± std over the seeds "
       "(n - 1 in the denominator), and their range. \"best\" is each "
       "seed's own best evaluation.", "",
       *rows, "", *notes]) + "\n"


def plot_accuracy_by_class_size(runs: list[dict], path: pathlib.Path) -> bool:
  """Final per-class accuracy; False (nothing written) when no run finished."""
  if not any(run["results"] for run in runs):
    return False
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
  return True


def plot_curves(runs: list[dict], path: pathlib.Path) -> bool:
  """Test top-1 and training loss; False (nothing written) when no run
  logged any."""
  if not any(run["eval"] or run["train"] for run in runs):
    return False
  by_epoch = all(_epochs(run) is not None for run in runs if run["eval"])
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  for run in runs:
    ev = [r for r in run["eval"] if "top1" in r]
    if ev:
      x = _epochs(run) if by_epoch else [r["step"] for r in ev]
      a1.plot(x, [r["top1"] for r in ev], "o-", label=run["name"])
    tr = [r for r in run["train"] if r.get("loss") is not None]
    if tr:
      a2.plot([r["step"] for r in tr], [r["loss"] for r in tr],
              label=run["name"], alpha=0.8)
  a1.set_xlabel("epoch" if by_epoch else "step")
  a1.set_ylabel("test top-1 (%)")
  a1.set_title("Test accuracy")
  a2.set_xlabel("step")
  a2.set_ylabel("training loss")
  a2.set_yscale("log")
  a2.set_title("Training loss (each method's own loss)")
  for a, what in ((a1, "evaluation"), (a2, "training step")):
    a.grid(alpha=0.3)
    if a.get_legend_handles_labels()[0]:
      a.legend(fontsize=8)
    else:
      a.text(0.5, 0.5, f"no {what} logged yet", ha="center", va="center",
             transform=a.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _steps_per_epoch(run: dict) -> float | None:
  """Steps per epoch, or None when the run does not tell."""
  res, c = run["results"], run["config"]
  n = res["num_train_examples"] if res else run.get("subset_size")
  if n and c.get("batch_size"):
    return max(n // c["batch_size"], 1)
  return None


def _epochs(run: dict) -> list[float] | None:
  """The epoch of each test evaluation: as recorded (the authors'-code
  script records it), else from the step; None when the run does not
  tell."""
  ev = [r for r in run["eval"] if "top1" in r]
  if ev and all("epoch" in r for r in ev):
    return [float(r["epoch"]) for r in ev]
  spe = _steps_per_epoch(run)
  return [r["step"] / spe for r in ev] if spe else None


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


def progress_note(run: dict) -> str | None:
  """How far an unfinished run got ("step 40 of 1536"), or None if finished."""
  if run["results"]:
    return None
  steps = [r["step"] for r in run["train"] + run["eval"]]
  if not steps:
    return "no step logged yet"
  c, spe = run["config"], _steps_per_epoch(run)
  total = c.get("num_steps") or (
      round(c["num_epochs"] * spe) if spe and c.get("num_epochs") else None)
  return f"step {max(steps)}" + (f" of {total}" if total else "")


def write_report(workdirs: list[str], out: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes the figures and report.md; returns the paths written.

  Raises:
    ReportError: a workdir is no run directory, or no run logged anything
      (nothing to report; nothing is written).
  """
  runs = [load_run(w) for w in workdirs]
  _distinct_names(runs, workdirs)
  if not any(run["results"] or run["train"] or run["eval"] for run in runs):
    raise ReportError(
        f"nothing to report yet: {', '.join(map(str, workdirs))} "
        f"{'has' if len(runs) == 1 else 'have'} no metrics.jsonl records and "
        "no results.json. Run the report once training has logged a step "
        "(every log_every_steps).")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  if plot_accuracy_by_class_size(runs, out / "per_class_accuracy.png"):
    written.append(out / "per_class_accuracy.png")
  if plot_curves(runs, out / "learning_curves.png"):
    written.append(out / "learning_curves.png")
  if plot_nc(runs, out / "nc_metrics.png"):
    written.append(out / "nc_metrics.png")
  md = ["# Run comparison", "", table(runs)]
  notes = [f"- {run['name']}: unfinished ({progress_note(run)}); curves "
           "only, no final numbers" for run in runs if not run["results"]]
  if notes:
    md += notes + [""]
  pooled = seeds_table(runs)
  if pooled:
    md += [pooled]
  md += [f"![{p.stem}]({p.name})" for p in written]
  (out / "report.md").write_text("\n".join(md) + "\n")
  written.append(out / "report.md")
  return written


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageProblem(f"unexpected arguments: {' '.join(argv[1:])}.")
  out = cli.check_output(_OUT.value, "--out")
  try:
    written = write_report(_WORKDIRS.value, out)
  except ReportError as e:
    raise cli.UsageProblem(str(e)) from e
  for p in written:
    print(f"wrote {p}")
  print((out / "report.md").read_text())


def run(argv: list[str] | None = None) -> None:
  """The `nc-jax-report` console entry point."""
  cli.run_app(main, argv)


if __name__ == "__main__":
  run()
