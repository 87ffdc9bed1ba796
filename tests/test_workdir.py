"""The workdir: its lock (one live run), and what a rerun may reuse.

The two-process test of the lock through the command line is in
tests/test_cli.py; these check the rules one by one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from nc_jax import run_config
from nc_jax import run_setup
from nc_jax import train
from nc_jax import workdir as workdir_lib
from tests.test_train import tiny_config


def _write_lock(wd, **record):
  wd.mkdir(parents=True, exist_ok=True)
  base = {"host": socket.gethostname(), "pid": os.getpid(),
          "proc_start": workdir_lib._proc_start(os.getpid()),
          "started": "2026-01-01T00:00:00+00:00", "command": "train",
          "token": "x" * 32}
  (wd / workdir_lib.LOCK_NAME).write_text(json.dumps({**base, **record}))
  return json.loads((wd / workdir_lib.LOCK_NAME).read_text())


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_hold_writes_the_holder_and_releases(tmp_path):
  wd = tmp_path / "new" / "run"
  with workdir_lib.hold(wd) as path:
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid()
    assert holder["host"] == socket.gethostname()
    with pytest.raises(workdir_lib.WorkdirLocked, match="in use by a live run"):
      workdir_lib.check_free(wd)
  assert not path.exists()
  assert sorted(p.name for p in wd.iterdir()) == []  # no temporaries left


def test_released_on_an_exception(tmp_path):
  with pytest.raises(KeyError):
    with workdir_lib.hold(tmp_path):
      raise KeyError("crash")
  assert not (tmp_path / workdir_lib.LOCK_NAME).exists()


def test_live_holder_on_this_host_is_refused(tmp_path):
  # The parent process (pytest's runner) is alive, on this host.
  ppid = os.getppid()
  _write_lock(tmp_path, pid=ppid, proc_start=workdir_lib._proc_start(ppid))
  with pytest.raises(workdir_lib.WorkdirLocked,
                     match=rf"in use by a live run: pid {ppid} on host "
                     rf"{socket.gethostname()}.*kill {ppid}"):
    with workdir_lib.hold(tmp_path):
      pass


def test_dead_holder_is_taken_over(tmp_path):
  _write_lock(tmp_path, pid=_dead_pid(), proc_start=None)
  workdir_lib.check_free(tmp_path)  # a stale lock does not count
  with workdir_lib.hold(tmp_path) as path:
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert not list(tmp_path.iterdir())


def test_reused_pid_is_taken_over(tmp_path):
  # A live pid that started after the lock was written (a reboot, a
  # container restart) is not the holder.
  _write_lock(tmp_path, pid=os.getppid(), proc_start="1")
  with workdir_lib.hold(tmp_path) as path:
    assert json.loads(path.read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("record", [
    {"host": "some-other-host"},
    None,  # unreadable
])
def test_unverifiable_lock_is_refused_with_the_fix(tmp_path, record):
  if record is None:
    (tmp_path / workdir_lib.LOCK_NAME).write_text("{garbage")
  else:
    _write_lock(tmp_path, **record)
  lock = tmp_path / workdir_lib.LOCK_NAME
  with pytest.raises(workdir_lib.WorkdirLocked,
                     match=rf"cannot be checked from host .*remove {lock}"):
    with workdir_lib.hold(tmp_path):
      pass
  assert lock.exists()  # never removed for the user


def test_config_without_checkpoint_does_not_block(tiny_image_folder,
                                                  tmp_path):
  """A run that stopped before its first checkpoint (here: an earlier
  config, and its progress records) leaves nothing a rerun must respect."""
  wd = tmp_path / "run"
  wd.mkdir()
  old = run_config.config_to_dict(tiny_config(tiny_image_folder,
                                            arg="method=ce,steps=9"))
  (wd / "config.json").write_text(json.dumps(old))
  (wd / "metrics.jsonl").write_text(
      json.dumps({"step": 7, "kind": "train", "loss": 9.9}) + "\n")
  config = tiny_config(tiny_image_folder, arg="steps=2")
  train.train_and_evaluate(config, wd)
  assert json.loads((wd / "config.json").read_text())["method"] == "etf_dr"
  steps = [json.loads(l)["step"] for l in
           (wd / "metrics.jsonl").read_text().splitlines()]
  assert 7 not in steps and max(steps) == 2
  assert not (wd / workdir_lib.LOCK_NAME).exists()


def test_workdir_in_use_stops_before_any_work(tiny_image_folder, tmp_path):
  wd = tmp_path / "run"
  ppid = os.getppid()
  _write_lock(wd, pid=ppid, proc_start=workdir_lib._proc_start(ppid))
  with pytest.raises(train.ConfigError, match="in use by a live run"):
    train.train_and_evaluate(tiny_config(tiny_image_folder), wd)
  assert sorted(p.name for p in wd.iterdir()) == [workdir_lib.LOCK_NAME]


def test_config_json_from_before_etf_rotation_resumes(tmp_path):
  """A workdir written before `etf_rotation` existed ran the Gaussian ETF:
  it resumes as `gaussian`, and the presets' newer default (the reference's
  draw) is refused with the flag that resumes it."""
  config = tiny_config(str(tmp_path / "data"))
  assert config.etf_rotation == "uniform01"  # the presets' default
  config.etf_rotation = "gaussian"
  old = run_config.config_to_dict(config)
  del old["etf_rotation"]
  # Fields added later still (fine-tuning): their absence means their
  # defaults, nested ones included.
  for name in ("pretrained", "pretrained_required", "crop_min_area"):
    del old[name]
  del old["optim"]["backbone_lr_scale"]
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps(old))
  run_config.check_resume(tmp_path, config)
  config.etf_rotation = "uniform01"
  with pytest.raises(ValueError, match="etf_rotation: 'gaussian' in the wo"
                     "(.|\n)*default was 'gaussian' until(.|\n)*"
                     "same config [(]--config.etf_rotation=gaussian[)]"):
    run_config.check_resume(tmp_path, config)
  from nc_jax import run_sources
  loaded = run_sources._config_from_dict(old)  # pylint: disable=protected-access
  assert loaded.etf_rotation == "gaussian" and loaded.pretrained is None
  assert loaded.optim.backbone_lr_scale == 1.0


@pytest.mark.parametrize("arg,steps_per_epoch", [
    ("tiny,steps=4", 9),  # the fingerprint runs' form
    ("cifar10_r0.01_etf_dr,steps=300", 96),
    ("cifar10_r0.01_etf_dr,epochs=20", 96),  # nc-jax-paper-table --epochs
])
def test_a_short_run_written_before_the_schedule_fit_resumes(
    tmp_path, arg, steps_per_epoch):
  """A workdir written before `epochs=N`/`steps=N` scaled the schedule
  recorded the schedule it trained, without `fit_to_run`: the same command
  resumes it, in the schedule it trains, and another schedule is refused."""
  from nc_jax import schedule_fit  # pylint: disable=g-import-not-at-top
  from nc_jax import validation  # pylint: disable=g-import-not-at-top
  from nc_jax.configs import cifar_lt  # pylint: disable=g-import-not-at-top
  request = cifar_lt.get_config(arg)
  fitted, _, note = validation.validate_length(request, steps_per_epoch)
  assert (note is None) == arg.startswith("tiny")  # tiny has no schedule
  old = run_config.config_to_dict(fitted)
  del old["optim"]["fit_to_run"], old["optim"]["fit_from_epochs"]
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps(old))
  run_config.check_resume(tmp_path, request, before_fit=True)
  run_config.check_resume(tmp_path, fitted)
  changed = fitted.copy_and_resolve_references()
  changed.optim.warmup_epochs = 3
  with pytest.raises(ValueError, match="optim.warmup_epochs"):
    run_config.check_resume(tmp_path, changed)
  assert schedule_fit.FIT_FIELDS[0] == "optim.warmup_epochs"


def test_config_mismatch_names_the_flags_that_resume(tmp_path):
  """The refusal quotes each differing field's recorded value as the
  override that resumes the run, shell-quoted where it is a tuple."""
  config = tiny_config(str(tmp_path / "data"))
  old = run_config.config_to_dict(config)
  old["optim"]["decay_epochs"] = [160, 180]
  old["mixup_alpha"] = 0.0
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(ValueError) as e:
    run_config.check_resume(tmp_path, config)
  msg = str(e.value)
  assert "--config.mixup_alpha=0.0" in msg
  assert "'--config.optim.decay_epochs=(160, 180)'" in msg
  assert "default was" not in msg


def _finished_workdir(path, config, results=None):
  """A workdir as a finished run leaves it (no checkpoints needed here)."""
  path.mkdir()
  (path / "config.json").write_text(json.dumps(
      run_config.config_to_dict(config)))
  (path / "results.json").write_text(
      json.dumps({"final": {"top1": 12.5}}) if results is None else results)
  return path


def test_a_finished_run_is_returned_only_for_its_own_config(
    tiny_image_folder, tmp_path):
  """Rerunning a finished command returns its results.json; another config
  there (a typo in --config, another seed) is refused, not reported as
  done, and the finished run's files stay as they were."""
  config = tiny_config(tiny_image_folder)
  wd = _finished_workdir(tmp_path / "done", config)
  before = {p.name: p.read_bytes() for p in wd.iterdir()}
  assert train.train_and_evaluate(config, wd) == {"final": {"top1": 12.5}}
  other = tiny_config(tiny_image_folder, seed=3, method="ce")
  with pytest.raises(train.ConfigError,
                     match=r"holds a finished run of a different config "
                     r"\(method: 'etf_dr' in the workdir, 'ce' now; seed: 0 "
                     r"in the workdir, 3 now\); its results are kept\. "
                     r"Train the new config in another --workdir"):
    train.train_and_evaluate(other, wd)
  assert {p.name: p.read_bytes() for p in wd.iterdir()} == before


def test_a_damaged_results_json_is_named(tiny_image_folder, tmp_path):
  config = tiny_config(tiny_image_folder)
  wd = _finished_workdir(tmp_path / "done", config, results="\x00\xff")
  with pytest.raises(train.ConfigError,
                     match="results.json is not a results file of nc_jax"):
    train.train_and_evaluate(config, wd)


@pytest.mark.parametrize("workdir", ["", "  ", None])
def test_an_empty_workdir_is_refused(tiny_image_folder, tmp_path,
                                    monkeypatch, workdir):
  """`--workdir=` (an unset shell variable) would otherwise train into
  the working directory."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(train.ConfigError, match="--workdir is empty"):
    train.train_and_evaluate(tiny_config(tiny_image_folder), workdir)
  assert not list(tmp_path.iterdir())


def test_a_finished_runs_schedule_and_classifier_are_compared_as_trained(
    tiny_image_folder, tmp_path):
  """The request is fitted to the finished run's length before the
  comparison: the same short command matches the fitted schedule it
  recorded, a changed warm-up does not; a learnable classifier's run
  ignores the ETF's fields."""
  from nc_jax import validation  # pylint: disable=g-import-not-at-top
  from nc_jax.configs import cifar_lt  # pylint: disable=g-import-not-at-top

  def request(arg, **over):
    c = cifar_lt.get_config(arg)
    with c.unlocked():
      c.data_dir = str(tiny_image_folder)
      for k, v in over.items():
        *path, last = k.split(".")
        target = c
        for p in path:
          target = target[p]
        target[last] = v
    return c

  spe = 96
  short = request("cifar10_r0.01_etf_dr,epochs=20")
  fitted, total, note = validation.validate_length(short, spe)
  assert note and fitted.optim.decay_epochs != short.optim.decay_epochs
  results = {"final": {"top1": 1.0},
             "history": [{"epoch": total / spe, "step": total}]}
  wd = _finished_workdir(tmp_path / "short", fitted,
                         results=json.dumps(results))
  run_setup.finished_results(short, wd)
  with pytest.raises(train.ConfigError, match="optim.warmup_epochs"):
    run_setup.finished_results(
        request("cifar10_r0.01_etf_dr,epochs=20", **{"optim.warmup_epochs": 2}),
        wd)
  full = request("cifar10_r0.01_ce")
  results["history"][-1]["epoch"] = 200.0
  wd = _finished_workdir(tmp_path / "ce", full, results=json.dumps(results))
  with pytest.raises(train.ConfigError, match="optim.decay_epochs"):
    run_setup.finished_results(
        request("cifar10_r0.01_ce", **{"optim.decay_epochs": (120, 160)}), wd)
  run_setup.finished_results(request("cifar10_r0.01_ce",
                                     etf_rotation="gaussian"), wd)


@pytest.mark.parametrize("workdir", ["gs://bucket/run", "s3://b/r"])
def test_a_url_workdir_is_refused_with_the_way_to_use_a_bucket(workdir):
  with pytest.raises(ValueError, match="is a URL.*Mount the bucket"):
    workdir_lib.resolve_path(workdir)
