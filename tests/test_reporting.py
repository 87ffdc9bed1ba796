"""Progress lines: the rate and ETA exclude evaluation and checkpoint time."""

from __future__ import annotations

from nc_jax import reporting


class FakeClock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_eta_excludes_eval_time_and_adds_remaining_evals(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(reporting.time, "perf_counter", clock)
  p = reporting.Progress(total_steps=1000, steps_per_epoch=100, batch_size=10,
                         start_step=0, eval_every=100, bar=False)
  clock.t = 30.0  # first interval: compilation, no rate yet
  line, _ = p.line(100, {"loss": 1.0})
  assert "compiling" in line and "ETA --:--" in line
  # 100 steps of 10 images in 10 s of training, plus a 5 s evaluation.
  clock.t += 5.0
  p.exclude(5.0, evaluation=True)
  clock.t += 10.0
  line, ips = p.line(200, {"loss": 1.0})
  assert abs(ips - 100.0) < 1e-9
  # 800 steps left at 100 img/s = 80 s, + 8 evaluations at 5 s = 40 s.
  assert abs(p.eta_seconds(200) - 120.0) < 1e-6
  assert "ETA 2:00" in line
  # A slow interval moves the smoothed rate only part of the way.
  clock.t += 20.0
  _, ips = p.line(300, {"loss": 1.0})
  assert abs(ips - 50.0) < 1e-9
  rate = 0.3 * 50 + 0.7 * 100
  assert abs(p.eta_seconds(300) - (700 * 10 / rate + 7 * 5.0)) < 1e-6
