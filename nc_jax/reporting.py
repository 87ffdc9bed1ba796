"""What a run shows and writes: progress lines, JSON lines, TensorBoard.

Only process 0 prints and writes; the other processes of a multi-host job
stay silent, so logs read the same on one host or many.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Mapping

import jax


def is_chief() -> bool:
  return jax.process_index() == 0


_BAR = None  # the live tqdm bar, when stdout is a terminal


def say(msg: str) -> None:
  """Prints a line from process 0, flushed (progress must show up live)."""
  if not is_chief():
    return
  if _BAR is not None:
    _BAR.write(msg, file=sys.stdout)
  else:
    print(msg, file=sys.stdout, flush=True)


def _fmt_seconds(s: float) -> str:
  s = int(max(s, 0))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:d}:{sec:02d}"


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a partial line (a write cut
  by a kill or a full disk), which the resumed run writes again."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class MetricWriter:
  """Appends scalars to `metrics.jsonl` and TensorBoard event files."""

  def __init__(self, workdir: pathlib.Path, *, tensorboard: bool = True):
    self._active = is_chief()
    self._jsonl = workdir / "metrics.jsonl"
    self._tb = None
    if self._active and tensorboard:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
      except ImportError:  # a GPU host without TF: metrics.jsonl only
        tf = None
      if tf is not None:
        self._tf = tf
        self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))

  def write(self, step: int, kind: str, scalars: Mapping[str, Any]) -> None:
    if not self._active:
      return
    record = {"step": int(step), "kind": kind}
    record.update({k: v for k, v in scalars.items()})
    try:
      with self._jsonl.open("a") as f:
        f.write(json.dumps(record, default=float) + "\n")
    except OSError as e:  # name the file (a failed write does not)
      if e.filename is not None:
        raise
      raise OSError(e.errno, e.strerror, str(self._jsonl)) from e
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for k, v in scalars.items():
          if isinstance(v, (int, float)) and v is not None:
            self._tf.summary.scalar(f"{kind}/{k}", float(v))
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (they are redone after a resume)."""
    if not self._active or not self._jsonl.exists():
      return
    keep = [line for line in self._jsonl.read_text().splitlines()
            if _step_of(line) is not None and _step_of(line) <= step]
    tmp = self._jsonl.with_name(f".{self._jsonl.name}.tmp")
    try:
      tmp.write_text("".join(line + "\n" for line in keep))
      tmp.replace(self._jsonl)
    finally:
      tmp.unlink(missing_ok=True)

  def close(self) -> None:
    if self._tb is not None:
      tb, self._tb = self._tb, None
      tb.close()


class Progress:
  """Throughput, ETA and (on a terminal) a live bar for the training loop.

  The rate is an exponential moving average over log intervals of training
  time only: evaluation and checkpoint time is reported through `exclude`
  and does not count. The ETA adds the remaining evaluations at their mean
  measured duration. On a terminal a tqdm bar advances every step; in logs
  and pipes only the progress lines are printed.
  """

  def __init__(self, *, total_steps: int, steps_per_epoch: int,
               batch_size: int, start_step: int, eval_every: int,
               smoothing: float = 0.3, bar: bool | None = None):
    self.total = total_steps
    self.spe = steps_per_epoch
    self.batch = batch_size
    self.eval_every = eval_every
    self._alpha = smoothing
    self._t0 = time.perf_counter()
    self._step0 = start_step
    self._excluded = 0.0
    self._rate = None  # smoothed images/s
    self._first_interval = True
    self._eval_times: list[float] = []
    global _BAR
    if bar is None:
      bar = is_chief() and sys.stdout.isatty()
    self._bar = None
    if bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = _BAR = tqdm(total=total_steps, initial=start_step,
                              unit="step", dynamic_ncols=True,
                              file=sys.stdout, leave=False)

  def step(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def exclude(self, seconds: float, *, evaluation: bool = False) -> None:
    """Removes `seconds` (an evaluation or checkpoint) from the rate."""
    self._excluded += seconds
    if evaluation:
      self._eval_times.append(seconds)

  def eta_seconds(self, step: int) -> float | None:
    if self._rate is None:
      return None
    train = (self.total - step) * self.batch / self._rate
    evals_left = (self.total // self.eval_every - step // self.eval_every
                  + (self.total % self.eval_every != 0))
    mean_eval = (sum(self._eval_times) / len(self._eval_times)
                 if self._eval_times else 0.0)
    return train + evals_left * mean_eval

  def line(self, step: int, scalars: Mapping[str, float]) -> tuple[str, float]:
    """Returns a progress line for `step` (done steps) and the images/s of
    the interval's training time."""
    now = time.perf_counter()
    dt = max(now - self._t0 - self._excluded, 1e-9)
    ips = (step - self._step0) * self.batch / dt
    # The first interval includes compilation; its rate says little.
    if not self._first_interval:
      self._rate = ips if self._rate is None else (
          self._alpha * ips + (1 - self._alpha) * self._rate)
    rate_txt = "compiling" if self._first_interval else f"{ips:,.0f} img/s"
    eta = self.eta_seconds(step)
    eta_txt = "--:--" if eta is None else _fmt_seconds(eta)
    self._t0, self._step0, self._excluded = now, step, 0.0
    self._first_interval = False
    epoch = step / self.spe
    pct = 100.0 * step / self.total
    fields = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
    if self._bar is not None:
      self._bar.set_postfix_str(f"{fields} | {rate_txt} | ETA {eta_txt}",
                                refresh=False)
    return (f"[{pct:5.1f}%] epoch {epoch:6.2f} step {step}/{self.total} "
            f"{fields} | {rate_txt} | ETA {eta_txt}", ips)

  def close(self) -> None:
    global _BAR
    if self._bar is not None:
      self._bar.close()
      self._bar = _BAR = None


def eval_line(epoch: float, split: str, m: Mapping[str, Any]) -> str:
  def f(key):
    v = m.get(key)
    return "  n/a" if v is None else f"{v:5.2f}"
  return (f"eval {split} @ epoch {epoch:g}: top1 {f('top1')} top5 {f('top5')} "
          f"| head {f('head')} medium {f('medium')} tail {f('tail')} "
          f"| ece {f('ece')} loss {m.get('loss', float('nan')):.4f}")
