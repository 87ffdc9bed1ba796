"""benchmarks/gpu_lease.py, the prepared GPU script, on the CPU in miniature.

Every stage runs for a handful of steps on a tiny data pack, with
TensorFlow blocked as on the GPU image, so the script cannot rot between
leases.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from nc_jax.data import pack_writer

pytestmark = pytest.mark.slow  # several compiled steps and two short runs

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_every_stage_runs_without_tensorflow(tiny_image_folder, tmp_path):
  data = tmp_path / "tiny.npz"
  pack_writer.pack_dataset(data, "cifar10", str(tiny_image_folder),
                    imb_factors=[0.1])
  out = tmp_path / "out"
  cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_lease.py"),
         "--data_dir", str(data), "--config", "tiny",
         "--set", "backbone=resnet8,imb_factor=0.1", "--ks", "2",
         "--seeds", "1,2", "--dtypes", "float32", "--timed_steps", "2",
         "--profile_epochs", "1", "--full_epochs", "1"]
  env = dict(os.environ, PYTHONPATH=str(REPO), NC_JAX_BLOCK_TF="1",
             JAX_PLATFORMS="cpu", OUT=str(out), TF_CPP_MIN_LOG_LEVEL="2")
  done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        cwd=tmp_path)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  summary = json.loads((out / "gpu_lease.json").read_text())
  assert json.loads(done.stdout.splitlines()[-1]) == summary
  assert summary["tensorflow_imported"] is False
  stages = summary["stages"]
  assert set(stages) == {"steps", "profile", "seeds", "dtype", "full"}
  (step,) = stages["steps"]
  assert step["k"] == 2 and step["steps_per_epoch"] == 9
  assert step["ms_per_step"] > 0 and step["ms_per_step_step_alone"] > 0
  (run,) = stages["profile"]["runs"]
  assert run["k"] == 2 and run["evaluations"] == 1
  assert set(run["split_training_s"]) == {"step", "input",
                                         "dispatch_and_loop"}
  assert run["projected_full_s"] > 0
  assert [r["num_seeds"] for r in stages["seeds"]] == [1, 2]
  assert stages["seeds"][1]["replicas"] == "vmap"
  assert stages["full"]["k"] == 2 and stages["full"]["evaluations"] == 1
