#!/usr/bin/env bash
# The full-budget CIFAR-10-LT runs still owed to docs/results.md, in order,
# one after the other (each about 2.5 hours on a 2-core CPU):
#
#   git worktree add --detach ../run-c10 HEAD       # a fixed commit
#   cd ../run-c10 && nohup bash benchmarks/long_runs.sh \
#       /path/to/cifar-10-python.tar.gz ~/nc_jax_runs >> ~/nc_jax_runs/queue.log 2>&1 &
#
# A run whose workdir exists resumes; a finished one prints "nothing to do"
# and the next starts. Package each finished one with
# benchmarks/package_run.py. Runs already committed under results/ are
# listed as comments, so the order stays on record.
set -u
if [ $# -ne 2 ]; then
  echo "usage: bash benchmarks/long_runs.sh CIFAR10_RELEASE RUNS_DIR" >&2
  exit 2
fi
DATA=$1
RUNS=$2
if [ ! -e "$DATA" ]; then
  echo "error: $DATA does not exist: pass the CIFAR-10 python release" \
       "(cifar-10-python.tar.gz)" >&2
  exit 2
fi
mkdir -p "$RUNS"
cd "$(dirname "$0")/.."

run() {  # NAME CONFIG_ARG [--config.FIELD=VALUE ...]
  local name=$1 config=$2
  shift 2
  echo "== $(date -u +%FT%TZ) start $name ($config $*) at $(git rev-parse --short HEAD)"
  python -m experiments.cifar_lt --config "$config" \
      --config.data_dir="$DATA" --workdir "$RUNS/$name" "$@"
  echo "== $(date -u +%FT%TZ) end $name rc=$?"
}

# r = 0.005 (issue 32). Committed under results/cifar10_lt_r0.005_original_pixels/:
# c10_r0.005_etf_dr_s0 (etf_dr), c10_r0.005_ce_s0 (ce; cifar10_r0.005_ce),
# c10_r0.005_etf_dr_s1 (etf_dr_seed1; cifar10_r0.005_etf_dr,seed=1).
run c10_r0.005_ce_s1 cifar10_r0.005_ce,seed=1
run c10_r0.005_erm_s0 cifar10_r0.005_ce --config.mixup_alpha=0
# r = 0.01, the third seed of each method.
run c10_r0.01_etf_dr_s2 cifar10_r0.01_etf_dr,seed=2
run c10_r0.01_ce_s2 cifar10_r0.01_ce,seed=2
