"""The faults of real machines at the checkpoint layer, with small pytrees.

A damaged checkpoint (a truncated data file) is set aside, never deleted,
and the one before it restored; one that reads but does not fit the model
stops with one short line; a full disk during a save is one `NoSpace`
error with the partial checkpoint removed. The same faults on real runs,
end to end: tests/test_train.py and tests/test_distributed.py.
"""

from __future__ import annotations

import errno
import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nc_jax import best as best_lib
from nc_jax import checkpoint as ckpt_lib
from nc_jax import preemption
from nc_jax import reporting


def _state(value: float, n: int = 3000):
  # Noise, not constants: orbax compresses, and the data files must be
  # large enough to cut.
  noise = np.random.default_rng(int(value)).normal(size=n)
  return {"w": jnp.asarray(value + noise, jnp.float32),
          "b": jnp.full((4,), value, jnp.float32)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=x.sharding),
                      state)


def _saved(tmp_path, steps=(2, 4)) -> ckpt_lib.Checkpointer:
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=None)
  for s in steps:
    ck.save(s, _state(float(s)), {"history": [{"step": s}]})
  return ck


def _truncate_largest(step_dir: pathlib.Path) -> pathlib.Path:
  # The array data: OCDBT's data files of the process that wrote them.
  f = max((p for p in step_dir.rglob("*") if p.is_file()
           and p.parent.name == "d" and p.parent.parent.name.startswith(
               "ocdbt.process")), key=lambda p: p.stat().st_size)
  with f.open("r+b") as fh:
    fh.truncate(f.stat().st_size // 3)
  return f


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_used(
    tmp_path):
  ck = _saved(tmp_path)
  _truncate_largest(tmp_path / "checkpoints" / "4")
  damaged = _files(tmp_path / "checkpoints" / "4")
  lines = []
  step, state, record = ck.restore_newest(_abstract(_state(0.0)),
                                          warn=lines.append)
  assert step == 2 and record["history"] == [{"step": 2}]
  np.testing.assert_array_equal(state["w"], _state(2.0)["w"])
  aside = tmp_path / "damaged" / "checkpoint_4"
  assert _files(aside) == damaged  # moved, byte for byte, not deleted
  assert not (tmp_path / "checkpoints" / "4").exists()
  assert len(lines) == 1 and "\n" not in lines[0]
  assert lines[0].startswith("warning: the checkpoint at step 4 cannot be "
                             "read")
  assert f"set aside as {aside}" in lines[0]
  assert "Resuming from the checkpoint at step 2." in lines[0]
  assert "TensorStore" not in lines[0] and len(lines[0]) < 400
  # A later save of the same step finds its place free.
  ck.save(4, _state(4.0), {"history": []})
  assert ck.latest_step() == 4
  ck.close()


def test_no_intact_checkpoint_starts_from_step_zero(tmp_path):
  ck = _saved(tmp_path)
  for s in (2, 4):
    _truncate_largest(tmp_path / "checkpoints" / str(s))
  lines = []
  assert ck.restore_newest(_abstract(_state(0.0)),
                           warn=lines.append) == (None, None, {})
  assert sorted(p.name for p in (tmp_path / "damaged").iterdir()) == [
      "checkpoint_2", "checkpoint_4"]
  assert "No other checkpoint: starting from step 0." in lines[-1]
  ck.close()


def test_a_checkpoint_of_another_model_stops_with_one_short_line(tmp_path):
  ck = _saved(tmp_path)
  before = _files(tmp_path / "checkpoints")
  other = _abstract(_state(0.0, n=2000))  # the model changed
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ck.restore_newest(other, warn=pytest.fail)
  msg = str(e.value)
  assert "\n" not in msg and len(msg) < 500, msg
  assert "does not fit this run's model" in msg and "step 4" in msg
  assert "use a new --workdir" in msg
  assert _files(tmp_path / "checkpoints") == before  # nothing moved
  assert not (tmp_path / "damaged").exists()
  ck.close()


def test_a_full_disk_during_a_save_is_one_error_and_leaves_the_rest(
    tmp_path, monkeypatch):
  ck = _saved(tmp_path, steps=(2,))
  intact = _files(tmp_path / "checkpoints" / "2")
  real_save = ocp.CheckpointManager.save

  def full_disk(self, step, *a, **k):
    # What orbax does on a full disk: a partial temporary folder, then
    # TensorStore's error.
    (pathlib.Path(self.directory) / f"{step}.orbax-checkpoint-tmp" / "state"
     ).mkdir(parents=True)
    raise ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database: '
        "Failed to write 1582474 bytes to file 20: No space left on device "
        "[os_error_code='28']")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(preemption.NoSpace) as e:
    ck.save(4, _state(4.0), {"history": []})
  assert e.value.exit_code == preemption.EXIT_NO_SPACE == 74
  msg = str(e.value)
  assert msg.startswith("no space left on the device for the checkpoint at "
                        f"step 4 in {tmp_path / 'checkpoints'}: it needs "
                        "about 0.")
  assert "The checkpoints before it (2) are intact" in msg
  assert "run the same command to resume" in msg
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  assert _files(tmp_path / "checkpoints" / "2") == intact
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  ck.close()


def test_is_no_space_reads_the_cause_chain():
  assert preemption.is_no_space(OSError(errno.ENOSPC, "full"))
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as inner:
      raise RuntimeError("write failed") from inner
  except RuntimeError as outer:
    assert preemption.is_no_space(outer)
  assert not preemption.is_no_space(OSError(errno.EACCES, "denied"))
  assert not preemption.is_no_space(ValueError("shape mismatch"))


def test_a_damaged_best_file_is_set_aside_with_a_warning(tmp_path):
  best = tmp_path / "best"
  best.mkdir()
  (best / best_lib.BEST_FILE).write_bytes(b"\x93not msgpack")
  lines = []
  tracker = best_lib.BestCheckpoint(best, history=[], start_step=4,
                                    warn=lines.append)
  aside = tmp_path / "damaged" / f"best_{best_lib.BEST_FILE}"
  assert aside.read_bytes() == b"\x93not msgpack"
  assert not (best / best_lib.BEST_FILE).exists()
  assert len(lines) == 1 and lines[0].startswith("warning: ")
  assert tracker.top1 is None


def test_metrics_with_a_cut_last_line_are_truncated_cleanly(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      json.dumps({"step": 2, "kind": "train"}) + "\n"
      + json.dumps({"step": 4, "kind": "train"}) + "\n"
      + '{"step": 6, "ki')  # a write cut by a full disk or a kill
  writer = reporting.MetricWriter(tmp_path, tensorboard=False)
  writer.truncate_after(4)
  assert [json.loads(l)["step"] for l in
          (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_closed_event_loop_noise_from_orbax_is_not_printed(tmp_path):
  ckpt_lib.Checkpointer(tmp_path / "c", keep=None).close()  # installs it
  seen = []
  hook = ckpt_lib._quiet_closed_loops(seen.append)  # pylint: disable=protected-access
  assert getattr(sys.unraisablehook, "nc_jax_quiet", False)
  hook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"),
                             object=None))
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"),
                                object=None)
  hook(other)
  assert seen == [other]
