"""End-to-end training: methods, resume, bad configs, loss on real data.

Small backbone (`resnet8`, the CIFAR ResNet family at depth 8) and a tiny
image folder keep each run to seconds; the real-size recipe is exercised by
experiments and benchmarks, not here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from nc_jax.configs import cifar_lt as cfg_lib
from nc_jax import best as best_lib
from nc_jax import checkpoint as ckpt_lib
from nc_jax import data as data_lib
from nc_jax import kernels
from nc_jax.kernels import onednn_build
from nc_jax import methods
from nc_jax import train

pytestmark = pytest.mark.slow  # end-to-end training runs

BACKBONE = "resnet8"


def tiny_config(data_dir, *, arg: str = "", **overrides):
  c = cfg_lib.get_config("tiny" + ("," + arg if arg else ""))
  c.unlock()
  c.data_dir = str(data_dir)
  c.backbone = BACKBONE
  c.imb_factor = 0.1
  c.pipeline = "device"
  for k, v in overrides.items():
    target = c
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  c.lock()
  return c


@pytest.mark.parametrize("method,overrides", [
    *[(m, {}) for m in methods.METHODS],
    ("etf_dr", {"sampler": "class_balanced"}),
    ("ldam_drw", {"sampler": "class_balanced", "eval_logit_adjust_tau": 1.0}),
    ("ce", {"eval_logit_adjust_tau": 1.0, "mixup_alpha": 0.0}),
])
def test_each_method_learns(method, overrides, tiny_image_folder, tmp_path):
  """24 steps on the learnable tree take every method to a final test
  top-1 of at least twice chance (20%; measured 40-90% on 2026-12-07);
  on shuffled labels it stays at chance (the next test)."""
  config = _learning_config(tiny_image_folder, method, **overrides)
  res = train.train_and_evaluate(config, tmp_path)
  assert res["final"]["top1"] >= 2 * 100 / 10, res["final"]
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["final"] == res["final"]
  want_counts = data_lib.long_tail_counts(40, 0.5, num_classes=10)
  assert saved["train_counts"] == want_counts
  for block in ("final", "best"):
    for key in ("top1", "top5", "head", "medium", "tail"):
      assert 0.0 <= saved[block][key] <= 100.0, (block, key)
    # No ECE for the cosine logits of the fixed-ETF heads.
    if method.startswith("etf_"):
      assert saved[block]["ece"] is None
    else:
      assert 0.0 <= saved[block]["ece"] <= 100.0, block
    assert len(saved[block]["per_class"]) == 10
  assert saved["final"]["num_examples"] == 60  # every test image once
  assert saved["config"]["method"] == method
  for key, value in overrides.items():
    assert saved["config"][key] == value
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  kinds = {json.loads(l)["kind"] for l in lines}
  assert kinds == {"train", "eval"}
  assert list((tmp_path / "tensorboard").iterdir())


def _learning_config(folder, method, **overrides):
  """A short run that learns the tiny tree: a milder imbalance (r = 0.5,
  290 images), no mixup, 24 steps of 16 (eval every 8)."""
  return tiny_config(folder, arg=f"method={method},steps=24,mixup=0",
                     **{"imb_factor": 0.5, "eval_every_steps": 8,
                        "eval_every_epochs": None, **overrides})


@pytest.mark.parametrize("method", ["etf_dr", "ce"])
def test_a_method_on_shuffled_labels_stays_at_chance(method,
                                                     shuffled_image_folder,
                                                     tmp_path):
  """The learning test can fail: the same run on a tree whose training
  labels were shuffled (nothing left to learn) ends below twice chance."""
  res = train.train_and_evaluate(
      _learning_config(shuffled_image_folder, method), tmp_path)
  assert res["final"]["top1"] < 2 * 100 / 10, res["final"]


def _ce_plus_zero(ctx: methods.LossContext):
  """A 'new' loss, registered as docs/architecture.md shows."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nc_jax import losses  # pylint: disable=g-import-not-at-top
  per = losses.cross_entropy(ctx.logits, ctx.labels)
  return jnp.mean(per) + 0.0 * ctx.options["la_tau"] * ctx.epoch


def test_a_registered_method_trains_end_to_end(tiny_image_folder, tmp_path):
  methods.register_method("my_ce", methods.Method(head="linear",
                                                  loss=_ce_plus_zero))
  try:
    res = train.train_and_evaluate(
        tiny_config(tiny_image_folder, arg="method=my_ce,steps=3"), tmp_path)
  finally:
    del methods.METHODS["my_ce"]
  assert res["config"]["method"] == "my_ce"
  assert np.isfinite(res["final"]["loss"])


def test_tfdata_pipeline_and_nc_metrics(tiny_image_folder, tmp_path):
  config = tiny_config(tiny_image_folder, pipeline="tfdata", nc_metrics=True,
                       nc_train_metrics=True)
  res = train.train_and_evaluate(config, tmp_path)
  nc = res["final"]["nc"]
  for key in ("nc1", "cos_mean_h", "minority_cos_w", "self_duality"):
    assert np.isfinite(nc[key]), key
  # The classifier is the fixed ETF: its cosines are exactly -1/(K-1).
  np.testing.assert_allclose(nc["cos_mean_w"], -1 / 9, atol=1e-5)
  evals = [json.loads(l) for l in
           (tmp_path / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["kind"] == "eval"]
  assert "nc_train/nc1" in evals[-1] and "nc_test/nc1" in evals[-1]


@pytest.mark.real_data
def test_loss_decreases_on_real_cifar10(cifar10_release, tmp_path,
                                        monkeypatch):
  monkeypatch.setenv("NC_JAX_CACHE", str(tmp_path / "cache"))
  config = tiny_config(cifar10_release, arg="steps=40,mixup=0", batch_size=64,
                       eval_batch_size=1000, imb_factor=0.01)
  config.unlock()
  config.optim.lr = 0.05
  config.lock()
  train.train_and_evaluate(config, tmp_path / "run")
  losses = [json.loads(l)["loss"] for l in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["kind"] == "train"]
  assert len(losses) == 40
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < 0.8 * first, (first, last)
  res = json.loads((tmp_path / "run" / "results.json").read_text())
  assert res["final"]["num_examples"] == 10000
  assert res["num_train_examples"] == 12406


class _Crash(RuntimeError):
  pass


def _crash_after(monkeypatch, n_batches: int):
  """Makes the train input raise after `n_batches` batches (a 'kill')."""
  real = data_lib.make_train_input

  def make(*args, **kwargs):
    inp = real(*args, **kwargs)
    orig = inp.iterate

    def iterate(start_step=0):
      for i, b in enumerate(orig(start_step)):
        if i == n_batches:
          raise _Crash(f"simulated kill after {n_batches} batches")
        yield b

    inp.iterate = iterate
    return inp

  monkeypatch.setattr(data_lib, "make_train_input", make)


def test_kill_and_resume_equals_uninterrupted(tiny_image_folder, tmp_path,
                                              monkeypatch):
  kw = dict(checkpoint_every_steps=4, checkpoint_every_epochs=None,
            eval_every_steps=6, eval_every_epochs=None)
  config = tiny_config(tiny_image_folder, arg="steps=12", **kw)
  full = train.train_and_evaluate(config, tmp_path / "full")

  with monkeypatch.context() as m:
    _crash_after(m, 7)  # dies after step 7: checkpoint 4 exists, 8 does not
    with pytest.raises(_Crash):
      train.train_and_evaluate(config, tmp_path / "resumed")
  assert (tmp_path / "resumed" / "checkpoints" / "4").is_dir()
  assert not (tmp_path / "resumed" / "results.json").exists()
  resumed = train.train_and_evaluate(config, tmp_path / "resumed")
  for block in ("final", "best"):
    assert resumed[block] == full[block], block
  # History (eval at step 6, before the crash) survived the restart.
  assert [h["step"] for h in resumed["history"]] == [6, 12]
  # So did the best checkpoint: the killed run saved step 6's, which the
  # restored history (from step 4) did not have; the replay saved it again.
  best = [(p / "best" / best_lib.BEST_FILE).read_bytes()
          for p in (tmp_path / "full", tmp_path / "resumed")]
  assert best[0] == best[1]


def test_replicas_are_independent_and_resume_exactly(tiny_image_folder,
                                                     tmp_path, monkeypatch):
  """S replicas in one program: replica 0 reproduces the single-seed run,
  each replica has its own draws, the aggregates are their mean and std;
  and a run of S replicas killed after a checkpoint resumes to the same
  numbers."""
  kw = dict(checkpoint_every_steps=3, checkpoint_every_epochs=None,
            eval_every_steps=4, eval_every_epochs=None)
  single = train.train_and_evaluate(
      tiny_config(tiny_image_folder, arg="steps=8", **kw), tmp_path / "one")
  config = tiny_config(tiny_image_folder, arg="steps=8", num_seeds=3, **kw)
  multi = train.train_and_evaluate(config, tmp_path / "three")
  assert multi["num_seeds"] == 3 and len(multi["per_seed"]) == 3
  r0 = multi["per_seed"][0]["final"]
  np.testing.assert_allclose(r0["loss"], single["final"]["loss"], rtol=1e-3)
  losses = [p["final"]["loss"] for p in multi["per_seed"]]
  assert len(set(np.round(losses, 6))) == 3  # own init, ETF and mixup draws
  np.testing.assert_allclose(multi["final"]["loss"], np.mean(losses), rtol=1e-6)
  np.testing.assert_allclose(multi["final_std"]["loss"], np.std(losses),
                             rtol=1e-6)
  assert len(multi["final"]["per_class"]) == 10
  assert multi["best"]["epochs"] == [p["best"]["epoch"]
                                     for p in multi["per_seed"]]
  with monkeypatch.context() as m:
    _crash_after(m, 5)  # checkpoint 3 exists, 6 does not
    with pytest.raises(_Crash):
      train.train_and_evaluate(config, tmp_path / "resumed")
  resumed = train.train_and_evaluate(config, tmp_path / "resumed")
  for block in ("final", "best", "final_std", "per_seed", "history"):
    assert resumed[block] == multi[block], block


def test_stop_during_an_evaluation_resumes_with_that_evaluation(
    tiny_image_folder, tmp_path, monkeypatch):
  """A stop request between eval batches saves the step's checkpoint; the
  rerun evaluates that step first and ends as an uninterrupted run."""
  from nc_jax import preemption
  kw = dict(checkpoint_every_steps=100, checkpoint_every_epochs=None,
            eval_every_steps=6, eval_every_epochs=None, eval_batch_size=20)
  config = tiny_config(tiny_image_folder, arg="steps=12", **kw)
  full = train.train_and_evaluate(config, tmp_path / "full")
  calls = []

  def pending(self):  # asked between eval batches: stop in the second one
    calls.append(1)
    return len(calls) == 2

  with monkeypatch.context() as m:
    m.setattr(preemption.StopSignals, "pending", pending)
    with pytest.raises(preemption.Preempted, match="at step 6"):
      train.train_and_evaluate(config, tmp_path / "resumed")
  assert ckpt_lib.saved_steps(tmp_path / "resumed" / "checkpoints") == [6]
  resumed = train.train_and_evaluate(config, tmp_path / "resumed")
  assert [h["step"] for h in resumed["history"]] == [6, 12]
  for block in ("final", "best", "history"):
    assert resumed[block] == full[block], block


def test_finished_run_is_not_overwritten(tiny_image_folder, tmp_path, capsys):
  """A rerun of a finished run touches nothing; its results.json records
  the implementations it ran."""
  config = tiny_config(tiny_image_folder, arg="steps=3")
  res = train.train_and_evaluate(config, tmp_path)
  want = kernels.resolve(config).record()
  assert res["resolved"] == want and "resolved_before" not in res
  before = (tmp_path / "results.json").read_bytes()
  assert json.loads(before)["resolved"] == want
  again = train.train_and_evaluate(config, tmp_path)
  assert "already holds a finished run" in capsys.readouterr().out
  assert (tmp_path / "results.json").read_bytes() == before
  assert again["final"] == json.loads(before)["final"]


def test_resume_with_other_config_is_refused(tiny_image_folder, tmp_path,
                                             monkeypatch):
  config = tiny_config(tiny_image_folder, arg="steps=6",
                       checkpoint_every_steps=2, checkpoint_every_epochs=None)
  with monkeypatch.context() as m:
    _crash_after(m, 3)
    with pytest.raises(_Crash):
      train.train_and_evaluate(config, tmp_path)
  other = tiny_config(tiny_image_folder, arg="steps=6,method=ce",
                      checkpoint_every_steps=2, checkpoint_every_epochs=None)
  with pytest.raises(ValueError, match=r"method: 'etf_dr' in the workdir"):
    train.train_and_evaluate(other, tmp_path)


def test_kernels_are_recorded_and_a_change_on_resume_is_refused(
    tiny_image_folder, tmp_path, monkeypatch):
  kw = dict(checkpoint_every_steps=2, checkpoint_every_epochs=None)
  config = tiny_config(tiny_image_folder, arg="steps=6", **kw)
  first = kernels.resolve(config).record()
  with monkeypatch.context() as m:
    _crash_after(m, 3)
    with pytest.raises(_Crash):
      train.train_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["resolved"] == first
  assert saved["conv_impl"] == "auto"  # the request stays as given

  # The same run resumed where the kernels resolve differently: a machine
  # without a C++ compiler (where oneDNN's kernels were not chosen in the
  # first place, e.g. on a GPU, another BatchNorm is asked for instead).
  def no_compiler():
    raise onednn_build.KernelsUnavailable(
        "no C++ compiler (g++ not on PATH; install g++ or set CXX)")
  monkeypatch.setattr(onednn_build, "load_kernels", no_compiler)
  change = ({} if first["conv_impl"] == "onednn" else {"norm_impl": (
      "flax" if first["norm_impl"] == "fused" else "fused")})
  changed = tiny_config(tiny_image_folder, arg="steps=6", **change, **kw)
  second = kernels.resolve(changed).record()
  assert second != first
  with pytest.raises(train.ConfigError) as e:
    train.train_and_evaluate(changed, tmp_path)
  msg = str(e.value)
  assert f"{first['conv_impl']} convolutions and {first['norm_impl']} " in msg
  assert f"{second['conv_impl']} convolutions and {second['norm_impl']} " in msg
  assert "--config.allow_kernel_change=True" in msg
  assert json.loads((tmp_path / "config.json").read_text()) == saved

  accepted = tiny_config(tiny_image_folder, arg="steps=6",
                         allow_kernel_change=True, **change, **kw)
  res = train.train_and_evaluate(accepted, tmp_path)
  record = {"resolved": second, "resolved_before": [first]}
  for got in (res, json.loads((tmp_path / "results.json").read_text()),
              json.loads((tmp_path / "config.json").read_text())):
    assert {k: got.get(k) for k in record} == record


def test_a_stop_while_a_resume_sets_up_names_the_step_it_resumes_from(
    tiny_image_folder, tmp_path, monkeypatch):
  """SIGTERM while a resumed run loads its data: nothing new to save, and
  the message names the checkpoint the rerun resumes from, not "the
  start"."""
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from nc_jax import preemption, run_setup  # pylint: disable=g-import-not-at-top
  config = tiny_config(tiny_image_folder, arg="steps=6",
                       checkpoint_every_steps=2, checkpoint_every_epochs=None)
  with monkeypatch.context() as m:
    _crash_after(m, 5)
    with pytest.raises(_Crash):
      train.train_and_evaluate(config, tmp_path)
  exits = []

  def record_exit(self, code, text):  # the watchdog's os._exit, recorded
    del self
    exits.append((code, text))
  real = run_setup.load_data

  def signalled_load(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
      time.sleep(0.01)
    return real(*args, **kwargs)
  monkeypatch.setattr(preemption.StopSignals, "_exit", record_exit)
  monkeypatch.setattr(run_setup, "load_data", signalled_load)
  with pytest.raises(preemption.Preempted):  # (the exit was only recorded)
    train.train_and_evaluate(config, tmp_path)
  assert exits, "the watchdog did not answer the signal"
  code, text = exits[0]
  assert code == preemption.EXIT_PREEMPTED
  assert "nothing trained since the last checkpoint" in text
  assert "resumes from step 4" in text, text


def test_a_damaged_checkpoint_is_set_aside_and_the_run_ends_as_if_intact(
    tiny_image_folder, tmp_path, monkeypatch, capsys):
  """The newest checkpoint's data files garbled: the run says so in one
  warning, keeps the files in damaged/, resumes from the one before and
  ends with an uninterrupted run's numbers."""
  config = tiny_config(tiny_image_folder, arg="steps=6",
                       checkpoint_every_steps=2, checkpoint_every_epochs=None,
                       eval_every_steps=3, eval_every_epochs=None)
  full = train.train_and_evaluate(config, tmp_path / "full")
  wd = tmp_path / "run"
  with monkeypatch.context() as m:
    _crash_after(m, 5)
    with pytest.raises(_Crash):
      train.train_and_evaluate(config, wd)
  step_dir = wd / "checkpoints" / "4"
  data = [p for p in step_dir.rglob("*")
          if p.is_file() and p.parent.name == "d"]
  assert data
  for f in data:
    f.write_bytes(b"garbage")
  damaged = {str(p.relative_to(step_dir)): p.read_bytes()
             for p in step_dir.rglob("*") if p.is_file()}
  capsys.readouterr()
  resumed = train.train_and_evaluate(config, wd)
  out = capsys.readouterr().out
  warnings = [l for l in out.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1, out
  assert "the checkpoint at step 4 cannot be read" in warnings[0]
  assert "Resuming from the checkpoint at step 2" in warnings[0]
  aside = wd / "damaged" / "checkpoint_4"
  assert {str(p.relative_to(aside)): p.read_bytes()
          for p in aside.rglob("*") if p.is_file()} == damaged
  for block in ("final", "best", "history"):
    assert resumed[block] == full[block], block


# ------------------------------------------------------------- bad configs
@pytest.mark.parametrize("override,match", [
    (dict(dataset="cifar11"), "cifar11"),
    (dict(method="etf_mse"), "Unknown method 'etf_mse'"),
    (dict(imb_factor=0.0), r"outside \(0, 1\]"),
    (dict(imb_factor=1.5), r"outside \(0, 1\]"),
    (dict(imb_factor=-0.01), r"outside \(0, 1\]"),
    (dict(**{"loss.dr_form": "paper"}), "given_ew=False"),
    (dict(num_seeds=0), "num_seeds"),
    (dict(seeds_mode="pmap"), "seeds_mode"),
    (dict(conv_impl="cudnn"), "Unknown conv_impl 'cudnn'"),
    (dict(conv_impl="onednn", compute_dtype="bfloat16"), "not float32"),
    (dict(norm_impl="batch"), "Unknown norm_impl 'batch'"),
    (dict(sampler="balanced"), "sampler must be one of"),
    (dict(eval_logit_adjust_tau=-1.0), "eval_logit_adjust_tau must be >= 0"),
    (dict(method="la", **{"loss.la_tau": -1.0}), "la_tau must be >= 0"),
    (dict(method="ldam_drw", **{"loss.cb_beta": 1.0}),
     r"cb_beta must lie in \(0, 1\)"),
    (dict(method="ldam_drw", **{"loss.cb_beta": -0.1}),
     r"cb_beta must lie in \(0, 1\)"),
    # tiny trains 1 epoch: DRW from epoch 1 would never start.
    (dict(method="ldam_drw", **{"loss.drw_epoch": 1}),
     "past the end of training"),
    (dict(method="etf_dot", l2_normalize=False), "needs l2_normalize=True"),
])
def test_bad_config_values(tiny_image_folder, tmp_path, override, match):
  config = tiny_config(tiny_image_folder, **override)
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()  # stopped before any work


def test_drw_epoch_past_a_length_in_steps_is_refused(tiny_image_folder,
                                                     tmp_path):
  """With the length in steps, the epoch length is known only once the data
  is read; the run still stops before writing anything."""
  # drw_epoch set explicitly (the command line drops such a field from
  # fit_to_run, so the run's length does not scale it).
  config = tiny_config(tiny_image_folder, arg="method=ldam_drw,steps=3",
                       **{"loss.drw_epoch": 1, "optim.fit_to_run": ()})
  with pytest.raises(train.ConfigError, match="past the end of training"):
    train.train_and_evaluate(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()  # nothing written


def test_missing_data_dir(tmp_path, monkeypatch):
  config = tiny_config(tmp_path / "nowhere")
  with pytest.raises((ValueError, FileNotFoundError), match="nowhere"):
    train.train_and_evaluate(config, tmp_path / "w")
  # Unset: tfds's route, which fails without internet (a proxy refusing
  # every connection stands in for that) and names --config.data_dir.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "tfds"))
  for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
    monkeypatch.setenv(var, "http://127.0.0.1:9")
  monkeypatch.delenv("NO_PROXY", raising=False)
  monkeypatch.delenv("no_proxy", raising=False)
  config = tiny_config(tmp_path)
  config.unlock()
  config.data_dir = None
  config.lock()
  with pytest.raises(train.ConfigError,
                     match="data_dir is not set.*--config.data_dir="):
    train.train_and_evaluate(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_unknown_config_keys_fail():
  c = cfg_lib.get_config("quick")
  with pytest.raises(AttributeError):
    c.num_epoch = 3  # typo of num_epochs: locked configs refuse new fields
  with pytest.raises(ValueError, match="Unknown config argument 'datset'.*"
                     "Did you mean 'dataset'"):
    cfg_lib.get_config("datset=cifar10")
  with pytest.raises(ValueError, match="Unknown config variant or preset "
                     "'quik'. Did you mean 'quick'"):
    cfg_lib.get_config("quik")


def test_both_durations_is_an_error(tiny_image_folder, tmp_path):
  config = tiny_config(tiny_image_folder, num_steps=5)  # num_epochs=1 too
  with pytest.raises(ValueError, match="Both num_epochs"):
    train.train_and_evaluate(config, tmp_path)


def test_presets_are_the_reference_configs():
  presets = cfg_lib.presets()
  # 4 datasets x 3 ratios x {ce, etf_dr}, all ResNet-32, + ImageNet-LT pair.
  assert len(presets) == 26
  for name in presets:
    c = cfg_lib.get_config(name)
    data_lib.dataset_info(c.dataset)
    assert c.method == name.rsplit("_", 2)[-1] if name.endswith("_ce") else (
        c.method == "etf_dr")
    if not name.startswith("imagenet_lt"):
      assert c.imb_factor == float(name.split("_r")[1].split("_")[0])
      assert c.backbone in ("resnet32", "resnet32_c100")
      assert (c.num_epochs, c.eval_every_epochs) == (200.0, 1.0)
  c = cfg_lib.get_config("cifar10_r0.01_etf_dr")
  assert (c.dataset, c.imb_factor, c.method, c.backbone) == (
      "cifar10", 0.01, "etf_dr", "resnet32")
  assert c.optim.decay_epochs == (160, 180) and c.mixup_alpha == 1.0
  assert cfg_lib.get_config("cifar100_r0.02_ce").backbone == "resnet32_c100"
  dense = cfg_lib.densenet_presets()
  assert len(dense) == 24 and all(n.endswith("_densenet") for n in dense)
  assert cfg_lib.get_config("svhn_r0.01_ce_densenet").backbone == "densenet_bc"
  with pytest.raises(ValueError, match="Did you mean 'cifar10_r0.01_etf_dr'"):
    cfg_lib.get_config("cifar10_r0.01_etfdr")
  c = cfg_lib.get_config("imagenet_lt_etf_dr")
  assert (c.batch_size, c.optim.schedule, c.loss.reg_lam) == (1024, "cosine", 0.01)
  assert not c.l2_normalize


def test_a_resume_needs_no_pretrained_file(tiny_image_folder, tmp_path,
                                           monkeypatch):
  """The pretrained file is read at step 0 only: a fresh run without it is
  refused before any work, a resume where it is gone goes on."""
  kw = dict(checkpoint_every_steps=2, checkpoint_every_epochs=None)
  with pytest.raises(train.ConfigError, match=r"--config.pretrained="):
    train.train_and_evaluate(tiny_config(
        tiny_image_folder, arg="steps=4", pretrained_required=True, **kw),
        tmp_path)
  assert not (tmp_path / "config.json").exists()
  config = tiny_config(tiny_image_folder, arg="steps=4", **kw)
  with monkeypatch.context() as m:
    _crash_after(m, 3)  # the checkpoint at step 2 exists
    with pytest.raises(_Crash):
      train.train_and_evaluate(config, tmp_path)
  gone = tiny_config(tiny_image_folder, arg="steps=4", **kw,
                     pretrained="/gone/resnet50.pth", pretrained_required=True)
  res = train.train_and_evaluate(gone, tmp_path)
  assert res["provenance"]["resumes"] == 1 and res["final"]["top1"] >= 0
