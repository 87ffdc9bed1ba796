"""Data parallelism: 8 fake devices vs 1, and 2 real processes vs 1.

Both run in subprocesses: the device count of a JAX process is fixed when
it starts.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=str(REPO))
  env.update(extra)
  return env


@pytest.mark.parametrize("method", ["etf_dr", "ce"])
def test_eight_fake_devices_match_one(method):
  out = subprocess.run(
      [sys.executable, str(REPO / "tests" / "multidevice_step.py"), method],
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=1e-4)
  assert r["max_param_diff"] < 1e-4, r
  assert r["refused"] and "multiple of 8" in r["refused"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


STEPS = 30


def _cli(workdir, data_dir, *extra):
  return [sys.executable, "-m", "experiments.cifar_lt",
          "--config", str(REPO / "experiments/configs/cifar_lt.py")
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


def test_two_processes_match_one(tiny_image_folder, tmp_path, baseline):
  port = _free_port()
  procs = [subprocess.Popen(
      _cli(tmp_path / "two", tiny_image_folder,
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}"),
      env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert "2 device(s) over 2 process(es)" in logs[0]
  two = json.loads((tmp_path / "two" / "results.json").read_text())
  one = baseline
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
  assert "Did you mean num_epochs" in typo.stderr
  assert "Traceback" not in typo.stderr
  ratio = subprocess.run(
      base + ["--config.imb_factor=1.5", f"--config.data_dir={tmp_path}"],
      env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert ratio.returncode == 2
  assert "error: imb_factor=1.5 is outside (0, 1]" in ratio.stderr
  assert "Traceback" not in ratio.stderr
  assert not (tmp_path / "w").exists()
