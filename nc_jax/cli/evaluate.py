r"""Evaluate a trained run on the test set without training; export it.

    nc-jax-evaluate --workdir runs/c10_etf_dr --out runs/c10_etf_dr_eval
    nc-jax-evaluate --workdir runs/c10_etf_dr --which best --out eval_best
    nc-jax-evaluate --workdir runs/c10_etf_dr --which best --export c10.msgpack

(or `python -m nc_jax.cli.evaluate ...`). --workdir is a run's workdir or
a file written by --export. --which is final (the newest checkpoint), best
(best mean test top-1) or a step kept in checkpoints/. The test data is the
run's own `config.data_dir` unless --data_dir names another place (any form
`--config.data_dir` takes).

--out DIR receives
  eval.json               the same metric block as results.json (top1,
                          top5, head, medium, tail, ece, loss, per_class,
                          num_examples, epoch), named after --which ("final",
                          "latest" for an unfinished run, "best", "step"),
                          plus `nc` (neural-collapse statistics of the test
                          features) and the confusion matrix (counts); with
                          num_seeds > 1 also `<block>_std` and `per_seed`
  confusion_matrix.png    K x K, rows normalised (true class -> predicted)
  per_class_accuracy.png  test accuracy of every class, with its train count
The final checkpoint's numbers are results.json's `final` block: the same
compiled eval step over the same test batches.

--export FILE writes one portable file (params, BatchNorm statistics, the
ETF, the config, metadata; replica --replica of a num_seeds run) that
`nc_jax.runs.load(FILE)` and this command's --workdir read.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m: the extra first, in one line
  from nc_jax.cli import exit_without_extra
  exit_without_extra("evaluate")

import json
import pathlib
import sys

from absl import flags
from absl import logging

from nc_jax.cli import app as cli
from nc_jax.kernels import xla_setup

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A run's workdir, or a file written by --export.")
_WHICH = flags.DEFINE_string(
    "which", "final", "final (newest checkpoint), best (best mean test top-1) "
    "or a step number kept in checkpoints/.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Where the test data is (any form --config.data_dir "
    "takes); default: the run's config.data_dir.")
_OUT = flags.DEFINE_string(
    "out", None, "Directory for eval.json, confusion_matrix.png and "
    "per_class_accuracy.png.")
_EXPORT = flags.DEFINE_string(
    "export", None, "Write the checkpoint to this one portable file "
    "(nc_jax.runs.export).")
_REPLICA = flags.DEFINE_integer(
    "replica", 0, "With num_seeds > 1: the replica --export writes.")
flags.mark_flag_as_required("workdir")


def _run_config(path: pathlib.Path) -> dict | None:
  """The run's config without importing jax (for the XLA defaults)."""
  try:
    if path.is_dir():
      return json.loads((path / "config.json").read_text())
    if path.is_file():
      import msgpack  # pylint: disable=g-import-not-at-top
      with open(path, "rb") as f:
        blob = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
      return json.loads(blob["config"])
  except Exception:  # pylint: disable=broad-except
    return None  # runs.load says what is wrong
  return None


def _check_export_target(target: pathlib.Path, format_name: str) -> None:
  """An existing file is replaced only if it is an earlier export: anything
  else (a run's results.json, someone's data) is kept."""
  if not target.is_file():
    return
  ours = False
  try:
    import msgpack  # pylint: disable=g-import-not-at-top
    with open(target, "rb") as f:
      # The top-level map's keys, the values skipped: any other file fails
      # at its first bytes, without being read whole.
      unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
      for _ in range(min(unpacker.read_map_header(), 64)):
        if unpacker.unpack() == "format":
          ours = unpacker.unpack() == format_name
          break
        unpacker.skip()
  except Exception:  # pylint: disable=broad-except
    ours = False
  if not ours:
    raise cli.UsageProblem(
        f"--export {target} exists and is not a file written by --export; "
        "it is left as it is. Pass a new file name (e.g. run.msgpack).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageProblem(
        f"unexpected arguments: {' '.join(argv[1:])}. Flags take the form "
        "--name=value.")
  if not _OUT.value and not _EXPORT.value:
    raise cli.UsageProblem(
        "nothing to do: pass --out DIR (evaluate on the test set) and/or "
        "--export FILE (write the portable file).")
  out = cli.check_output(_OUT.value, "--out") if _OUT.value else None
  export = (cli.check_output(_EXPORT.value, "--export", kind="file")
            if _EXPORT.value else None)
  which = _WHICH.value.strip().lower()
  if which not in ("final", "best") and not which.isdigit():
    raise cli.UsageProblem(
        f"--which={_WHICH.value!r}: pass final (the newest checkpoint), best "
        "(best mean test top-1) or a step number kept in checkpoints/.")
  path = pathlib.Path(_WORKDIR.value).expanduser()
  if not path.exists():
    raise cli.UsageProblem(
        f"--workdir {path} does not exist. Pass the --workdir of a run of "
        "nc-jax-train or a file written by "
        "--export.")
  config = _run_config(path) or {}
  xla_setup.apply(config)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from nc_jax import runs  # pylint: disable=g-import-not-at-top
  which = runs.parse_which(which)
  if export is not None:
    _check_export_target(export, runs.FORMAT)

  if export is not None:
    try:
      written = runs.export(path, export, which, replica=_REPLICA.value)
    except ValueError as e:  # a --replica out of range
      raise cli.UsageProblem(str(e).replace("replica=", "--replica=")
                             ) from None
    print(f"exported {_WHICH.value} of {path} to {written} "
          f"({written.stat().st_size / 1e6:.1f} MB)", flush=True)
  if out is None:
    return
  record = runs.evaluate(path, which, data_dir=_DATA_DIR.value)
  write_outputs(record, out)


def write_outputs(record: dict, out: pathlib.Path) -> None:
  """eval.json and the two figures into `out`, with a summary on stdout."""
  from nc_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from nc_jax import reporting  # pylint: disable=g-import-not-at-top
  out.mkdir(parents=True, exist_ok=True)
  block = record[record["block"]]
  workdir_lib.write_json_atomic(out / "eval.json", record)
  plot_confusion(record, out / "confusion_matrix.png")
  plot_class_bars(record, out / "per_class_accuracy.png")
  epoch = record["epoch"]
  where = f"{record['which']} checkpoint, step {record['step']}"
  print(reporting.eval_line(round(epoch, 2) if epoch is not None else
                            float("nan"), "test", block) + f" [{where}]")
  nc = block.get("nc", {})
  print("  nc test: " + " ".join(
      f"{k} {nc[k]:.4f}" for k in ("nc1", "cos_mean_h", "self_duality",
                                   "minority_cos_w", "minority_cos_h")
      if k in nc))
  results = pathlib.Path(record["source"]) / "results.json"
  if record["block"] in ("final", "best") and results.is_file():
    saved = json.loads(results.read_text()).get(record["block"], {})
    if saved.get("top1") is not None:
      print(f"  results.json {record['block']}: top1 {saved['top1']:.2f}")
  print(f"wrote {out / 'eval.json'}, {out / 'confusion_matrix.png'}, "
        f"{out / 'per_class_accuracy.png'}", flush=True)


def _names(record: dict) -> list[str]:
  k = len(record["confusion_matrix"])
  names = record.get("class_names") or []
  return list(names) if len(names) == k else [str(c) for c in range(k)]


def _title(record: dict) -> str:
  c = record["config"]
  return (f"{c['dataset']}-LT r={c['imb_factor']} {c['method']} "
          f"({record['which']}, step {record['step']})")


def plot_confusion(record: dict, path: pathlib.Path) -> None:
  """The K x K confusion matrix, each row (true class) normalised to 1."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  counts = np.asarray(record["confusion_matrix"], np.float64)
  rows = counts.sum(1, keepdims=True)
  norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
  k = len(norm)
  names = _names(record)
  size = min(4 + 0.45 * k, 16)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
               label="fraction of the true class")
  if k <= 30:
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
  if k <= 15:
    for i in range(k):
      for j in range(k):
        if counts[i, j]:
          ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center",
                  fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title("Confusion matrix, " + _title(record), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_class_bars(record: dict, path: pathlib.Path) -> None:
  """Per-class test accuracy as bars, coloured by head/medium/tail."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  block = record[record["block"]]
  acc = [float("nan") if a is None else a for a in block["per_class"]]
  k = len(acc)
  names = _names(record)
  counts = record.get("train_counts")
  group_of = {}
  for group, classes in (record.get("class_groups") or {}).items():
    for c in classes:
      group_of.setdefault(c, group)
  palette = {"head": "tab:blue", "medium": "tab:orange", "tail": "tab:red"}
  colours = [palette.get(group_of.get(c), "tab:gray") for c in range(k)]
  fig, ax = plt.subplots(figsize=(min(4 + 0.5 * k, 18), 4.5))
  ax.bar(range(k), acc, color=colours)
  ax.axhline(block["top1"], color="black", lw=1, ls="--",
             label=f"top-1 {block['top1']:.2f}")
  if k <= 30:
    labels = [f"{n}\n{counts[c]}" if counts else n
              for c, n in enumerate(names)]
    ax.set_xticks(range(k), labels, rotation=0 if k <= 10 else 60,
                  fontsize=8)
    ax.set_xlabel("class" + (" (train images)" if counts else ""))
  else:
    ax.set_xlabel("class index")
  handles = [ax.get_legend_handles_labels()[0][0]]
  for group, colour in palette.items():
    if group in (record.get("class_groups") or {}):
      v = block.get(group)
      handles.append(Patch(color=colour, label=f"{group} " + (
          "n/a" if v is None else f"{v:.2f}")))
  ax.set_ylim(0, 100)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Per-class accuracy, " + _title(record), fontsize=10)
  ax.legend(handles=handles, fontsize=8, loc="upper left",
            bbox_to_anchor=(1.01, 1.0))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(argv: list[str] | None = None) -> None:
  """The `nc-jax-evaluate` console entry point."""
  cli.set_quiet_tensorflow()
  cli.run_app(main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  run()
