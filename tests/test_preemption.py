"""The stop watchdog (`nc_jax.preemption.StopSignals`) with real signals.

Signals go to this very process; the watchdog's exits are recorded instead
of ending pytest. The end-to-end stops (a signal to a training run, one and
two processes, then an exact resume) are in tests/test_distributed.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from nc_jax import preemption


class Recorder:

  def __init__(self):
    self.exits, self.lines = [], []

  def exit(self, code, text):
    self.exits.append((code, text))


def _stop(grace=5.0):
  rec = Recorder()
  stop = preemption.StopSignals(grace_seconds=grace, say=rec.lines.append)
  stop._exit = rec.exit  # pylint: disable=protected-access
  return stop, rec


def _wait(cond, seconds=5.0):
  deadline = time.monotonic() + seconds
  while not cond():
    assert time.monotonic() < deadline
    time.sleep(0.01)


@pytest.fixture
def hup_default():
  """SIGHUP at its default for the test (the suite may run under nohup,
  which hands every process SIGHUP ignored), restored afterwards."""
  old = signal.signal(signal.SIGHUP, signal.SIG_DFL)
  yield
  signal.signal(signal.SIGHUP, old)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT,
                                 signal.SIGHUP])
def test_a_signal_requests_a_stop_at_the_next_step(sig, hup_default):
  del hup_default
  before = {s: signal.getsignal(s) for s in preemption.stop_signals()}
  stop, rec = _stop()
  with stop:
    stop.mark_trained()
    assert not stop.requested(7) and not stop.pending()
    os.kill(os.getpid(), sig)
    _wait(lambda: stop.requested(7))
    assert stop.pending()
    assert rec.exits == []
    assert "stopping at the next step boundary" in rec.lines[0]
    err = stop.stopped(7, "/w/checkpoints")
    assert isinstance(err, preemption.Preempted) and err.exit_code == 75
    assert f"stopped by {sig.name} at step 7" in str(err)
  # The handlers are restored, whatever they were (default_int_handler in
  # a terminal, SIG_IGN for SIGINT in a background job).
  assert {s: signal.getsignal(s) for s in before} == before


def test_sighup_inherited_ignored_stays_ignored():
  """Under nohup a run keeps training when its terminal closes."""
  old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
  try:
    assert signal.SIGHUP not in preemption.stop_signals()
    stop, _ = _stop()
    with stop:
      assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGHUP, old)


def test_second_sigint_after_the_stops_checkpoint_says_it_is_saved():
  stop, rec = _stop()
  with stop:
    stop.mark_trained()
    os.kill(os.getpid(), signal.SIGINT)
    _wait(lambda: stop.requested(20))
    stop.mark_saved(20)  # the loop saved the stop's checkpoint
    os.kill(os.getpid(), signal.SIGINT)
    _wait(lambda: rec.exits)
  code, text = rec.exits[0]
  assert code == preemption.EXIT_PREEMPTED
  assert "the checkpoint at step 20 is saved" in text
  assert "resumes from step 20" in text
  assert "nothing" not in text


def test_second_sigint_exits_at_once():
  stop, rec = _stop()
  with stop:
    stop.mark_trained()
    os.kill(os.getpid(), signal.SIGINT)
    _wait(lambda: stop.requested(1))
    os.kill(os.getpid(), signal.SIGINT)
    _wait(lambda: rec.exits)
  assert rec.exits[0][0] == preemption.EXIT_INTERRUPTED == 130
  assert "SIGINT again: exiting at once" in rec.exits[0][1]
  assert "without a checkpoint of the steps since the last one" in (
      rec.exits[0][1])


def test_nothing_to_save_exits_at_once():
  stop, rec = _stop()
  with stop:
    stop.mark_saved(40)  # e.g. just restored; loading or compiling now
    os.kill(os.getpid(), signal.SIGTERM)
    _wait(lambda: rec.exits)
  code, text = rec.exits[0]
  assert code == preemption.EXIT_PREEMPTED
  assert "nothing trained since the last checkpoint" in text
  assert "resumes from step 40" in text


def test_no_step_boundary_within_the_grace_period():
  stop, rec = _stop(grace=0.3)
  with stop:
    stop.mark_trained()
    t = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
    _wait(lambda: rec.exits)
    waited = time.monotonic() - t
  assert 0.25 < waited < 3
  code, text = rec.exits[0]
  assert code == preemption.EXIT_PREEMPTED
  assert "no step boundary within 0.3s" in text
  assert "resumes from the start" in text
