"""Many training steps per dispatch: the plan of chunks and their runner.

With `steps_per_dispatch = k > 1` the loop runs up to k train steps in one
compiled call (`steps.compile_train_chunk`: `jax.lax.scan` over k batches
already on the devices), so the host dispatches once per chunk instead of
once per step. What is computed does not change: the batches are the
plan's (`TrainInput.iterate_chunks`), the metrics are summed per step in
step order, and every event keeps its exact step, because a chunk never
crosses one:

- the events are the multiples of `log_every_steps`, of the evaluation
  and of the checkpoint interval, and the last step;
- from step s the next event is e, and the `e - s` steps in between run as
  chunks of `chunk_lengths(e - s, k)`: k while at least k remain, then
  powers of two (so 20 steps with k = 8 run as 8, 8, 4). Only the lengths
  of `allowed_lengths(k)` ever occur (k and the powers of two below it:
  4 for k = 8, 6 for k = 32), each compiled once, so a run compiles at
  most that many variants of the chunk and of its batches.

A stop request (SIGTERM, SIGINT, SIGHUP) is answered after the chunk in
flight, at its last step: a stop waits up to k steps longer than with
k = 1 (k x the step time: 0.2 s for k = 32 at 6 ms a step, 2.4 s for k = 8
at 0.3 s on two CPU cores), and a k whose chunk outlasts
`preemption_grace_seconds` is cut off without a checkpoint. Every step of
a chunk is still reported to `StopSignals.requested` in order, so several
processes agree on the step as before (all run the same chunks).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from nc_jax import sharding


def allowed_lengths(k: int) -> tuple[int, ...]:
  """The chunk lengths a run with `steps_per_dispatch = k` uses, descending:
  k and every power of two below it."""
  if k < 1:
    raise ValueError(f"steps_per_dispatch must be >= 1, got {k}.")
  out, p = [k], 1
  while p < k:
    out.append(p)
    p *= 2
  return tuple(sorted(set(out), reverse=True))


def chunk_lengths(n: int, k: int) -> list[int]:
  """`n` steps as chunks of at most `k`: k while k remain, then the binary
  digits of the rest, largest first (each in `allowed_lengths(k)`)."""
  out = []
  while n > 0:
    length = k if n >= k else 1 << (n.bit_length() - 1)
    out.append(length)
    n -= length
  return out


def next_event(step: int, total: int, every: Sequence[int]) -> int:
  """The first event after `step`: a multiple of one of `every`, or
  `total`."""
  return min([total] + [(step // e + 1) * e for e in every if e > 0])


def plan(start: int, total: int, k: int, every: Sequence[int]
         ) -> list[tuple[int, int]]:
  """`(first step, length)` of every dispatch from `start` to `total`.

  Args:
    start: the step the run resumes from (0 for a fresh run).
    total: the run's last step.
    k: `steps_per_dispatch`.
    every: the event intervals in steps (log, evaluation, checkpoint).

  Returns:
    Consecutive chunks covering `[start, total)`, none crossing an event.
  """
  allowed_lengths(k)  # checks k
  out, step = [], int(start)
  while step < total:
    for length in chunk_lengths(next_event(step, total, every) - step, k):
      out.append((step, length))
      step += length
  return out


class Runner:
  """Runs the dispatches of a `plan` on a `builder.Built`'s steps.

  k = 1 runs `train_step` on `train_input.iterate(start)`'s batches, one
  call per step, and sums the metrics with a jitted add (the loop as it
  always was); k > 1 runs `train_chunk` on
  `train_input.iterate_chunks(plan)`'s stacked batches.
  """

  def __init__(self, built, train_input, chunks: list[tuple[int, int]],
               k: int):
    self.built, self.k, self.chunks = built, int(k), chunks
    if not chunks:
      self._batches = iter(())
    elif self.k == 1:
      self._batches = train_input.iterate(chunks[0][0])
    else:
      self._batches = train_input.iterate_chunks(chunks)
    self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    self._replicated = sharding.replicated_sharding(train_input.mesh)
    self._zeros: Any = None

  def run(self, state, n: int, sums: dict | None
          ) -> tuple[Any, dict, dict]:
    """The next dispatch, of `n` steps.

    Args:
      state: the train state (donated).
      n: the chunk's length (the plan's).
      sums: the log interval's metric sums so far; None at its start.

    Returns:
      `(state, sums, last)`: the new state, the sums including these steps,
      the last step's metrics.
    """
    batches = next(self._batches)
    etf = self.built.etf
    if self.k == 1:
      state, out = self.built.train_step(state, batches, etf)
      return state, (out if sums is None else self._add(sums, out)), out
    fresh = sums is None
    if fresh:
      sums = self._fresh_sums(state, batches)
    return self.built.train_chunk(state, batches, etf, sums, fresh)

  def _fresh_sums(self, state, batches) -> dict:
    """A metrics tree of the step's shapes for an interval's first chunk
    (its values are unused: `fresh` starts the sums anew)."""
    if self._zeros is None:
      one = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batches)
      shapes = jax.eval_shape(self.built.train_step, state, one,
                              self.built.etf)[1]
      self._zeros = jax.jit(lambda: jax.tree.map(
          lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                            out_shardings=self._replicated)
    return self._zeros()


def stop_requested(requested: Callable[[int], bool], first: int,
                   last: int) -> bool:
  """Asks `requested` about every step of a chunk, in order (several
  processes agree on a sync step only when each is asked), and whether
  any said stop."""
  return any([requested(s) for s in range(first + 1, last + 1)])
