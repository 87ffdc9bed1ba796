r"""Train on a long-tailed image dataset with a fixed-ETF or learnable head.

    nc-jax-train --config cifar10_r0.01_etf_dr \
      --config.data_dir=cifar-10-python.tar.gz --workdir runs/c10_etf_dr

(or `python -m nc_jax.cli.train ...` from any directory, or `python -m
experiments.cifar_lt ...` from a checkout). --config is a
preset name, a config argument for nc_jax/configs/cifar_lt.py
(`quick,method=ce`), or a config file `path/to/file.py[:ARGS]`.
Restarting the same command resumes from the newest checkpoint in --workdir.
Several hosts: start the same command on each with --coordinator_address,
--num_processes and --process_id (or nothing on Cloud TPU pods / SLURM, with
--coordinator_address=auto).
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m: the extra first, in one line
  from nc_jax.cli import exit_without_extra
  exit_without_extra("train")

import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from nc_jax.cli import app as cli
from nc_jax.kernels import xla_setup
from nc_jax import preemption
from nc_jax import schedule_fit

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A preset name (cifar10_r0.01_etf_dr), a config argument "
    "(quick,method=ce) or a config file (nc_jax/configs/cifar_lt.py:quick).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results.json; an "
    "existing one is resumed.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-host runs ('auto' on TPU pods/SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageProblem(
        f"unexpected arguments: {' '.join(argv[1:])}. Flags take the form "
        "--name=value.")
  # Import after flag parsing: the XLA defaults must be in the environment
  # before jax initialises its backends.
  config = _keep_explicit_schedule(_CONFIG.value)
  xla_setup.apply(
      config,
      multi_process=bool(_COORDINATOR.value) or (_NUM_PROCESSES.value or 1) > 1)
  if not flags.FLAGS["verbosity"].present:
    # Library INFO chatter (orbax, tfds) would drown the progress lines.
    logging.set_verbosity(logging.WARNING)
  from nc_jax import sharding
  from nc_jax import train
  try:
    sharding.maybe_initialize_distributed(_COORDINATOR.value,
                                          _NUM_PROCESSES.value,
                                          _PROCESS_ID.value)
  except ValueError as e:  # the flags (checked before any connection)
    raise cli.UsageProblem(str(e)) from None
  # Configuration, input, workdir and checkpoint problems (train.ConfigError,
  # checkpoint.CheckpointError) end as one `error:` line with exit status 2
  # (cli.run_app); anything else is a bug and keeps its traceback.
  train.train_and_evaluate(config, _WORKDIR.value)


def _keep_explicit_schedule(config):
  """`config` without the schedule fields given by --config.FIELD in
  `optim.fit_to_run`: a run shorter than the recipe scales the recipe's
  warm-up and decays, never a value the user typed."""
  given = config_flags.get_override_values(flags.FLAGS["config"])
  fit = tuple(config.optim.fit_to_run)
  keep = tuple(e for e, n in zip(fit, schedule_fit.entry_names(fit))
               if n not in given)
  if keep != fit:
    config.optim.fit_to_run = keep
  return config


def run(argv: list[str] | None = None) -> None:
  """The `nc-jax-train` console entry point."""
  preemption.exit_early_on_signals()
  cli.set_quiet_tensorflow()
  argv = cli.resolve_config_argv(sys.argv if argv is None else argv)
  cli.run_app(main, argv)


if __name__ == "__main__":
  run()
