"""The command line as a user meets it: input mistakes, entry points, lock.

Every command runs in a subprocess from a directory other than the
repository root. An input mistake must end with one `error:` line that
names the fix, exit status 2, no traceback, and nothing written into the
workdir. Config mistakes stop before jax is imported (under a second each);
data and workdir mistakes use the tiny image folder and a tiny config.
"""

from __future__ import annotations

import ast
import configparser
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # the command line in subprocesses

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny,steps=4,imb=0.1", "--config.backbone=resnet8"]


def _env(**extra):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=str(REPO))
  env.update(extra)
  return env


def _run(args, cwd, module="nc_jax.cli.train", timeout=300, **env):
  return subprocess.run([sys.executable, "-m", module, *map(str, args)],
                        cwd=cwd, env=_env(**env), capture_output=True,
                        text=True, timeout=timeout)


def _assert_clean_error(out, *fragments):
  """Exit 2, exactly one `error:` line holding `fragments`, no traceback."""
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  for f in fragments:
    assert f in errors[0], (f, errors[0])
  return errors[0]


# ----------------------------------------------------------- config mistakes
@pytest.mark.parametrize("config,fragments", [
    ("experiments/configs/cifar_lt.py:datset=cifar10",
     ["Unknown config argument 'datset'", "Did you mean 'dataset'"]),
    ("quik", ["Unknown config variant or preset 'quik'",
              "Did you mean 'quick'"]),
    ("cifar10_r0.01_etfdr", ["Did you mean 'cifar10_r0.01_etf_dr'"]),
    ("configs/nowhere.py:quick", ["config file configs/nowhere.py not found",
                                  "a preset name"]),
])
def test_config_argument_mistakes(tmp_path, config, fragments):
  out = _run(["--config", config, "--workdir", "w"], cwd=tmp_path,
             timeout=60)
  _assert_clean_error(out, *fragments)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args,fragments", [
    (["--workdir", "w"], ["--config is required", "a preset name"]),
    (["--config", "quick"], ["--workdir is required"]),
    (["--config", "quick", "--workdir", "w", "--workdri=x"],
     ["Unknown command line flag 'workdri'", "workdir"]),
    (["--config", "quick", "--workdir", "w", "--config.num_epoch=3"],
     ["bad --config override", "Did you mean --config.num_epochs?"]),
    (["--config", "quick", "--workdir", "w", "--config.optim.lrr=0.05"],
     ["--config.optim.lrr is no field", "Did you mean --config.optim.lr?",
      "nc_jax/configs/cifar_lt.py"]),
    (["--config", "quick", "--workdir", "w", "--config.lr=0.05"],
     ["--config.lr is no field", "Did you mean --config.optim.lr?"]),
    (["--config", "quick", "--workdir", "w", "--config.batch_size=abc"],
     ["--config.batch_size=abc"]),
    (["--config", "quick", "--workdir", "w", "extra"],
     ["unexpected arguments: extra"]),
])
def test_flag_mistakes(tmp_path, args, fragments):
  out = _run(args, cwd=tmp_path, timeout=120)
  _assert_clean_error(out, *fragments)
  assert not (tmp_path / "w").exists()


# ------------------------------------------------------ data and workdir
def _tree(root: pathlib.Path, src: pathlib.Path, classes=None):
  """A copy of the image folder `src` (only `classes` of it, if given)."""
  for split in ("train", "test"):
    for d in sorted((src / split).iterdir()):
      if classes is None or d.name in classes:
        shutil.copytree(d, root / split / d.name)
  return root


def _non_images(root, src):
  for split in ("train", "test"):
    for d in sorted((src / split).iterdir()):
      (root / split / d.name).mkdir(parents=True)
      (root / split / d.name / "notes.txt").write_text("not an image")
  return root


def _bad_class(root, src):
  _tree(root, src)
  for p in (root / "train" / "class_03").iterdir():
    p.with_suffix(".jpg").write_bytes(b"not a jpeg")
    p.unlink()
  return root


def _one_bad_file(root, src):
  # Not among the first images of its class that the quick check decodes:
  # found by the full decode of the data section.
  _tree(root, src)
  (root / "train" / "class_00" / "0039.png").write_bytes(b"garbage")
  return root


@pytest.mark.parametrize("case,extra,fragments", [
    ("non_images", [], ["holds class folders but no image files"]),
    ("bad_class", [], ["class_03/0000.jpg is not a readable image",
                       "Remove or replace"]),
    ("one_bad_file", [], ["class_00/0039.png is not a readable image"]),
    ("three_classes", [], ["has 3 class folders", "'cifar10' needs 10"]),
    ("batch_zero", ["--config.batch_size=0"],
     ["batch_size=0 must be a positive integer", "--config.batch_size=128"]),
    ("batch_too_big", ["--config.batch_size=1000"],
     ["fewer than one batch of 1000", "at most 159"]),
    ("negative_lr", ["--config.optim.lr=-0.1"],
     ["optim.lr must be a finite number > 0"]),
    ("nan_lr", ["--config.optim.lr=nan"], ["optim.lr=nan is not a finite"]),
])
def test_data_and_config_mistakes_write_nothing(tiny_image_folder, tmp_path,
                                                case, extra, fragments):
  data = tmp_path / "data"
  if case == "non_images":
    _non_images(data, tiny_image_folder)
  elif case == "bad_class":
    _bad_class(data, tiny_image_folder)
  elif case == "one_bad_file":
    _one_bad_file(data, tiny_image_folder)
  elif case == "three_classes":
    _tree(data, tiny_image_folder, {"class_00", "class_01", "class_02"})
  else:
    data = tiny_image_folder
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  out = _run([*TINY, f"--config.data_dir={data}", "--workdir", "w", *extra],
             cwd=cwd)
  _assert_clean_error(out, *fragments)
  assert not (cwd / "w").exists()  # nothing to block the corrected rerun


def test_divergence_is_one_error_line_with_its_own_status(tiny_image_folder,
                                                         tmp_path):
  out = _run([*TINY, f"--config.data_dir={tiny_image_folder}", "--workdir",
              "w", "--config.optim.lr=1e30"], cwd=tmp_path)
  assert out.returncode == 3, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "training diverged at step" in errors[0]
  assert "start again in a new --workdir" in errors[0]


def test_damaged_archive(tmp_path):
  (tmp_path / "data.tar.gz").write_bytes(b"\x1f\x8b" + b"not really" * 10)
  # (XLA's convolutions: no oneDNN kernels to build into the empty cache.)
  out = _run([*TINY, "--config.data_dir=data.tar.gz", "--workdir", "w",
              "--config.conv_impl=xla"],
             cwd=tmp_path, NC_JAX_CACHE=str(tmp_path / "cache"))
  _assert_clean_error(out, "data.tar.gz cannot be extracted",
                      "pass an extracted folder")
  assert not (tmp_path / "w").exists()
  assert not list((tmp_path / "cache").iterdir())  # no half extraction


def test_workdir_that_is_a_file(tiny_image_folder, tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  out = _run([*TINY, f"--config.data_dir={tiny_image_folder}",
              "--workdir", "notes.txt"], cwd=tmp_path)
  _assert_clean_error(out, "is an existing file, not a directory")
  assert (tmp_path / "notes.txt").read_text() == "mine"


def test_workdir_of_something_else(tiny_image_folder, tmp_path):
  (tmp_path / "thesis.tex").write_text("mine")
  out = _run([*TINY, f"--config.data_dir={tiny_image_folder}",
              "--workdir", "."], cwd=tmp_path)
  _assert_clean_error(out, "already holds other files (thesis.tex)",
                      "new or empty folder")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_unset_data_dir_offline_names_the_fix(tmp_path):
  """No data_dir and no internet: tfds is asked, and the error says why it
  cannot help and what --config.data_dir accepts. The proxy that refuses
  every connection stands in for a machine without internet."""
  out = _run(["--config", "quick", "--workdir", "w"], cwd=tmp_path,
             TFDS_DATA_DIR=str(tmp_path / "tfds"),
             HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
             NO_PROXY="", no_proxy="")
  _assert_clean_error(
      out, "data_dir is not set, so 'cifar10' was to come from tfds",
      f"{tmp_path / 'tfds'}", "cannot be reached", "--config.data_dir=",
      "image-folder tree", ".tar.gz", "tfds data directory")
  # tfds's own lookup warnings (a missing variant folder) are not shown.
  assert "Variant folder" not in out.stderr, out.stderr[-3000:]
  assert not (tmp_path / "w").exists()


def test_multi_process_flag_mistakes_stop_before_any_work(tmp_path):
  """--num_processes without a coordinator would train one process alone;
  a process id out of range would fail inside jax.distributed."""
  for flags, fragment in [
      (["--num_processes=2", "--process_id=1"],
       "without a coordinator address"),
      (["--coordinator_address=127.0.0.1:1", "--num_processes=2",
        "--process_id=5"], "process_id=5 with num_processes=2"),
  ]:
    out = _run([*TINY, "--config.data_dir=nowhere", "--workdir", "w",
                *flags], cwd=tmp_path)
    _assert_clean_error(out, fragment, "--coordinator_address=HOST:PORT")
  assert not (tmp_path / "w").exists()


# --------------------------------------------------------- entry points
def _console_scripts() -> dict[str, str]:
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
  return dict(tuple(s.strip() for s in l.split("=")) for l in lines)


def test_console_scripts_work_from_any_directory(tmp_path):
  scripts = _console_scripts()
  assert {"nc-jax-train", "nc-jax-report"} <= set(scripts)
  for name, target in scripts.items():
    module, func = target.split(":")
    # The command's own module (nc_jax.cli:nc_jax_train -> cli/train.py).
    path = REPO / (module.replace(".", "/")
                   + f"/{func.removeprefix('nc_jax_')}.py")
    summary = ast.get_docstring(ast.parse(path.read_text())).splitlines()[0]
    # What the installed script does: import the target and call it.
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    out = subprocess.run([sys.executable, "-c", code, "--helpshort"],
                         cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=120)
    # absl ends --help with status 1; what counts is that the entry
    # module's own flags are listed.
    assert out.returncode in (0, 1), (name, out.stderr[-2000:])
    assert summary in out.stdout, (name, out.stdout[-2000:])
    assert "\n  --" in out.stdout.split("flags:", 1)[-1], (name, out.stdout)
    assert "Traceback" not in out.stderr, (name, out.stderr[-2000:])


@pytest.mark.parametrize("config", [
    "cifar10_r0.01_etf_dr",  # a preset name
    "nc_jax/configs/cifar_lt.py:cifar10_r0.01_etf_dr",  # package-relative
    # The file's path until 2026-12-07, which older commands name.
    "experiments/configs/cifar_lt.py:cifar10_r0.01_etf_dr",
])
def test_config_by_preset_or_path_from_elsewhere(tmp_path, config):
  # The config loads (from another directory); the run then stops at the
  # data, which here does not exist.
  out = _run(["--config", config, "--config.data_dir=nowhere",
              "--workdir", "w"], cwd=tmp_path)
  _assert_clean_error(out, f"data_dir {tmp_path / 'nowhere'} does not exist")


# ------------------------------------------------------------------ lock
def test_second_run_on_a_live_workdir_stops_at_once(tiny_image_folder,
                                                   tmp_path):
  wd = tmp_path / "run"
  args = ["--config", "tiny,steps=100000,imb=0.1", "--config.backbone=resnet8",
          f"--config.data_dir={tiny_image_folder}",
          "--config.log_every_steps=1000", "--workdir", wd]
  first = subprocess.Popen(
      [sys.executable, "-m", "nc_jax.cli.train", *map(str, args)],
      cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not (wd / ".lock").exists():
      assert first.poll() is None, first.stderr.read()[-3000:]
      assert time.time() < deadline, "the first run never took the lock"
      time.sleep(0.05)
    t0 = time.time()
    second = _run(args, cwd=tmp_path)
    _assert_clean_error(second, "is in use by a live run",
                        f"pid {first.pid} on host", "use another --workdir")
    assert time.time() - t0 < 60
    assert first.poll() is None  # the first run goes on
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The killed run's lock is stale: the next run takes it over (a shorter
  # run, allowed since the first never saved a checkpoint) and releases it.
  assert (wd / ".lock").exists()
  args[1] = "tiny,steps=2,imb=0.1"
  third = _run(args, cwd=tmp_path)
  assert third.returncode == 0, third.stderr[-3000:]
  assert (wd / "results.json").exists() and not (wd / ".lock").exists()


# -------------------------------------------------------------- short runs
SHORT = ["--config.backbone=resnet8", "--config.batch_size=16",
         "--config.eval_batch_size=32"]


def test_a_short_run_of_a_preset_scales_its_schedule(tiny_image_folder,
                                                     tmp_path):
  """steps=N on a 200-epoch recipe trains, saying once how the warm-up and
  the decays were scaled; results.json records the schedule that ran."""
  out = _run(["--config", "cifar10_r0.01_etf_dr,imb=0.1,steps=3", *SHORT,
              f"--config.data_dir={tiny_image_folder}", "--workdir", "w"],
             cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [l for l in (out.stdout + out.stderr).splitlines()
           if "schedule scaled" in l]
  assert lines == [
      "schedule scaled to 3 steps (0.333 epochs), 0.00167 of the recipe's "
      "200 epochs: warm-up epochs 0 (recipe 5); decays after epochs none "
      "(recipe 160, 180)"], out.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  res = json.loads((tmp_path / "w" / "results.json").read_text())
  assert res["config"]["optim"]["warmup_epochs"] == 0
  assert res["config"]["optim"]["decay_epochs"] == []
  # config.json records the schedule the run trains too; the same command
  # resumes against it (its request fitted the same way).
  cfg = json.loads((tmp_path / "w" / "config.json").read_text())
  assert cfg["optim"]["warmup_epochs"] == 0
  assert cfg["optim"]["fit_to_run"] == [] and cfg["optim"]["decay_epochs"] == []


def test_a_schedule_field_given_on_the_command_line_is_not_scaled(
    tiny_image_folder, tmp_path):
  out = _run(["--config", "cifar10_r0.01_etf_dr,imb=0.1,steps=3", *SHORT,
              "--config.optim.warmup_epochs=5",
              f"--config.data_dir={tiny_image_folder}", "--workdir", "w"],
             cwd=tmp_path)
  _assert_clean_error(out, "optim.warmup_epochs=5 is not shorter than the run",
                      "set explicitly and is kept as given")
  assert not (tmp_path / "w").exists()
