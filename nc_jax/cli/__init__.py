"""The commands: `nc-jax-train`, `nc-jax-evaluate`, `nc-jax-report`,
`nc-jax-paper-table` (`python -m nc_jax.cli.<module>` alike).

The console scripts enter through the functions below, which first check
that the `train` extra is installed and say so in one `error:` line if it
is not; each command's module then parses its flags (`app.run_app`).
"""

from __future__ import annotations

import importlib
import sys

from nc_jax import extras
from nc_jax import preemption

_COMMANDS = {"train": "nc-jax-train", "evaluate": "nc-jax-evaluate",
             "report": "nc-jax-report", "paper_table": "nc-jax-paper-table"}


def exit_without_extra(module: str) -> None:
  """Ends the process with one `error:` line (status 2) when the command
  in `nc_jax.cli.<module>` cannot run without a missing extra; called
  before that module's own imports (the console scripts, `python -m`)."""
  needs = extras.REPORT if module == "report" else extras.TRAIN
  try:
    extras.require(_COMMANDS[module], needs)
  except ImportError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def _run(module: str) -> None:
  if module == "train":  # a signal during the imports: one line, no trace
    preemption.exit_early_on_signals()
  exit_without_extra(module)
  importlib.import_module(f"nc_jax.cli.{module}").run()


def nc_jax_train() -> None:
  """`nc-jax-train`."""
  _run("train")


def nc_jax_evaluate() -> None:
  """`nc-jax-evaluate`."""
  _run("evaluate")


def nc_jax_report() -> None:
  """`nc-jax-report`."""
  _run("report")


def nc_jax_paper_table() -> None:
  """`nc-jax-paper-table`."""
  _run("paper_table")
