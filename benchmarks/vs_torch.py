r"""JAX train step against the authors' PyTorch step, interleaved, one machine.

    python benchmarks/vs_torch.py [--rounds 3] [--batch_size 128] \
        [--jax_args="--conv_impl xla"]

Runs `python -m experiments.benchmark --json` and
`benchmarks/torch_reference.py` alternately, `--rounds` times each, in fresh
processes (so neither warms the other's caches or threads), and prints one
line per run and then the medians and their ratio. Interleaving matters on
a shared or virtualised machine, whose speed drifts between minutes.
With `--json` it prints only one JSON object with every run and the ratio.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_json(cmd: list[str]) -> dict:
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                     f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--threads", type=int, default=2,
                 help="PyTorch intra-op threads.")
  p.add_argument("--jax_args", default="",
                 help="Extra flags for experiments.benchmark.")
  p.add_argument("--json", action="store_true")
  args = p.parse_args()
  jax_cmd = [sys.executable, "-m", "experiments.benchmark", "--json",
             f"--batch_size={args.batch_size}", *shlex.split(args.jax_args)]
  torch_cmd = [sys.executable, str(REPO / "benchmarks" / "torch_reference.py"),
               f"--batch_size={args.batch_size}", f"--threads={args.threads}"]
  runs = {"jax": [], "torch": []}
  for r in range(args.rounds):
    for name, cmd in (("torch", torch_cmd), ("jax", jax_cmd)):
      out = _run_json(cmd)
      runs[name].append(out)
      if not args.json:
        print(f"round {r + 1} {name:5s} {out['train_step_ms_median']:8.1f} ms"
              f"  {out['train_images_per_sec']:6.1f} images/s", flush=True)
  med = {k: statistics.median(o["train_images_per_sec"] for o in v)
         for k, v in runs.items()}
  summary = {
      "jax_images_per_sec_median": med["jax"],
      "torch_images_per_sec_median": med["torch"],
      "ratio_jax_over_torch": round(med["jax"] / med["torch"], 3),
      "rounds": args.rounds, "batch_size": args.batch_size,
      "jax_conv_impl": runs["jax"][0].get("conv_impl"),
      "jax_norm_impl": runs["jax"][0].get("norm_impl"),
      "torch_version": runs["torch"][0].get("torch_version"),
  }
  if args.json:
    print(json.dumps({**summary, "runs": runs}))
    return
  print(f"median: jax {med['jax']:.1f} images/s, torch {med['torch']:.1f} "
        f"images/s, ratio jax/torch {summary['ratio_jax_over_torch']:.2f}")


if __name__ == "__main__":
  main()
