r"""Four tiny runs whose numbers a refactoring must not move.

    python benchmarks/fingerprint_runs.py --out /tmp/fp_before.json
    ... change the code ...
    python benchmarks/fingerprint_runs.py --out /tmp/fp_after.json
    python benchmarks/fingerprint_runs.py --compare /tmp/fp_before.json /tmp/fp_after.json

Trains, with `nc_jax.train.train_and_evaluate` on data this script writes
(a 10-class image-folder tree, a 3-class ImageNet-style folder with a
train list), four configs that cover the loop's paths: `etf_dr` on the
device pipeline, `ce` on tf.data, `ldam_drw` with the class-balanced
sampler, and the streamed ImageNet-LT recipe. For each it records
`results.json`'s `final`, `best`, `history` and `train_counts` and their
sha256, and the logits of the trained model (`nc_jax.runs`), so that two
versions of the code can be compared byte for byte. To fingerprint a
version in a `git worktree`, run the script from it with
`PYTHONPATH=<worktree>`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import tempfile

import numpy as np


def _image_folder(root: pathlib.Path) -> pathlib.Path:
  """10 classes, 40 train and 6 test images each: a colour per class."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  colours = rng.uniform(30, 225, size=(10, 3))
  for split, n in (("train", 40), ("test", 6)):
    for c in range(10):
      d = root / split / f"class_{c:02d}"
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        img = colours[c] + rng.normal(0, 25, size=(32, 32, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            d / f"{i:04d}.png")
  return root


def _imagenet_folder(root: pathlib.Path) -> str:
  """3 classes, 5 JPEGs of varied sizes each; a train list of 4/3/2."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  lines = []
  for split in ("train", "test"):
    for c in range(3):
      d = root / split / f"n{c:08d}"
      d.mkdir(parents=True)
      for i in range(5):
        hw = rng.integers(20, 60, 2)
        img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        Image.fromarray(img).save(d / f"{i}.JPEG", quality=90)
        if split == "train" and i < 4 - c:
          lines.append(f"train/n{c:08d}/{i}.JPEG {c}")
  (root / "list.txt").write_text("\n".join(lines))
  return str(root / "list.txt")


def _configs(folder: pathlib.Path, imagenet: pathlib.Path, lst: str):
  from nc_jax.configs import cifar_lt  # pylint: disable=g-import-not-at-top
  small = dict(data_dir=str(folder), backbone="resnet8", imb_factor=0.1,
               log_every_steps=2, eval_every_epochs=None, eval_every_steps=4,
               checkpoint_every_epochs=None, checkpoint_every_steps=4)
  out = {}
  for name, arg, extra in (
      ("etf_dr_device", "tiny,method=etf_dr,steps=8", dict(pipeline="device")),
      ("ce_tfdata", "tiny,method=ce,steps=8", dict(pipeline="tfdata")),
      ("ldam_drw_balanced", "tiny,method=ldam_drw,steps=8",
       dict(pipeline="device", sampler="class_balanced")),
  ):
    c = cifar_lt.get_config(arg)
    c.unlock()
    c.update({**small, **extra})
    c.lock()
    out[name] = c
  c = cifar_lt.get_config("imagenet_lt,method=ce,steps=4")
  c.unlock()
  c.update(dict(data_dir=str(imagenet), imagenet_lt_train_list=lst,
                backbone="resnet8", batch_size=3, eval_batch_size=4,
                log_every_steps=1, eval_every_epochs=None, eval_every_steps=2,
                checkpoint_every_epochs=None, checkpoint_every_steps=2))
  c.optim.warmup_epochs = 0
  c.lock()
  out["imagenet_lt_stream"] = c
  return out


def _sha(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint(work: pathlib.Path) -> dict:
  """Trains the four runs under `work`; returns their fingerprints."""
  from nc_jax import runs, train  # pylint: disable=g-import-not-at-top
  folder = _image_folder(work / "folder")
  lst = _imagenet_folder(work / "imagenet")
  out = {}
  for name, config in _configs(folder, work / "imagenet", lst).items():
    res = train.train_and_evaluate(config, work / name)
    keep = {k: res[k] for k in ("final", "best", "history", "train_counts")}
    entry = {k: _sha(v) for k, v in keep.items()}
    if name == "etf_dr_device":
      run = runs.load(work / name)
      images = np.stack([np.asarray(__import__("PIL.Image").Image.open(p))
                         for p in sorted((folder / "test").rglob("*.png"))])
      entry["logits"] = hashlib.sha256(
          np.asarray(run.predict(images), np.float32).tobytes()).hexdigest()
    entry["top1"] = res["final"]["top1"]
    out[name] = {"sha256": entry, "results": keep}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", help="write the fingerprints here (JSON)")
  p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                 help="compare two fingerprint files; exit 1 if they differ")
  args = p.parse_args(argv)
  if args.compare:
    a, b = (json.loads(pathlib.Path(f).read_text()) for f in args.compare)
    same = True
    for name in sorted(set(a) | set(b)):
      ha, hb = a.get(name, {}).get("sha256"), b.get(name, {}).get("sha256")
      ok = ha == hb
      same &= ok
      print(f"{name}: {'identical' if ok else 'DIFFERENT'}"
            + ("" if ok else f"\n  {ha}\n  {hb}"))
    return 0 if same else 1
  with tempfile.TemporaryDirectory() as tmp:
    out = fingerprint(pathlib.Path(tmp))
  text = json.dumps(out, indent=1)
  if args.out:
    pathlib.Path(args.out).write_text(text)
  for name, v in out.items():
    print(name, v["sha256"]["top1"], v["sha256"]["final"][:16])
  return 0


if __name__ == "__main__":
  sys.exit(main())
