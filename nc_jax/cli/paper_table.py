r"""The paper's table as one resumable command.

    python -m nc_jax.cli.paper_table --root runs/table \
        --cells cifar10_r0.01_etf_dr,cifar10_r0.01_ce [--seeds 3] \
        [--epochs E | --steps N] [--data_dir PATH]

Each cell is a preset of `nc_jax/configs/cifar_lt.py` (`presets()`:
`{dataset}_r{imb}_{ce|etf_dr}`, `imagenet_lt_{ce|etf_dr}`; `densenet_presets()`
adds `..._densenet`). A cell trains (or resumes) in `ROOT/<cell>/` with
`num_seeds=S` replicas in one program; a finished cell is read, not rerun, so
a killed sweep restarted with the same command picks up where it stopped.
`--cells` also takes a row name: `cifar10`, `cifar100`, `svhn`, `stl10`
(3 ratios x {ce, etf_dr}).

Writes `ROOT/paper_table.md` and `ROOT/paper_table.json`: per cell, final
and best test top-1 (mean ± std over seeds), head / medium / tail, seeds,
epochs, the paper's figure and the difference. Cells can also run in
separate processes (`--cells A` and `--cells B` side by side on one
accelerator); a last call naming all of them then writes the table.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m: the extra first, in one line
  from nc_jax.cli import exit_without_extra
  exit_without_extra("paper_table")

import difflib
import json
import os
import pathlib
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from nc_jax.cli import app as cli
from nc_jax.kernels import xla_setup
from nc_jax.configs import cifar_lt as cfg_lib

_ROOT = flags.DEFINE_string("root", None, "Directory holding one workdir per "
                            "cell, and the tables.")
_CELLS = flags.DEFINE_string("cells", None, "Comma list of preset names (or "
                             "row names: cifar10, cifar100, svhn, stl10).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per cell (num_seeds).")
_EPOCHS = flags.DEFINE_float("epochs", None, "Training length in epochs "
                             "(default: the preset's, 200 / 90).")
_STEPS = flags.DEFINE_integer("steps", None, "Training length in steps.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "data_dir for every cell (the CIFAR python release "
    "folder or archive, an image folder or its archive, or a tfds "
    "data_dir).")
flags.mark_flags_as_required(["root", "cells"])

# Top-1 (%) published for these cells (docs/method.md, Published numbers;
# ResNet backbones).
# ETF + DR from the paper's tables; the learnable-CE baseline as the paper
# lists it. SVHN-LT as listed in the paper.
PAPER_TOP1 = {
    "cifar10_r0.005_etf_dr": 72.9, "cifar10_r0.01_etf_dr": 78.5,
    "cifar100_r0.005_etf_dr": 40.9, "cifar100_r0.01_etf_dr": 45.3,
    "cifar100_r0.02_etf_dr": 50.4,
    "svhn_r0.005_etf_dr": 42.8, "svhn_r0.01_etf_dr": 45.7,
    "svhn_r0.02_etf_dr": 49.8,
    "imagenet_lt_etf_dr": 44.7,
    "cifar10_r0.01_ce": 70.4, "cifar100_r0.01_ce": 38.3,
}
PAPER_EPOCHS = {"imagenet_lt": 90.0}  # every other preset: 200


class UsageError(ValueError):
  """A bad command line; the message lists the valid choices."""


def all_cells() -> dict[str, str]:
  return {**cfg_lib.presets(), **cfg_lib.densenet_presets()}


def parse_cells(text: str) -> list[str]:
  """Cell names from `--cells` (presets or row names), in order, unique."""
  cells = all_cells()
  rows = cfg_lib.PAPER_DATASETS
  out: list[str] = []
  for name in filter(None, (s.strip() for s in text.split(","))):
    if name in rows:
      names = [f"{name}_r{r}_{m}" for r in cfg_lib.PAPER_RATIOS
               for m in cfg_lib.PAPER_METHODS]
    elif name in cells:
      names = [name]
    else:
      close = difflib.get_close_matches(name, list(cells) + list(rows), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise UsageError(
          f"Unknown cell {name!r}.{hint} Valid cells: rows {', '.join(rows)}; "
          f"presets {', '.join(cfg_lib.presets())}; DenseNet variants "
          "(not released by the reference) "
          f"{', '.join(list(cfg_lib.densenet_presets())[:2])}, ... "
          "(NAME_densenet).")
    out += [n for n in names if n not in out]
  if not out:
    raise UsageError("--cells is empty; name at least one preset, e.g. "
                     "cifar10_r0.01_etf_dr.")
  return out


def cell_config(cell: str, *, seeds: int, epochs: float | None,
                steps: int | None, data_dir: str | None):
  """The locked config of one cell."""
  if epochs is not None and steps is not None:
    raise UsageError("Give --epochs or --steps, not both.")
  if seeds < 1:
    raise UsageError(f"--seeds must be >= 1, got {seeds}.")
  arg = cell
  if epochs is not None:
    arg += f",epochs={epochs:g}"
  if steps is not None:
    arg += f",steps={steps}"
  # epochs=/steps= in the argument scale the recipe's warm-up and decays to
  # the budget when the run starts (nc_jax.schedule_fit.fit_schedule).
  config = cfg_lib.get_config(arg)
  config.unlock()
  config.num_seeds = int(seeds)
  if data_dir:
    config.data_dir = data_dir
  config.lock()
  return config


def _pm(mean: float | None, std: float | None) -> str:
  if mean is None:
    return "-"
  return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _epoch(value: float | str) -> str:
  return value if isinstance(value, str) else f"{value:g}"


def summarize_cells(root: pathlib.Path, cells: list[str]) -> dict[str, Any]:
  """Reads the cells' results.json into the table's rows."""
  rows = []
  for cell in cells:
    res_path = root / cell / "results.json"
    row: dict[str, Any] = {"cell": cell, "paper_top1": PAPER_TOP1.get(cell)}
    if not res_path.exists():
      rows.append(dict(row, status="missing"))
      continue
    res = json.loads(res_path.read_text())
    cfg = res["config"]
    fin, best = res["final"], res["best"]
    fstd, bstd = res.get("final_std", {}), res.get("best_std", {})
    epochs = (cfg["num_epochs"] if cfg.get("num_epochs") else
              cfg["num_steps"] / max(1, res["num_train_examples"]
                                     // cfg["batch_size"]))
    row.update(
        status="done", paper_epochs=PAPER_EPOCHS.get(cfg["dataset"], 200.0), seeds=res.get("num_seeds", 1), epochs=epochs,
        final_top1=fin["top1"], final_top1_std=fstd.get("top1"),
        best_top1=best["top1"], best_top1_std=bstd.get("top1"),
        # Several seeds: each seed's best epoch (results before
        # 2026-11-30 hold their mean in "epoch").
        best_epoch=(best["epoch"] if best.get("epoch") is not None
                    else "/".join(f"{e:g}" for e in best["epochs"])),
        head=fin["head"], medium=fin["medium"], tail=fin["tail"],
        wall_s=res.get("provenance", {}).get("wall_s"))
    if row["paper_top1"] is not None:
      row["final_minus_paper"] = fin["top1"] - row["paper_top1"]
      row["best_minus_paper"] = best["top1"] - row["paper_top1"]
    rows.append(row)
  short = any(r["epochs"] < r["paper_epochs"] - 1e-6 for r in rows
              if r["status"] == "done")
  return {"rows": rows, "short_budget": short}


def markdown(table: dict[str, Any]) -> str:
  """The table as markdown, with a plain warning for short budgets."""
  lines = []
  if table["short_budget"]:
    lines += ["**Short budget**: at least one cell trained for fewer epochs "
              "than the paper (200; ImageNet-LT 90). Its numbers are not "
              "comparable with the paper's column.", ""]
  lines += ["Final = the last epoch (the honest figure); best = the best "
            "test epoch, which is what the reference code reports. "
            "Mean ± std over seeds.", "",
            "| cell | seeds | epochs | final top-1 | best top-1 (epoch) | "
            "head | medium | tail | paper | final − paper | best − paper |",
            "|" + "---|" * 11]
  for r in table["rows"]:
    paper = "-" if r["paper_top1"] is None else f"{r['paper_top1']:.1f}"
    if r["status"] != "done":
      lines.append(f"| {r['cell']} | - | - | not run yet | - | - | - | - | "
                   f"{paper} | - | - |")
      continue
    diff = lambda k: "-" if k not in r else f"{r[k]:+.2f}"  # noqa: E731
    lines.append(
        f"| {r['cell']} | {r['seeds']} | {r['epochs']:g} | "
        f"{_pm(r['final_top1'], r['final_top1_std'])} | "
        f"{_pm(r['best_top1'], r['best_top1_std'])} ({_epoch(r['best_epoch'])}) | "
        f"{r['head']:.2f} | {r['medium']:.2f} | {r['tail']:.2f} | {paper} | "
        f"{diff('final_minus_paper')} | {diff('best_minus_paper')} |")
  return "\n".join(lines) + "\n"


def write_tables(root: pathlib.Path, cells: list[str]) -> dict[str, Any]:
  from nc_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  table = summarize_cells(root, cells)
  workdir_lib.write_json_atomic(root / "paper_table.json", table)
  tmp = root / ".paper_table.md.tmp"
  tmp.write_text(markdown(table))
  os.replace(tmp, root / "paper_table.md")
  return table


def _in_own_flags(message: str) -> str:
  """A trainer's message in this command's flags: --data_dir for
  --config.data_dir, and the cell's folder under --root for --workdir."""
  message = message.replace("--config.data_dir", "--data_dir")
  for field, flag in (("num_seeds", "--seeds"), ("num_epochs", "--epochs"),
                      ("num_steps", "--steps")):
    message = re.sub(rf"--config\.{field}=(\S+?)([,;)\s]|$)",
                     rf"{flag} \1\2", message)
  if "--workdir" in message:
    message = (message.replace("another --workdir", "another --root")
               .replace("--workdir", "the cell folder")
               + " (--root holds one folder per cell.)")
  if "--config." in message:
    message += (" nc-jax-paper-table trains the presets as they are: give "
                "it another --root, or rerun this cell with nc-jax-train.")
  return message


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    cells = parse_cells(_CELLS.value)
    configs = {c: cell_config(c, seeds=_SEEDS.value, epochs=_EPOCHS.value,
                              steps=_STEPS.value, data_dir=_DATA_DIR.value)
               for c in cells}
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS["verbosity"].present:
    # Library INFO chatter (orbax, tfds) would drown the progress lines.
    logging.set_verbosity(logging.WARNING)
  first = configs[cells[0]]
  xla_setup.apply(first)
  from nc_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from nc_jax import train  # pylint: disable=g-import-not-at-top
  from nc_jax import validation  # pylint: disable=g-import-not-at-top
  root = cli.check_output(_ROOT.value, "--root").resolve()
  cell = cells[0]
  try:
    # Every cell is checked before any trains, once.
    layers = {}
    for cell in cells:
      layers[cell] = validation.validate_config(configs[cell])
    for i, cell in enumerate(cells):
      print(f"== cell {i + 1}/{len(cells)}: {cell} -> {root / cell}",
            flush=True)
      train.train_and_evaluate(configs[cell], root / cell,
                               validated=layers[cell])
  except (train.ConfigError, checkpoint.CheckpointError) as e:
    print(f"error: cell {cell}: {_in_own_flags(str(e))}", file=sys.stderr)
    sys.exit(2)
  table = write_tables(root, cells)
  print(markdown(table))
  print(f"wrote {root / 'paper_table.md'} and {root / 'paper_table.json'}")


def run() -> None:
  """Console entry point (`nc-jax-paper-table`)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # Flag mistakes as one `error:` line; --help lists this module's flags
  # when run as the console script.
  cli.run_app(main)


if __name__ == "__main__":
  run()
