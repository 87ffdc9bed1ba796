"""The train state of the best evaluation so far: `WORKDIR/best/`."""

from __future__ import annotations

import errno
import json
import os
from typing import Any, Callable

import flax
import jax
import numpy as np
from etils import epath

from nc_jax import checkpoint as ckpt_lib
from nc_jax import preemption

def mean_top1(per_seed: list[dict]) -> float:
  """Mean test top-1 over the replicas of one evaluation."""
  return float(sum(m["top1"] for m in per_seed) / len(per_seed))


BEST_FILE = "state.msgpack"


def _host_copy(x: Any) -> Any:
  """A numpy copy of a replicated array, also where it spans processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def read_best(directory: os.PathLike | str) -> dict[str, Any] | None:
  """`{"state": state dict, "record": {...}}` of `directory/BEST_FILE`, or
  None when there is none.

  Raises:
    CheckpointError: the file exists but cannot be read.
  """
  path = epath.Path(directory) / BEST_FILE
  if not path.exists():
    return None
  try:
    blob = flax.serialization.msgpack_restore(path.read_bytes())
    return {"state": blob["state"], "record": json.loads(blob["record"])}
  except Exception as e:  # msgpack raises several types for damaged files
    raise ckpt_lib.CheckpointError(
        f"The best checkpoint {path} cannot be read ({type(e).__name__}: "
        f"{str(e)[:200]}). It was left as it is; move it away to go on "
        "without it.") from e


class BestCheckpoint:
  """The train state of the best evaluation so far, `WORKDIR/best/`.

  "Best" is the highest test top-1, mean over the replicas (`num_seeds`),
  by strict improvement (the first of equal evaluations wins, as in
  results.json's `best` block for one seed). It is one file,
  `best/state.msgpack` (flax msgpack of the whole train state and a record
  `step`, `epoch`, `top1` (the mean), `top1_per_seed`), written to a
  temporary name and renamed: about 20 ms for ResNet-32's state, where an
  orbax checkpoint takes 300-500 ms on a 2-core CPU. Process 0 writes it.

  Resume: the tracker starts from the restored evaluation history, and a
  best file newer than the restored step (a run killed after saving a best
  but before its next checkpoint) is deleted, since that history lost it;
  replaying the same steps saves it again. So a killed and resumed run ends
  with the same `best/` as an uninterrupted one.
  """

  def __init__(self, directory: os.PathLike | str, *, history: list[dict],
               start_step: int, warn: Callable[[str], None] | None = None):
    self.directory = epath.Path(directory)
    self.path = self.directory / BEST_FILE
    self._chief = jax.process_index() == 0
    if self._chief and self.path.exists():
      try:
        saved = read_best(self.directory)["record"]["step"]
      except ckpt_lib.CheckpointError as e:  # damaged storage (writes are atomic)
        target = self.directory.parent / ckpt_lib.DAMAGED_DIR / f"best_{BEST_FILE}"
        n = 1
        while target.exists():
          n += 1
          target = target.with_name(f"best_{n}_{BEST_FILE}")
        target.parent.mkdir(exist_ok=True)
        self.path.rename(target)
        if warn is not None:
          warn(f"warning: {self.path} cannot be read ({ckpt_lib.short_error(e, 120)}); "
               f"set aside as {target}. The next better evaluation writes a "
               "new one.")
        saved = None
      if saved is not None and saved > start_step:
        self.path.unlink()
    self.top1 = max((mean_top1(h["test"]) for h in history), default=None)

  def update(self, step: int, state: Any, entry: dict) -> bool:
    """Saves `state` if evaluation `entry` (a history entry) is a new best."""
    top1 = mean_top1(entry["test"])
    if self.top1 is not None and not top1 > self.top1:
      return False
    self.top1 = top1
    record = {"step": int(step), "epoch": float(entry["epoch"]), "top1": top1,
              "top1_per_seed": [float(m["top1"]) for m in entry["test"]]}
    if self._chief:
      host = jax.tree.map(_host_copy, state)
      data = flax.serialization.msgpack_serialize({
          "state": flax.serialization.to_state_dict(host),
          "record": json.dumps(record)})
      self.directory.mkdir(parents=True, exist_ok=True)
      tmp = self.directory / f".{BEST_FILE}.tmp-{os.getpid()}"
      try:
        tmp.write_bytes(data)
        tmp.replace(self.path)
      except OSError as e:
        if not preemption.is_no_space(e):
          raise
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                       str(self.path))
        full.needed = len(data)  # for the message
        raise full from None
      finally:
        tmp.unlink(missing_ok=True)
    return True

  def close(self) -> None:
    pass
