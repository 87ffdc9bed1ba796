"""Many steps per dispatch (`steps_per_dispatch`, `nc_jax.dispatch`).

The plan of chunks (pure), the stacked batches of both pipelines against
their one-step batches, and end to end on the CPU: k = 8 trains the same
states and writes the same records as k = 1, compiles a bounded number of
variants, stops at a chunk's end on request, and a run stopped and killed
in the middle resumes to an uninterrupted run's numbers.
"""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest

from nc_jax import best as best_lib
from nc_jax import builder as builder_lib
from nc_jax import checkpoint as ckpt_lib
from nc_jax import data as data_lib
from nc_jax import dispatch
from nc_jax import preemption
from nc_jax import run_config
from nc_jax import sharding
from nc_jax import train
from nc_jax import validation
from tests.test_train import tiny_config

MESH = sharding.make_mesh(jax.devices()[:1])


# ------------------------------------------------------------------ plan
def test_allowed_and_chunk_lengths():
  assert dispatch.allowed_lengths(1) == (1,)
  assert dispatch.allowed_lengths(8) == (8, 4, 2, 1)
  assert dispatch.allowed_lengths(12) == (12, 8, 4, 2, 1)
  assert dispatch.chunk_lengths(20, 8) == [8, 8, 4]
  assert dispatch.chunk_lengths(7, 8) == [4, 2, 1]
  assert dispatch.chunk_lengths(30, 12) == [12, 12, 4, 2]
  for k in (1, 3, 8, 32):
    for n in range(0, 70):
      lengths = dispatch.chunk_lengths(n, k)
      assert sum(lengths) == n
      assert set(lengths) <= set(dispatch.allowed_lengths(k))
  with pytest.raises(ValueError, match="steps_per_dispatch must be >= 1"):
    dispatch.allowed_lengths(0)


def test_plan_stops_at_every_event():
  chunks = dispatch.plan(0, 23, 8, (5, 6, 10))
  assert chunks[0] == (0, 4) and chunks[1] == (4, 1)
  ends = [a + n for a, n in chunks]
  starts = [a for a, _ in chunks]
  assert starts == [0] + ends[:-1] and ends[-1] == 23
  events = {s for s in range(1, 24) if s % 5 == 0 or s % 6 == 0
            or s % 10 == 0} | {23}
  assert events <= set(ends)  # no chunk crosses an event
  assert all(n <= 8 for _, n in chunks)
  # A resume plans from its step; k = 1 is one step per dispatch.
  assert dispatch.plan(12, 23, 8, (5, 6, 10))[0] == (12, 2)
  assert dispatch.plan(0, 5, 1, (20,)) == [(s, 1) for s in range(5)]
  # The recipe's events with a long log interval: full chunks only.
  recipe = dispatch.plan(0, 96 * 5, 32, (96, 96, 480))
  assert {n for _, n in recipe} == {32}


def test_stop_is_asked_at_every_step_of_a_chunk():
  asked = []

  def requested(step):
    asked.append(step)
    return step == 6
  assert dispatch.stop_requested(requested, 4, 8)
  assert asked == [5, 6, 7, 8]


# --------------------------------------------------------------- batches
def _host(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("sampler", ["random", "class_balanced"])
def test_stacked_batches_equal_the_one_step_batches(tiny_image_folder,
                                                    sampler):
  """Both pipelines' chunks (across epoch ends, one longer than an epoch)
  stack exactly the batches `iterate` yields."""
  kw = dict(data_dir=tiny_image_folder, imb_factor=0.1, batch_size=16,
            seed=3, mesh=MESH, sampler=sampler)
  device = data_lib.make_train_input("cifar10", pipeline="device", **kw)
  tfdata = data_lib.make_train_input("cifar10", pipeline="tfdata", **kw)
  spe = device.steps_per_epoch  # 9
  chunks = [(5, 4), (9, 8), (17, 2), (19, 12)]  # the last spans 3 epochs
  singles = [_host(b) for b in itertools.islice(device.iterate(5), 26)]
  for pipe in (device, tfdata):
    got = [_host(b) for b in pipe.iterate_chunks(chunks)]
    pos = 0
    for (first, n), stack in zip(chunks, got):
      assert stack["image"].shape == (n, 16, 32, 32, 3)
      assert stack["label"].shape == (n, 16)
      for i in range(n):
        for key in ("image", "label"):
          np.testing.assert_array_equal(stack[key][i], singles[pos][key],
                                        err_msg=f"{pipe.pipeline} {first}+{i}")
        pos += 1
  assert 12 > spe
  with pytest.raises(ValueError, match="Chunks must be consecutive"):
    list(tfdata.iterate_chunks([(0, 2), (3, 2)]))


# ------------------------------------------------------------ end to end
KW = dict(eval_every_steps=6, eval_every_epochs=None,
          checkpoint_every_steps=10, checkpoint_every_epochs=None,
          log_every_steps=5)


def _config(folder, k):
  return tiny_config(folder, arg="steps=20", steps_per_dispatch=k, **KW)


def _records(workdir):
  """metrics.jsonl without the timings."""
  out = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    out.append({k: v for k, v in r.items()
                if k not in ("images_per_sec", "eval_seconds")})
  return out


def _final_state(workdir):
  """The final checkpoint's arrays (step 20), as saved."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.PyTreeCheckpointer().restore(
      workdir / "checkpoints" / "20" / "state")


@pytest.fixture(scope="module")
def runs(tiny_image_folder, tmp_path_factory):
  """The tiny run with k = 1 and with k = 8, and the k = 8 run's Built."""
  root = tmp_path_factory.mktemp("dispatch")
  out, built = {}, {}
  real = builder_lib.build

  def keep(*args, **kwargs):
    b = real(*args, **kwargs)
    built["last"] = b
    return b
  mp = pytest.MonkeyPatch()
  mp.setattr(builder_lib, "build", keep)
  try:
    for k in (1, 8):
      out[k] = (train.train_and_evaluate(_config(tiny_image_folder, k),
                                         root / f"k{k}"), root / f"k{k}")
      built[k] = built.pop("last")
  finally:
    mp.undo()
  return out, built


@pytest.mark.slow
def test_eight_steps_per_dispatch_train_the_same_states(runs):
  (one, wd1), (eight, wd8) = runs[0][1], runs[0][8]
  for block in ("final", "best", "history"):
    assert eight[block] == one[block], block
  assert _records(wd8) == _records(wd1)
  best = [(wd / "best" / best_lib.BEST_FILE).read_bytes()
          for wd in (wd1, wd8)]
  assert best[0] == best[1]  # bit-identical on XLA's CPU backend
  a, b = _final_state(wd1), _final_state(wd8)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  for name in ("set_up", "first_dispatch", "training", "evaluation",
               "checkpoints"):
    assert eight["provenance"]["seconds"][name] >= 0.0, name


@pytest.mark.slow
def test_compiled_variants_are_bounded(runs):
  """Only the allowed lengths compile: at most 4 variants for k = 8 (the
  run above uses 4, 2 and 1), of the chunk and of its batches."""
  built = runs[1]
  allowed = len(dispatch.allowed_lengths(8))
  lengths = {n for _, n in dispatch.plan(0, 20, 8, (5, 6, 10))}
  assert built[8].train_chunk._cache_size() == len(lengths) <= allowed
  assert built[1].train_chunk._cache_size() == 0  # k = 1 never builds it
  assert built[1].train_step._cache_size() == 1


def _crash_after_chunks(monkeypatch, n_chunks: int):
  """The train input raises after `n_chunks` chunks (a kill)."""
  real = data_lib.make_train_input

  def make(*args, **kwargs):
    inp = real(*args, **kwargs)
    orig = inp.iterate_chunks

    def iterate_chunks(chunks):
      for i, b in enumerate(orig(chunks)):
        if i == n_chunks:
          raise RuntimeError(f"simulated kill after {n_chunks} chunks")
        yield b
    inp.iterate_chunks = iterate_chunks
    return inp
  monkeypatch.setattr(data_lib, "make_train_input", make)


@pytest.mark.slow
def test_stop_and_kill_in_the_middle_resume_to_the_same_numbers(
    runs, tiny_image_folder, tmp_path, monkeypatch):
  """k = 8: a stop asked at step 3 saves at the chunk's end (step 4); the
  resumed run is killed after its checkpoint at 10; the last resume ends
  with the uninterrupted run's numbers and records."""
  full, full_wd = runs[0][8]
  config = _config(tiny_image_folder, 8)
  wd = tmp_path / "run"
  with monkeypatch.context() as m:
    m.setattr(preemption.StopSignals, "requested",
              lambda self, step: step == 3)
    with pytest.raises(preemption.Preempted, match="at step 4"):
      train.train_and_evaluate(config, wd)
  assert ckpt_lib.saved_steps(wd / "checkpoints") == [4]
  with monkeypatch.context() as m:
    _crash_after_chunks(m, 5)  # chunks [4,5) [5,6) [6,10) [10,12) [12,14)
    with pytest.raises(RuntimeError, match="simulated kill"):
      train.train_and_evaluate(config, wd)
  assert ckpt_lib.saved_steps(wd / "checkpoints") == [4, 10]
  resumed = train.train_and_evaluate(config, wd)
  assert resumed["provenance"]["resumes"] == 2
  for block in ("final", "best", "history"):
    assert resumed[block] == full[block], block
  # The train record at step 5 averages the steps since the resume from 4
  # (step 5 alone), as after any resume between log steps, k = 1 too.
  spans_stop = lambda r: r["kind"] == "train" and r["step"] == 5
  assert ([r for r in _records(wd) if not spans_stop(r)]
          == [r for r in _records(full_wd) if not spans_stop(r)])
  jax.tree.map(np.testing.assert_array_equal, _final_state(wd),
               _final_state(full_wd))


# ---------------------------------------------------------------- config
def test_steps_per_dispatch_is_checked_and_resumable(tiny_image_folder,
                                                     tmp_path):
  """0 is refused before any work; a workdir whose config.json predates
  the field (or ran another k) resumes."""
  with pytest.raises(train.ConfigError, match="steps_per_dispatch=0 must "
                     "be a positive integer"):
    validation.validate_config(_config(tiny_image_folder, 0))
  old = run_config.config_to_dict(_config(tiny_image_folder, 1))
  del old["steps_per_dispatch"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  for k in (1, 8):
    run_config.check_resume(tmp_path, _config(tiny_image_folder, k))
