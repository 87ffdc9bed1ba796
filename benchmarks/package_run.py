r"""Commit a finished run's evidence under results/: its files and a RUN.md.

    python benchmarks/package_run.py WORKDIR DEST --title TITLE \
        [--paper 72.9] [--started ISO] [--finished ISO] [--machine TEXT] \
        [--note PARAGRAPH ...]

Copies `results.json`, `metrics.jsonl`, `config.json` and
`train_subset.json` (never checkpoints or TensorBoard files) from WORKDIR to
DEST and writes `DEST/RUN.md`: the command (with `--config.data_dir` and
`--workdir` cut to their last component, since they were paths on the
machine that ran it), commit, versions, machine, dates, wall time, resumes,
the training subset and a table of the final and best evaluations.
A workdir of the authors' code (`benchmarks/reference_run.py`, whose
results.json names that program) is packaged alike, with its `train.log`
in place of `train_subset.json` (its subset is `train_counts` in
results.json) and the commit of their checkout in RUN.md.

Before writing anything it recomputes from `metrics.jsonl` what RUN.md
states: the final evaluation (the last), the best (the first evaluation
reaching the highest top-1, as `nc_jax.best` keeps it) and the mean top-1
over the last 40 and 20 evaluations; it refuses, in one `error:` line,
when these disagree with `results.json`, when an evaluation step appears
twice, or when the run has not finished (no `results.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone

FILES = ("results.json", "metrics.jsonl", "config.json", "train_subset.json")
REFERENCE_FILES = ("results.json", "metrics.jsonl", "config.json",
                   "train.log")
REFERENCE_PROGRAM = "the authors' code"


def is_reference(results: dict) -> bool:
  """Whether results.json is benchmarks/reference_run.py's."""
  return results.get("program", "").startswith(REFERENCE_PROGRAM)


def fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def read_metrics(path: pathlib.Path) -> tuple[list[dict], list[dict]]:
  """(train records, eval records) of a metrics.jsonl, in file order."""
  train, evals = [], []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      fail(f"{path} line {n} is not JSON; repair or drop that line")
    (evals if rec.get("kind") == "eval" else train).append(rec)
  return train, evals


def summarize(evals: list[dict], steps_per_epoch: float) -> dict:
  """Final, best and late means of a run's evaluation records.

  Args:
    evals: eval records, each with `step` and `top1` (and `head`, `medium`,
      `tail` where the run had class groups).
    steps_per_epoch: to turn steps into epochs.

  Returns:
    {"final": rec, "best": rec, "mean_last40": float, "mean_last20": float,
     "epochs": [float]}, each rec with its `epoch` added.
  """
  steps = [r["step"] for r in evals]
  if len(set(steps)) != len(steps):
    twice = sorted({s for s in steps if steps.count(s) > 1})
    fail(f"metrics.jsonl evaluates step(s) {twice[:5]} more than once")
  recs = [dict(r, epoch=r["step"] / steps_per_epoch) for r in evals]
  best = recs[0]
  for r in recs[1:]:
    if r["top1"] > best["top1"]:  # the first to reach the maximum, as best.py
      best = r
  mean = lambda rs: sum(r["top1"] for r in rs) / len(rs)
  return {"final": recs[-1], "best": best, "mean_last40": mean(recs[-40:]),
          "mean_last20": mean(recs[-20:]), "epochs": [r["epoch"] for r in recs]}


def check_against_results(summary: dict, results: dict) -> None:
  """Fails unless results.json's final and best are what metrics.jsonl says."""
  for key in ("final", "best"):
    ours, theirs = summary[key], results[key]
    if (abs(ours["top1"] - theirs["top1"]) > 1e-6
        or abs(ours["epoch"] - float(theirs["epoch"])) > 1e-6):
      fail(f"results.json's {key} (top-1 {theirs['top1']} at epoch "
           f"{theirs['epoch']}) is not metrics.jsonl's ({ours['top1']} at "
           f"epoch {ours['epoch']:g}); was the workdir copied mid-run?")


def public_command(command: str) -> str:
  """The command with machine paths cut to their last component."""
  def cut(m: re.Match) -> str:
    return (f"{m.group(1)}{m.group(2)}"
            f"{os.path.basename(m.group(3).rstrip('/'))}")
  command = re.sub(r"(--config\.data_dir|--data_dir|--reference)([= ])(\S+)",
                   cut, command)
  if command.startswith("reference_run.py"):  # its argv[0], run from the root
    command = "PYTHONPATH=. python benchmarks/" + command
  return re.sub(r"(--workdir) (\S+)",
                lambda m: f"{m.group(1)} ~/nc_jax_runs/"
                f"{os.path.basename(m.group(2).rstrip('/'))}", command)


def default_machine(provenance: dict) -> str:
  """The machine as these words describe it, read where the packager runs."""
  model = ""
  if os.path.exists("/proc/cpuinfo"):
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  platform = provenance.get("devices", {}).get(
      "platform", provenance.get("device", "?"))
  if platform != "cpu":  # then this machine's CPU is not the run's
    fail(f"the run used {platform}, not this machine's CPU: pass --machine "
         "to describe the machine that ran it")
  return (f"a {os.cpu_count()}-core {provenance.get('machine', '?')} "
          f"development VM ({model}), {platform.upper()} only")


def iso_mtime(path: pathlib.Path) -> str:
  t = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
  return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def run_md(args, results: dict, summary: dict, n_train: int) -> str:
  """The text of RUN.md."""
  prov = results["provenance"]
  versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items()
                       if k != "nc_jax")
  counts = results["train_counts"]
  final, best = summary["final"], summary["best"]
  ref = is_reference(results)
  finished = args.finished or iso_mtime(args.workdir / "results.json")
  first = "config.json" if ref else "train_subset.json"
  started = args.started or (iso_mtime(args.workdir / first) + " (file time)")
  if ref:
    program = [
        f"- nc_jax commit (the script): {prov['commit'][:7]} "
        "(`provenance.commit`).",
        "- The authors' code: a checkout of "
        "NeuralCollapseApplications/ImbalancedLearning at "
        f"{prov['reference_commit']} (`provenance.reference_commit`), "
        "imported unmodified; the recipe from its "
        f"`{results['config']['reference_yaml']}`.",
        f"- Versions: {versions}; Python {prov['python']}; "
        f"{prov.get('threads', '?')} torch threads.",
    ]
    subset = "(`train_counts` in results.json; nc_jax's selection)"
  else:
    program = [
        f"- nc_jax commit: {prov['commit'][:7]} (`provenance.commit`).",
        f"- Versions: {versions}; Python {prov['python']}.",
    ]
    subset = "(`train_subset.json`)"
  lines = [
      f"# {args.title}", "",
      "Command (from a `git worktree` of the repository at the commit below, "
      "the workdir outside it), where `cifar-10-python.tar.gz` is the "
      "original CIFAR-10 python release (`config.json` records where it was "
      "on the machine that ran it):", "",
      f"    {public_command(prov['command'])}", "",
      *program,
      f"- Machine: {args.machine or default_machine(prov)}.",
      f"- Dates (UTC): started {started}, finished {finished}.",
      f"- Wall time: {prov['wall_s']:,.0f} s "
      + ("of training and evaluation" if ref else "of training")
      + " (`provenance.wall_s`)"
      + (f"; {args.wall_note}" if args.wall_note else "") + ".",
      f"- Resumed: {prov.get('resumes', 0)} time(s) (`provenance.resumes`). "
      f"`metrics.jsonl` holds {n_train} train records and "
      f"{len(summary['epochs'])} evaluations, each step once.",
      f"- Training subset: {sum(counts)} images, per class {counts} "
      f"{subset}.", "",
      "| | top-1 | head | medium | tail | epoch |",
      "|---|---|---|---|---|---|",
  ]
  for name, rec in (("final", final), ("best (test-selected)", best)):
    lines.append(f"| {name} | {rec['top1']:.2f} | {fmt(rec.get('head'))} | "
                 f"{fmt(rec.get('medium'))} | {fmt(rec.get('tail'))} | "
                 f"{rec['epoch']:g} |")
  lines.append("")
  tail = (f"Mean test top-1 over the last 40 evaluations: "
          f"{summary['mean_last40']:.2f}; over the last 20: "
          f"{summary['mean_last20']:.2f}.")
  if args.paper is not None:
    tail = (f"Against the paper's {args.paper}: {final['top1'] - args.paper:+.2f} "
            f"final, {best['top1'] - args.paper:+.2f} best. " + tail)
  per_class = results["final"].get("per_class")
  if per_class:
    tail += (" Final per-class accuracy, class 0 (the largest) to the last: "
             + " / ".join(f"{p:.1f}" for p in per_class) + ".")
  lines += [tail, ""]
  for note in args.note:
    lines += [note, ""]
  lines.append("Not committed: the checkpoint"
               + ("." if ref else "s and TensorBoard files."))
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdir", type=pathlib.Path)
  p.add_argument("dest", type=pathlib.Path)
  p.add_argument("--title", required=True)
  p.add_argument("--paper", type=float, default=None,
                 help="the paper's figure for this cell and method")
  p.add_argument("--started", default=None)
  p.add_argument("--finished", default=None)
  p.add_argument("--machine", default=None)
  p.add_argument("--wall_note", default=None)
  p.add_argument("--note", action="append", default=[],
                 help="a paragraph for RUN.md (repeatable)")
  args = p.parse_args(argv)
  if not (args.workdir / "results.json").is_file():
    fail(f"{args.workdir} has no results.json: the run has not finished; "
         "rerun its command to finish it first")
  results = json.loads((args.workdir / "results.json").read_text())
  files = REFERENCE_FILES if is_reference(results) else FILES
  for f in files:
    if not (args.workdir / f).is_file():
      fail(f"{args.workdir} has no {f}")
  for key in ("command", "commit"):
    if key not in results["provenance"]:
      fail(f"{args.workdir}/results.json records no provenance.{key}: it "
           "was written by an older version; package it by hand")
  config = json.loads((args.workdir / "config.json").read_text())
  train, evals = read_metrics(args.workdir / "metrics.jsonl")
  if not evals:
    fail(f"{args.workdir}/metrics.jsonl has no evaluation records")
  steps_per_epoch = evals[-1]["step"] / float(results["final"]["epoch"])
  summary = summarize(evals, steps_per_epoch)
  check_against_results(summary, results)
  text = run_md(args, results, summary, len(train))
  args.dest.mkdir(parents=True, exist_ok=True)
  for f in files:
    shutil.copyfile(args.workdir / f, args.dest / f)
  (args.dest / "RUN.md").write_text(text)
  seed = config.get("seed")
  print(f"{args.dest}: seed {seed}, final {summary['final']['top1']:.2f}, "
        f"best {summary['best']['top1']:.2f} (epoch "
        f"{summary['best']['epoch']:g}), mean of the last 40 "
        f"{summary['mean_last40']:.2f}")


if __name__ == "__main__":
  main()
