r"""One prepared script for a lent GPU: where a run's time goes, and what helps.

    python benchmarks/pack_data.py --dataset cifar10 \
        --data_dir cifar-10-python.tar.gz --imb_factors 0.01 \
        --out gpu_data/cifar10_lt_r0.01.npz          # here, once: 48.6 MiB
    python benchmarks/gpu_lease.py --data_dir gpu_data/cifar10_lt_r0.01.npz

(on the GPU machine, with `gpu_data/` carried; `OUT` names the folder the
JSON summary goes to, default ./out). In one call, inside `--budget_s`
(default 540, under a 600 s limit), it measures on the paper preset
(`--config`, default cifar10_r0.01_etf_dr; `--set key=value,...`
overrides fields):

1. `steps`: the train step for each k of `--ks` (steps per dispatch;
   default 1,8,32): ms per step with the batches built on the device
   (the loop's path), of the step alone (one stacked batch reused), and
   of building the batches alone; the first call's seconds (compiling);
2. `profile`: a short run (`--profile_epochs`, default 3, evaluating
   every epoch and checkpointing at each, with k = 1 and with the largest
   k, those of them in `--ks`)
   through `train.train_and_evaluate`: process start-up, set-up,
   compilation, training, evaluation and checkpoint seconds, the training
   split into step, input and the rest (dispatch and the loop's own work)
   with stage 1's step times, and a projection to `--full_epochs` (or,
   when 0, the preset's length) at one evaluation per epoch and one
   checkpoint per 5;
3. `seeds`: vmapped seeds (`--seeds`, default 1,3,8; `seeds_mode=vmap`)
   at the largest k: ms per step for all seeds, and against one seed;
4. `dtype`: `--dtypes` (default float32,bfloat16) at the largest k;
5. `full`: the whole run (`--full_epochs`, default the preset's 200) with
   the fastest k, one progress line per epoch, if the time left covers
   the projection; else it records why it was skipped.

The summary is rewritten after every stage, so what was measured comes
back even if the call is cut short. TensorFlow is never needed (the GPU
image has none): `NC_JAX_BLOCK_TF=1` makes importing it fail, as the test
does. ml_collections is not on that image: carry its wheel
(docs/performance.md gives the commands).
"""

from __future__ import annotations

import os
import sys
import time

T_PROCESS = time.perf_counter()  # before the imports: start-up counts them
if os.environ.get("NC_JAX_BLOCK_TF"):  # as on a host without TensorFlow
  sys.modules["tensorflow"] = None
  sys.modules["tensorflow_datasets"] = None

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import pathlib
import shutil
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


class Budget:
  """Seconds left of `--budget_s` since the process began."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - T_PROCESS)


def _config(args, epochs: int | None = None, **fields):
  """The preset (`epochs`: scaled to that length, as `epochs=N` in a config
  argument) with `--set`'s and this stage's fields (locked)."""
  from nc_jax.configs import cifar_lt
  c = cifar_lt.get_config(args.config + (f",epochs={epochs}" if epochs
                                         else ""))
  c.unlock()
  c.data_dir = args.data_dir
  c.pipeline = "device"
  for item in filter(None, args.set.split(",")):
    key, value = item.split("=", 1)
    *path, last = key.split(".")
    target = c
    for p in path:
      target = target[p]
    kind = type(target[last]) if target[last] is not None else str
    target[last] = (value.lower() in ("1", "true") if kind is bool
                    else kind(value))
  for key, value in fields.items():
    c[key] = value
  c.lock()
  return c


def _ms(seconds: float, steps: int) -> float:
  return round(1e3 * seconds / steps, 3)


def time_steps(config, *, k: int, timed_steps: int, warmup_chunks: int = 2
               ) -> dict:
  """ms per step of `config`'s train step at k steps per dispatch, with
  and without building the batches, and building them alone."""
  import jax
  from nc_jax import builder, data as data_lib, dispatch, sharding
  from nc_jax import steps as steps_lib
  mesh = sharding.make_mesh()
  inp = data_lib.make_train_input(
      config.dataset, data_dir=config.data_dir, imb_factor=config.imb_factor,
      profile=config.imb_profile, selection_seed=config.selection_seed,
      batch_size=config.batch_size, seed=config.seed, mesh=mesh,
      pipeline="device", sampler=config.sampler)
  spe, info = inp.steps_per_epoch, inp.info
  built = builder.build(
      config, num_classes=info.num_classes, image_shape=info.image_shape,
      mean=info.mean, std=info.std, class_counts=inp.counts,
      steps_per_epoch=spe, total_steps=spe * 200, mesh=mesh)
  n = max(1, timed_steps // k)
  chunks = [(i * k, k) for i in range(warmup_chunks + n)]
  runner = dispatch.Runner(built, inp, chunks, k)
  state, sums = built.init_state(), None
  t = time.perf_counter()
  state, sums, _ = runner.run(state, k, None)
  jax.block_until_ready(state)
  first = time.perf_counter() - t
  for _ in range(warmup_chunks - 1):
    state, sums, _ = runner.run(state, k, sums)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(n):
    state, sums, _ = runner.run(state, k, sums)
  jax.block_until_ready((state, sums))
  with_input = time.perf_counter() - t
  # The step alone: one batch (stack) reused.
  batch = (next(inp.iterate(0)) if k == 1 else
           next(inp.iterate_chunks([(0, k)])))
  etf = built.etf
  run = ((lambda s, x: built.train_step(s, batch, etf)) if k == 1 else
         (lambda s, x: built.train_chunk(s, batch, etf, x, True)))
  state, sums = run(state, sums)[:2]
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(n):
    state, sums = run(state, sums)[:2]
  jax.block_until_ready((state, sums))
  alone = time.perf_counter() - t
  # Building the batches alone.
  plan = [(i * k, k) for i in range(n)]
  source = inp.iterate(0) if k == 1 else inp.iterate_chunks(plan)
  t = time.perf_counter()
  last = [next(source) for _ in range(n)]
  jax.block_until_ready(last)
  inputs = time.perf_counter() - t
  return {"k": k, "steps_timed": n * k, "steps_per_epoch": spe,
          "first_call_s": round(first, 2),
          "ms_per_step": _ms(with_input, n * k),
          "ms_per_step_step_alone": _ms(alone, n * k),
          "ms_per_step_input_alone": _ms(inputs, n * k),
          "num_seeds": int(config.num_seeds),
          "compute_dtype": config.compute_dtype,
          "replicas": steps_lib.resolve_replica_mode(
              config.seeds_mode) if config.num_seeds > 1 else "single"}


def run_training(config, workdir: pathlib.Path) -> dict:
  """`train.train_and_evaluate` in `workdir`; its seconds and results."""
  from nc_jax import train
  t = time.perf_counter()
  res = train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t
  return {"wall_s": round(wall, 2),
          "seconds": res["provenance"]["seconds"],
          "final_top1": res["final"]["top1"], "best_top1": res["best"]["top1"],
          "evaluations": len(res["history"])}


def profile(args, k: int, step_ms: dict, spe: int) -> dict:
  """A short run at k; its time split by phase and projected to
  `--full_epochs`."""
  epochs = args.profile_epochs
  config = _config(args, epochs, steps_per_dispatch=k, log_every_steps=spe,
                   eval_every_epochs=1.0, checkpoint_every_epochs=1.0)
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="gpu_lease_profile_"))
  try:
    out = run_training(config, workdir / "run")
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  s, steps = out["seconds"], int(epochs * spe)
  step_s = step_ms["ms_per_step_step_alone"] * steps / 1e3
  input_s = step_ms["ms_per_step_input_alone"] * steps / 1e3
  evals, saves = epochs, epochs
  length = args.full_epochs or _config(args).num_epochs  # the preset's
  full = length * spe
  per_step = s["training"] / steps
  ckpts = max(1, int(length // 5))  # the recipe saves every 5 epochs
  out.update(
      k=k, epochs=epochs, steps=steps,
      split_training_s={"step": round(step_s, 2), "input": round(input_s, 2),
                        "dispatch_and_loop": round(s["training"] - step_s
                                                   - input_s, 2)},
      per_evaluation_s=round(s["evaluation"] / evals, 3),
      per_checkpoint_s=round(s["checkpoints"] / saves, 3),
      projected_epochs=length, projected_full_s=round(
          s["set_up"] + s["first_dispatch"] + per_step * full
          + length * s["evaluation"] / evals
          + ckpts * s["checkpoints"] / saves, 1))
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data_dir", required=True,
                 help="a data pack (benchmarks/pack_data.py) or the dataset")
  p.add_argument("--config", default="cifar10_r0.01_etf_dr")
  p.add_argument("--set", default="", help="field=value,... overrides")
  p.add_argument("--ks", default="1,8,32")
  p.add_argument("--seeds", default="1,3,8")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--timed_steps", type=int, default=192)
  p.add_argument("--profile_epochs", type=int, default=3)
  p.add_argument("--full_epochs", type=int, default=200,
                 help="the last stage's length; 0 skips it")
  p.add_argument("--stages", default="steps,profile,seeds,dtype,full")
  p.add_argument("--budget_s", type=float, default=540.0)
  p.add_argument("--out", default=os.environ.get("OUT", "out"))
  args = p.parse_args(argv)
  try:
    import ml_collections  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    print("error: ml_collections is missing; carry its wheel (see "
          "docs/performance.md, the GPU lease).", file=sys.stderr)
    return 2
  from nc_jax.kernels import xla_setup
  first = _config(args)
  xla_setup.apply(first)
  import jax
  from nc_jax.reporting import say
  budget = Budget(args.budget_s)
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  dev = jax.devices()[0]
  summary = {"config": args.config, "set": args.set,
             "data_dir": os.path.basename(args.data_dir),
             "device": f"{dev.platform}:{dev.device_kind}",
             "jax": jax.__version__, "stages": {}}

  def record(stage: str, value) -> None:
    summary["stages"][stage] = value
    summary["seconds_so_far"] = round(time.perf_counter() - T_PROCESS, 1)
    summary["tensorflow_imported"] = bool(sys.modules.get("tensorflow"))
    stats = getattr(dev, "memory_stats", lambda: None)() or {}
    if "peak_bytes_in_use" in stats:
      summary["peak_device_mib"] = round(stats["peak_bytes_in_use"] / 2**20)
    (out_dir / "gpu_lease.json").write_text(json.dumps(summary, indent=1))
    say(f"gpu_lease: {stage}: {json.dumps(value)}")

  stages = args.stages.split(",")
  ks = [int(x) for x in args.ks.split(",")]
  kmax = max(ks)
  steps = {}
  if "steps" in stages or "profile" in stages:
    for k in ks:
      steps[k] = time_steps(_config(args), k=k, timed_steps=args.timed_steps)
    record("steps", list(steps.values()))
  spe = next(iter(steps.values()))["steps_per_epoch"] if steps else None
  best_k = (min(steps, key=lambda k: steps[k]["ms_per_step"]) if steps
            else kmax)
  projected = None
  if "profile" in stages:
    runs = [profile(args, k, steps[k], spe)
            for k in sorted({1, kmax} & set(ks))]
    record("profile", {"process_start_up_s": round(_start_up(), 2),
                       "runs": runs})
    projected = min(r["projected_full_s"] for r in runs)
  if "seeds" in stages:
    rows = [time_steps(_config(args, num_seeds=s, seeds_mode="vmap"), k=kmax,
                       timed_steps=args.timed_steps)
            for s in (int(x) for x in args.seeds.split(","))]
    one = rows[0]["ms_per_step"]
    for r in rows:
      r["vs_first"] = round(r["ms_per_step"] / one, 3)
    record("seeds", rows)
  if "dtype" in stages:
    record("dtype", [time_steps(_config(args, compute_dtype=d), k=kmax,
                                timed_steps=args.timed_steps)
                     for d in args.dtypes.split(",")])
  if "full" in stages and args.full_epochs > 0:
    left = budget.left()
    if projected is None or projected > 0.9 * left:
      record("full", {"skipped": f"projected {projected} s, {left:.0f} s "
                      "left"})
    else:
      config = _config(args, args.full_epochs, steps_per_dispatch=best_k,
                       log_every_steps=spe)
      workdir = pathlib.Path(tempfile.mkdtemp(prefix="gpu_lease_full_"))
      try:
        record("full", dict(run_training(config, workdir / "run"),
                            k=best_k, epochs=config.num_epochs))
      finally:
        shutil.rmtree(workdir, ignore_errors=True)
  print(json.dumps(summary))
  return 0


_IMPORTED = {}


def _start_up() -> float:
  """Seconds from the process's start to the end of the imports the
  training needs (jax, flax, optax, orbax, nc_jax), measured once."""
  if "t" not in _IMPORTED:
    import flax, optax, orbax.checkpoint  # noqa: F401,E401
    from nc_jax import train  # noqa: F401
    _IMPORTED["t"] = time.perf_counter() - T_PROCESS
  return _IMPORTED["t"]


if __name__ == "__main__":
  _start_up()
  sys.exit(main())
