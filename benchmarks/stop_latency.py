r"""Time from a pre-emption signal to the exit of a real training run.

    python benchmarks/stop_latency.py --data_dir cifar-10-python.tar.gz \
        [--config cifar10_r0.01_etf_dr] [--signal SIGTERM] [--out F.json]

Starts `nc-jax-train` (as `python -m experiments.train`) once per phase in
a fresh workdir, sends the signal when the run's output shows the phase,
and records how long the process took to exit, its exit status, its last
line and the checkpoint it left:

- "loading": 1 s after the start (imports, data loading);
- "compiling": when the model line is printed (the first step compiles);
- "training": at the third progress line (step 30, between evaluations);
- "evaluating": right after the progress line of the step an evaluation
  follows (the run evaluates every 20 steps here, so the signal finds the
  first evaluation, with its compilation, in progress).

Prints one JSON object (and writes it to --out). The figures for the CIFAR
preset on 2 cores are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def one(phase: str, args) -> dict:
  wd = pathlib.Path(tempfile.mkdtemp(prefix=f"stop-{phase}-"))
  cmd = [sys.executable, "-u", "-m", "nc_jax.cli.train", "--config",
         args.config, f"--config.data_dir={args.data_dir}",
         "--config.eval_every_epochs=0", "--config.eval_every_steps=20",
         "--config.log_every_steps=10", f"--workdir={wd / 'run'}"]
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, sent = [], {}
  sig = getattr(signal, args.signal)

  def send():
    if not sent:
      sent["t"] = time.monotonic()
      proc.send_signal(sig)

  if phase == "loading":
    threading.Timer(1.0, send).start()
  progress = 0
  for line in proc.stdout:
    lines.append(line.rstrip())
    if phase == "compiling" and line.startswith("model:"):
      send()
    if line.startswith("[") and "step " in line:
      progress += 1
      if phase == "training" and progress == 3:
        send()
      if phase == "evaluating" and " step 20/" in line:
        send()
  proc.wait()
  t = time.monotonic() - sent["t"] if sent else None
  ckpts = sorted(int(p.name) for p in (wd / "run" / "checkpoints").glob("*")
                 if p.name.isdigit()) if (wd / "run").exists() else []
  return {"phase": phase, "seconds_to_exit": None if t is None else round(t, 2),
          "exit_status": proc.returncode, "checkpoints": ckpts,
          "evaluations_logged": sum(l.startswith("eval ") for l in lines),
          "last_line": next((l for l in reversed(lines) if l.strip()), "")}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data_dir", required=True)
  p.add_argument("--config", default="cifar10_r0.01_etf_dr")
  p.add_argument("--signal", default="SIGTERM", choices=("SIGTERM", "SIGINT"))
  p.add_argument("--phases", default="loading,compiling,training,evaluating")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  out = {"config": args.config, "signal": args.signal, "cpus": os.cpu_count(),
         "runs": [one(ph, args) for ph in args.phases.split(",")]}
  text = json.dumps(out, indent=2)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
