"""Using a trained run: `nc_jax.runs` and `nc-jax-evaluate`.

One tiny ResNet-8 run (12 steps, evaluated and checkpointed every 4) is
trained once for the module; the tests load it, classify with it, export it
and evaluate it, and check the numbers against its results.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nc_jax import best as best_lib
from nc_jax import etf as etf_lib
from nc_jax import runs
from nc_jax import train
from nc_jax.data import in_memory
from tests.test_readme import readme_snippet
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow  # trains runs to load

REPO = pathlib.Path(__file__).resolve().parents[1]
EVERY_4 = dict(eval_every_steps=4, eval_every_epochs=None,
               checkpoint_every_steps=4, checkpoint_every_epochs=None)


@pytest.fixture(scope="module")
def trained(tiny_image_folder, tmp_path_factory):
  """(workdir, results.json) of a finished 12-step etf_dr run."""
  wd = tmp_path_factory.mktemp("runs") / "etf_dr"
  config = tiny_config(tiny_image_folder, arg="steps=12", **EVERY_4)
  train.train_and_evaluate(config, wd)
  return wd, json.loads((wd / "results.json").read_text())


@pytest.fixture(scope="module")
def test_split(tiny_image_folder):
  return in_memory.load_split("cifar10", str(tiny_image_folder), "test")


def test_load_final_predicts_what_the_eval_counted(trained, test_split):
  wd, res = trained
  run = runs.load(wd)
  assert (run.which, run.step, run.replica) == ("final", 12, 0)
  assert run.epoch == pytest.approx(res["final"]["epoch"])
  assert run.config.method == "etf_dr" and run.num_classes == 10
  assert run.class_names == [f"class_{c:02d}" for c in range(10)]
  assert run.class_counts == res["train_counts"]
  logits = run.predict(test_split.images)
  feats = run.features(test_split.images)
  assert logits.shape == (60, 10) and logits.dtype == np.float32
  assert feats.shape == (60, run.feature_dim)
  # The ETF head: logits are the L2-normalised features times the ETF that
  # the builder draws from etf_seed.
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(
      run.etf, etf_lib.replica_etfs(
          10, run.feature_dim, seed=0, num_replicas=1,
          rotation=run.config.etf_rotation).astype(np.float32))
  np.testing.assert_allclose(logits, feats @ run.etf, atol=1e-5)
  hit = logits.argmax(1) == test_split.labels
  assert 100 * hit.mean() == pytest.approx(res["final"]["top1"])
  per_class = [100 * hit[test_split.labels == c].mean() for c in range(10)]
  np.testing.assert_allclose(per_class, res["final"]["per_class"])
  # Any N, any batch size: the same numbers.
  np.testing.assert_allclose(run.predict(test_split.images, batch_size=7),
                             logits, atol=1e-5)
  np.testing.assert_allclose(run.predict(test_split.images[:1]), logits[:1],
                             atol=1e-5)
  assert run.predict(test_split.images[:0]).shape == (0, 10)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 32, 32, 3), np.float32), "must be uint8"),
    (np.zeros((32, 32, 3), np.uint8), "one image"),
    (np.zeros((2, 3, 32, 32), np.uint8), r"NHWC \(N, 32, 32, 3\)"),
    (np.zeros((2, 16, 16, 3), np.uint8), r"NHWC \(N, 32, 32, 3\)"),
    ([[1, 2]], "numpy array"),
])
def test_bad_images_are_refused(trained, bad, match):
  run = runs.load(trained[0])
  with pytest.raises(ValueError, match=match):
    run.predict(bad)


def test_best_and_step_checkpoints(trained, test_split):
  wd, res = trained
  best = runs.load(wd, "best")
  assert best.which == "best"
  assert best.epoch == pytest.approx(res["best"]["epoch"])
  hit = best.predict(test_split.images).argmax(1) == test_split.labels
  assert 100 * hit.mean() == pytest.approx(res["best"]["top1"])
  # Steps kept in checkpoints/ (keep_checkpoints=2): 8 and 12.
  at8 = runs.load(wd, 8)
  assert (at8.which, at8.step) == ("step", 8)
  assert runs.load(wd, "12").step == 12
  hist8 = next(h for h in res["history"] if h["step"] == 8)
  hit8 = at8.predict(test_split.images).argmax(1) == test_split.labels
  assert 100 * hit8.mean() == pytest.approx(hist8["top1"][0])
  with pytest.raises(runs.RunError, match="no checkpoint at step 4; kept "
                     "steps: 8, 12"):
    runs.load(wd, 4)
  with pytest.raises(ValueError, match="not 'final', 'best' or a step"):
    runs.load(wd, "worst")


def test_best_tracker_keeps_the_best_and_drops_a_lost_future(tmp_path):
  state = {"w": np.arange(3, dtype=np.float32)}

  def entry(top1s, epoch=1.0):
    return {"epoch": epoch, "test": [{"top1": t} for t in top1s]}

  best = best_lib.BestCheckpoint(tmp_path / "best", history=[], start_step=0)
  assert best.update(2, state, entry([10.0, 30.0]))   # mean 20
  assert not best.update(4, state, entry([20.0, 20.0]))  # equal: first wins
  assert best.update(6, state, entry([25.0, 25.0]))
  assert not best.update(8, state, entry([0.0, 40.0]))  # mean decides
  saved = best_lib.read_best(tmp_path / "best")
  assert saved["record"]["step"] == 6 and saved["record"]["top1"] == 25.0
  assert saved["record"]["top1_per_seed"] == [25.0, 25.0]
  assert list((tmp_path / "best").iterdir()) == [tmp_path / "best" /
                                                 best_lib.BEST_FILE]
  # Resumed from step 4: the best of step 6 is not in that history.
  history = [{"step": 2, **entry([10.0, 30.0])}]
  again = best_lib.BestCheckpoint(tmp_path / "best", history=history,
                                  start_step=4)
  assert best_lib.read_best(tmp_path / "best") is None
  assert again.top1 == 20.0 and not again.update(6, state, entry([20, 20]))
  # Resumed from step 6 or later: kept.
  fresh = best_lib.BestCheckpoint(tmp_path / "best", history=[],
                                  start_step=0)
  assert fresh.update(6, state, entry([25.0, 25.0]))
  best_lib.BestCheckpoint(tmp_path / "best", history=history, start_step=6)
  assert best_lib.read_best(tmp_path / "best")["record"]["step"] == 6


def test_export_round_trip(trained, test_split, tmp_path):
  wd, _ = trained
  for which in ("final", "best"):
    path = runs.export(wd, tmp_path / f"{which}.msgpack", which)
    from_file, from_wd = runs.load(path), runs.load(wd, which)
    assert (from_file.step, from_file.which) == (from_wd.step, from_wd.which)
    assert from_file.config.to_dict() == from_wd.config.to_dict()
    assert from_file.class_names == from_wd.class_names
    np.testing.assert_array_equal(from_file.etf, from_wd.etf)
    a = from_file.predict_and_features(test_split.images)
    b = from_wd.predict_and_features(test_split.images)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  with pytest.raises(runs.RunError, match="holding one checkpoint"):
    runs.load(tmp_path / "final.msgpack", 8)
  (tmp_path / "junk.msgpack").write_bytes(b"not a model")
  with pytest.raises(runs.RunError, match="not a file written by"):
    runs.load(tmp_path / "junk.msgpack")


def test_a_workdir_without_its_counts_loads_without_inventing_them(
    trained, test_split, tmp_path):
  """Without results.json and train_subset.json the class counts are
  unknown: the model still loads and predicts the same logits (the weights
  alone are restored, the optimiser state is not read), `class_counts` is
  None, and the epoch comes from the checkpoint's own record."""
  wd, res = trained
  copy = tmp_path / "no_counts"
  shutil.copytree(wd, copy)
  (copy / "results.json").unlink()
  (copy / "train_subset.json").unlink()
  run, ref = runs.load(copy), runs.load(wd)
  assert run.class_counts is None and run.step == 12
  assert run.epoch == pytest.approx(res["final"]["epoch"])
  np.testing.assert_array_equal(run.predict(test_split.images),
                                ref.predict(test_split.images))
  assert run._src.step_config.class_counts is None  # pylint: disable=protected-access
  # The post-hoc adjustment needs the counts: refused, naming why.
  raw = json.loads((copy / "config.json").read_text())
  raw["eval_logit_adjust_tau"] = 1.0
  (copy / "config.json").write_text(json.dumps(raw))
  with pytest.raises(runs.RunError, match="needs the training class counts"):
    runs.load(copy)


def test_evaluate_matches_results_json(trained, tmp_path):
  wd, res = trained
  ev = runs.evaluate(wd)
  assert ev["block"] == "final" and ev["step"] == 12
  for key in ("top1", "top5", "head", "medium", "tail", "ece", "loss",
              "per_class", "num_examples", "epoch"):
    assert ev["final"][key] == res["final"][key], key
  cm = np.asarray(ev["confusion_matrix"])
  assert cm.shape == (10, 10) and cm.sum() == 60
  np.testing.assert_allclose(100 * np.diag(cm) / cm.sum(1),
                             res["final"]["per_class"])
  nc = ev["final"]["nc"]
  np.testing.assert_allclose(nc["cos_mean_w"], -1 / 9, atol=1e-5)  # the ETF
  assert np.isfinite(nc["nc1"]) and nc["num_samples"] == 60
  best = runs.evaluate(wd, "best")
  assert best["best"]["top1"] == res["best"]["top1"]
  # An exported file evaluates to the same numbers.
  from_file = runs.evaluate(runs.export(wd, tmp_path / "m.msgpack"))
  assert from_file["final"]["per_class"] == ev["final"]["per_class"]
  np.testing.assert_allclose(from_file["final"]["loss"], ev["final"]["loss"],
                             rtol=1e-6)


def test_replicas_and_cosine_head(tiny_image_folder, tmp_path, test_split):
  """num_seeds=2 with LDAM's cosine head: replica r, scaled cosines."""
  wd = tmp_path / "ldam"
  res = train.train_and_evaluate(
      tiny_config(tiny_image_folder, arg="method=ldam_drw,steps=4",
                  num_seeds=2, seeds_mode="vmap"), wd)
  runs_ = [runs.load(wd, replica=r) for r in (0, 1)]
  assert [r.num_replicas for r in runs_] == [2, 2] and runs_[0].etf is None
  scale = runs_[0].config.loss.ldam_scale
  for r, run in enumerate(runs_):
    logits, feats = run.predict_and_features(test_split.images)
    np.testing.assert_allclose(logits, scale * feats @ run.classifier,
                               atol=1e-4)
    hit = logits.argmax(1) == test_split.labels
    assert 100 * hit.mean() == pytest.approx(
        res["per_seed"][r]["final"]["top1"])
  assert not np.allclose(runs_[0].params["head"]["kernel"],
                         runs_[1].params["head"]["kernel"])
  with pytest.raises(ValueError, match="holds 2 replica"):
    runs.load(wd, replica=2)
  ev = runs.evaluate(wd)
  assert ev["num_seeds"] == 2 and len(ev["per_seed"]) == 2
  assert ev["final"]["top1"] == res["final"]["top1"]
  assert ev["final_std"]["top1"] == res["final_std"]["top1"]
  assert np.asarray(ev["confusion_matrix"]).sum() == 120
  path = runs.export(wd, tmp_path / "r1.msgpack", replica=1)
  np.testing.assert_array_equal(runs.load(path).predict(test_split.images),
                                runs_[1].predict(test_split.images))


# ------------------------------------------------------------ the command
def _evaluate(args, cwd):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=str(REPO))
  return subprocess.run(
      [sys.executable, "-m", "nc_jax.cli.evaluate", *map(str, args)],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_evaluate_command_writes_its_outputs(trained, tmp_path):
  wd, res = trained
  out = _evaluate(["--workdir", wd, "--which", "best", "--out", "ev",
                   "--export", "model.msgpack"], tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
  assert ev["best"]["top1"] == res["best"]["top1"]
  assert ev["best"]["per_class"] == res["best"]["per_class"]
  for name in ("confusion_matrix.png", "per_class_accuracy.png"):
    assert (tmp_path / "ev" / name).stat().st_size > 10_000, name
  assert "results.json best: top1" in out.stdout
  assert runs.load(tmp_path / "model.msgpack").which == "best"


def _assert_clean_error(out, *fragments):
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  for f in fragments:
    assert f in errors[0], (f, errors[0])


def test_evaluate_command_errors(trained, tmp_path):
  wd, _ = trained
  _assert_clean_error(_evaluate(["--workdir", tmp_path / "nowhere", "--out",
                                 "o"], tmp_path), "does not exist")
  _assert_clean_error(_evaluate(["--workdir", wd, "--which", "worst",
                                 "--out", "o"], tmp_path),
                      "--which='worst'", "final", "best", "step")
  # An unfinished run that never saved a checkpoint, and a run without
  # best/ (trained before it existed).
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  shutil.copy(wd / "config.json", unfinished / "config.json")
  _assert_clean_error(_evaluate(["--workdir", unfinished, "--out", "o"],
                                tmp_path), "holds no checkpoint yet")
  no_best = tmp_path / "no_best"
  shutil.copytree(wd, no_best)
  shutil.rmtree(no_best / "best")
  _assert_clean_error(_evaluate(["--workdir", no_best, "--which", "best",
                                 "--out", "o"], tmp_path),
                      "has no best checkpoint", "--which final")
  assert not (tmp_path / "o").exists()


def test_evaluate_output_mistakes_leave_everything_as_it_was(trained,
                                                             tmp_path):
  """--export never replaces a file it did not write (a run's
  results.json), nor writes into a folder or under a file; --out is
  checked before the evaluation. Nothing is left behind."""
  wd, _ = trained
  run = tmp_path / "run"
  shutil.copytree(wd, run)
  results = (run / "results.json").read_bytes()
  (tmp_path / "afile").write_text("x")
  (tmp_path / "adir").mkdir()
  for args, fragments in [
      (["--export", run / "results.json"],
       ["is not a file written by --export", "left as it is"]),
      (["--export", tmp_path / "adir"], ["is a directory", "file name"]),
      (["--export", tmp_path / "afile" / "m.msgpack"], ["afile is a file"]),
      (["--out", tmp_path / "afile" / "sub"], ["afile is a file"]),
  ]:
    _assert_clean_error(_evaluate(["--workdir", run, *args], tmp_path),
                        *fragments)
  assert (run / "results.json").read_bytes() == results
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile",
                                                        "run"]
  assert not list((tmp_path / "adir").iterdir())
  # An earlier export is replaced (the same command, run again).
  for _ in range(2):
    out = _evaluate(["--workdir", run, "--export", "m.msgpack"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "adir", "afile", "m.msgpack", "run"]


def test_readme_snippet_runs(trained, tmp_path, monkeypatch):
  code = readme_snippet("use-run").replace("runs/c10_r0.01_etf_dr",
                                           str(trained[0]))
  monkeypatch.chdir(tmp_path)
  exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  assert (tmp_path / "c10_etf_dr.msgpack").is_file()
