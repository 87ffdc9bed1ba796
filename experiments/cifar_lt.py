r"""Train on a long-tailed image dataset with a fixed-ETF or learnable head.

    python -m experiments.cifar_lt \
      --config experiments/configs/cifar_lt.py:dataset=cifar10,imb=0.01,method=etf_dr \
      --config.data_dir=/path/to/cifar10_jpeg --workdir runs/c10_etf_dr

Restarting the same command resumes from the newest checkpoint in --workdir.
Several hosts: start the same command on each with --coordinator_address,
--num_processes and --process_id (or nothing on Cloud TPU pods / SLURM, with
--coordinator_address=auto).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import xla_defaults

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/configs/cifar_lt.py:quick.",
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


_FLAGS_PARSED = False


def main(argv: list[str]) -> None:
  global _FLAGS_PARSED
  _FLAGS_PARSED = True
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # Import after flag parsing: the XLA defaults must be in the environment
  # before jax initialises its backends.
  config = _CONFIG.value
  xla_defaults.apply(
      backbone=config.backbone, compute_dtype=config.compute_dtype,
      conv_impl=config.conv_impl,
      multi_process=bool(_COORDINATOR.value) or (_NUM_PROCESSES.value or 1) > 1)
  if not flags.FLAGS["verbosity"].present:
    # Library INFO chatter (orbax, tfds) would drown the progress lines.
    logging.set_verbosity(logging.WARNING)
  from nc_jax import sharding
  from nc_jax import train
  sharding.maybe_initialize_distributed(_COORDINATOR.value,
                                        _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  from nc_jax import checkpoint
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except (train.ConfigError, checkpoint.CheckpointError) as e:
    # Configuration, input and checkpoint problems: one clear message naming
    # the fix, no traceback. Anything else is a bug and keeps its traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    app.run(main)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if _FLAGS_PARSED:
      raise
    # A --config.FIELD override that the locked config refuses (misspelt
    # field, wrong type): say which, without ml_collections' traceback.
    msg = " ".join(re.sub(r"\\n|[\\'\"]", " ", str(e)).split())
    print(f"error: bad --config override: {msg}. Fields are listed in "
          "experiments/configs/cifar_lt.py.", file=sys.stderr)
    sys.exit(2)
