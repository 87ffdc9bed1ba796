"""Data parallelism: 8 fake devices vs 1, and 2 real processes vs 1.

Both run in subprocesses: the device count of a JAX process is fixed when
it starts.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocess runs: several devices, processes, signals

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
  """The suite's environment for a child. It keeps the suite's XLA_FLAGS
  (tests/conftest.py: quick compilation): these tests compare runs with
  each other, all compiled alike; tests/test_cli.py runs the commands with
  the flags users get."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=str(REPO))
  env.update(extra)
  return env


def test_eight_fake_devices_match_one():
  """The fixed-ETF method and a learnt head, in one process."""
  methods = ["etf_dr", "ce"]
  flags = " ".join([os.environ.get("XLA_FLAGS", ""),
                    "--xla_force_host_platform_device_count=8"]).strip()
  out = subprocess.run(
      [sys.executable, str(REPO / "tests" / "multidevice_step.py"), *methods],
      env=_env(XLA_FLAGS=flags),
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(l) for l in out.stdout.strip().splitlines()
           if l.startswith("{")]
  assert [r["method"] for r in lines] == methods, out.stdout[-2000:]
  for r in lines:
    np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=1e-4)
    assert r["max_param_diff"] < 1e-4, r
    assert r["refused"] and "multiple of 8" in r["refused"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


STEPS = 30


def _cli(workdir, data_dir, *extra):
  return [sys.executable, "-m", "nc_jax.cli.train",
          "--config", str(REPO / "nc_jax/configs/cifar_lt.py")
          + f":tiny,steps={STEPS},imb=0.1",
          "--config.backbone=resnet8", f"--config.data_dir={data_dir}",
          "--config.eval_batch_size=20", "--config.checkpoint_every_epochs=0",
          "--config.checkpoint_every_steps=3", "--config.eval_every_epochs=0",
          "--config.eval_every_steps=15", f"--workdir={workdir}",
          # One process would pick the oneDNN kernels, two XLA's: fix the
          # kernels so that the runs differ only in how the data is split.
          "--config.conv_impl=xla", *extra]


@pytest.fixture(scope="module")
def baseline(tiny_image_folder, tmp_path_factory):
  """An uninterrupted single-process run through the CLI.

  It runs from another directory with a relative --workdir, as users do.
  """
  wd = tmp_path_factory.mktemp("baseline")
  out = subprocess.run(_cli(wd.name, tiny_image_folder), env=_env(),
                       cwd=wd.parent, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads((wd / "results.json").read_text())


def test_sigkill_and_restart_equals_uninterrupted(tiny_image_folder, tmp_path,
                                                  baseline):
  wd = tmp_path / "killed"
  proc = subprocess.Popen(_cli(wd, tiny_image_folder), env=_env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while not (wd / "checkpoints" / "3").is_dir():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (wd / "results.json").exists(), "killed too late to test resume"
  out = subprocess.run(_cli(wd, tiny_image_folder), env=_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from the checkpoint at step" in out.stdout
  resumed = json.loads((wd / "results.json").read_text())
  assert resumed["final"] == baseline["final"]
  assert resumed["best"] == baseline["best"]


def _two_processes(workdir, data_dir, *extra):
  port = _free_port()
  return [subprocess.Popen(
      _cli(workdir, data_dir, f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}", *extra),
      env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]


@pytest.fixture(scope="module")
def two_process_run(tiny_image_folder, tmp_path_factory):
  """An uninterrupted two-process run: (results, logs)."""
  wd = tmp_path_factory.mktemp("two")
  procs = _two_processes(wd, tiny_image_folder)
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return json.loads((wd / "results.json").read_text()), logs


def test_two_processes_match_one(two_process_run, baseline):
  two, logs = two_process_run
  assert "2 device(s) over 2 process(es)" in logs[0]
  one = baseline
  assert one["provenance"]["command"].startswith(
      "python -m nc_jax.cli.train --config ")
  assert two["train_counts"] == one["train_counts"]
  assert two["final"]["num_examples"] == one["final"]["num_examples"] == 60
  # Same data and steps; only the order of the cross-device sums differs,
  # and 30 steps amplify it. The eval loss of etf_dr is the DR loss (about
  # 0.14 here), a small squared quantity: 1% covers float noise, not a
  # different data split.
  np.testing.assert_allclose(two["final"]["loss"], one["final"]["loss"],
                             rtol=1e-2)
  assert abs(two["final"]["top1"] - one["final"]["top1"]) <= 100 / 60 + 1e-9


def test_cli_stops_on_bad_overrides_with_one_message(tmp_path):
  base = [sys.executable, "-m", "experiments.cifar_lt", "--config",
          str(REPO / "experiments/configs/cifar_lt.py") + ":dataset=cifar10",
          f"--workdir={tmp_path / 'w'}"]
  typo = subprocess.run(base + ["--config.num_epoch=3"], env=_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert typo.returncode == 2
  assert "Did you mean --config.num_epochs?" in typo.stderr
  assert "Traceback" not in typo.stderr
  ratio = subprocess.run(
      base + ["--config.imb_factor=1.5", f"--config.data_dir={tmp_path}"],
      env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert ratio.returncode == 2
  assert "error: imb_factor=1.5 is outside (0, 1]" in ratio.stderr
  assert "Traceback" not in ratio.stderr
  assert not (tmp_path / "w").exists()


# --------------------------------------------------------------- pre-emption
# Checkpoints only where a stop asks for one, so that the resumed run starts
# from the signal's step, not from a periodic checkpoint.
NO_PERIODIC = "--config.checkpoint_every_steps=1000"


def _wait_for_step(wd, proc, at_least):
  """Blocks until metrics.jsonl shows a train step >= `at_least`."""
  deadline = time.time() + 300
  while True:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "training did not get going"
    path = wd / "metrics.jsonl"
    if path.is_file():
      steps = [json.loads(l)["step"] for l in path.read_text().splitlines()
               if l.strip().endswith("}")]
      if steps and max(steps) >= at_least:
        return
    time.sleep(0.05)


def _signals_at_default():
  """For the child: SIGHUP and SIGINT as a terminal would hand them over,
  whatever this suite inherited (nohup ignores SIGHUP, a background job
  SIGINT)."""
  signal.signal(signal.SIGHUP, signal.SIG_DFL)
  signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig,twice", [(signal.SIGTERM, False),
                                       (signal.SIGHUP, False),
                                       (signal.SIGINT, True)])
def test_signal_saves_at_a_step_and_resumes_exactly(tiny_image_folder,
                                                    tmp_path, baseline, sig,
                                                    twice):
  """SIGTERM, SIGHUP (a closed terminal) and SIGINT to the CLI. With
  `twice`, a second Ctrl-C follows 0.3 s after the stop's checkpoint is
  written: the process ends with status 75, never claiming that nothing
  was saved."""
  wd = tmp_path / "stopped"
  proc = subprocess.Popen(_cli(wd, tiny_image_folder, NO_PERIODIC), env=_env(),
                          cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=_signals_at_default)
  _wait_for_step(wd, proc, 5)
  t = time.time()
  proc.send_signal(sig)
  if twice:
    while not any(p.name.isdigit() for p in (wd / "checkpoints").iterdir()):
      assert time.time() - t < 60, "the stop saved no checkpoint"
      time.sleep(0.01)
    time.sleep(0.3)
    if proc.poll() is None:
      proc.send_signal(sig)
  err = proc.communicate(timeout=60)[1]
  assert proc.returncode == 75, err[-3000:]
  assert time.time() - t < 30
  assert "Traceback" not in err and "nothing to save" not in err, err[-3000:]
  line = [l for l in err.splitlines() if l.startswith("stopped: ")]
  if twice:
    # The last line names the saved step, whichever handler took the
    # second signal: the run's (still stopping), the one left for the
    # shutdown, or none (it came after the `stopped:` line).
    last = err.strip().splitlines()[-1]
    assert re.search(r"(checkpoint|stopped by SIGINT) at step \d+", last), err
    step = int(re.search(r"at step (\d+)", last).group(1))
  else:
    assert len(line) == 1, err[-3000:]
    assert f"stopped by {sig.name} at step" in line[0]
    assert "Run the same command to resume" in line[0]
    step = int(line[0].split(" at step ")[1].split(":")[0])
  assert 5 <= step < STEPS
  assert (wd / "checkpoints" / str(step)).is_dir()
  assert not (wd / "results.json").exists()
  out = subprocess.run(_cli(wd, tiny_image_folder, NO_PERIODIC), env=_env(),
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from the checkpoint at step {step}" in out.stdout
  resumed = json.loads((wd / "results.json").read_text())
  assert resumed["final"] == baseline["final"]
  assert resumed["best"] == baseline["best"]
  assert resumed["provenance"]["resumes"] == 1


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    tiny_image_folder, tmp_path, two_process_run):
  wd = tmp_path / "two_stopped"
  procs = _two_processes(wd, tiny_image_folder, NO_PERIODIC)
  deadline = time.time() + 300
  while not (wd / "metrics.jsonl").is_file() or max(
      [json.loads(l)["step"] for l in
       (wd / "metrics.jsonl").read_text().splitlines()
       if l.strip().endswith("}")] or [0]) < 5:
    assert all(p.poll() is None for p in procs), procs[0].stdout.read()
    assert time.time() < deadline
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  logs = [p.communicate(timeout=120)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 75, log[-3000:]
  steps = {int(log.split("stopped by ")[1].split(" at step ")[1].split(":")[0])
           for log in logs}
  assert len(steps) == 1, logs  # one step, agreed by both
  step = steps.pop()
  assert step < STEPS and (wd / "checkpoints" / str(step)).is_dir()
  procs = _two_processes(wd, tiny_image_folder, NO_PERIODIC)
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert f"resumed from the checkpoint at step {step}" in logs[0]
  resumed = json.loads((wd / "results.json").read_text())
  uninterrupted, _ = two_process_run
  assert resumed["final"] == uninterrupted["final"]
  assert resumed["best"] == uninterrupted["best"]
