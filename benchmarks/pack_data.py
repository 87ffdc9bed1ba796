r"""Packs what long-tailed runs of a small dataset read into one `.npz` file.

    python benchmarks/pack_data.py --dataset cifar10 \
        --data_dir cifar-10-python.tar.gz --imb_factors 0.01 \
        --out gpu_data/cifar10_lt_r0.01.npz
    python benchmarks/pack_data.py --dataset cifar100 \
        --data_dir CIFAR-100-dataset --imb_factors 0.005,0.01,0.02 \
        --out gpu_data/cifar100_lt.npz

The pack (`nc_jax.data.pack`) holds every train label and id, the images of
the long-tailed subsets asked for (their union: the largest ratio's, since
they are nested) and the whole test split, as uint8; a run reads it as its
`data_dir` and selects and trains on exactly what it would from the
dataset itself. Made for a machine that takes a limited upload: the file
must fit `--limit_mib` (default 64, a lent GPU's per-call limit, which the
working tree shares), or the command fails after writing it, saying by how
much. Prints one JSON summary (sizes in bytes and MiB, images held per
split, each ratio's subset size and its largest and smallest class).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True,
                 help="cifar10, cifar100, svhn or stl10")
  p.add_argument("--data_dir", required=True,
                 help="the dataset as a run takes it: a CIFAR release "
                 "(archive or folder), an image-folder tree or its archive, "
                 "a tfds data directory")
  p.add_argument("--imb_factors", required=True,
                 help="comma list of imbalance ratios, e.g. 0.005,0.01,0.02")
  p.add_argument("--profile", default="exp", choices=("exp", "step"))
  p.add_argument("--selection_seed", type=int, default=0)
  p.add_argument("--train_splits", default="",
                 help="comma list; empty: the dataset's (SVHN: train,extra)")
  p.add_argument("--out", required=True, help="the .npz file to write")
  p.add_argument("--limit_mib", type=float, default=64.0,
                 help="fail when the pack is larger (0: no limit)")
  args = p.parse_args(argv)
  from nc_jax.data import pack_writer  # pylint: disable=g-import-not-at-top
  try:
    ratios = [float(x) for x in args.imb_factors.split(",") if x.strip()]
  except ValueError:
    p.error(f"--imb_factors takes numbers, e.g. 0.01,0.02; got "
            f"{args.imb_factors!r}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  try:
    summary = pack_writer.pack_dataset(
        out, args.dataset, args.data_dir, imb_factors=ratios,
        profile=args.profile, selection_seed=args.selection_seed,
        train_splits=[s for s in args.train_splits.split(",") if s] or None)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary["mib"] = round(summary["bytes"] / 2**20, 2)
  summary["limit_mib"] = args.limit_mib
  print(json.dumps(summary, indent=2))
  if args.limit_mib and summary["mib"] > args.limit_mib:
    print(f"error: {out} is {summary['mib']} MiB, over --limit_mib="
          f"{args.limit_mib:g} by {summary['mib'] - args.limit_mib:.2f} MiB: "
          "pack fewer ratios (one per file), or raise the limit.",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
