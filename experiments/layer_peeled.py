"""Minority collapse in the layer-peeled model, and what a fixed ETF changes.

The layer-peeled model (Fang et al. 2021) replaces the network below the
classifier by free feature vectors h_i, one per sample, constrained to
`||h_i|| <= sqrt(E_H)`, and the classifier by columns `w_c` with
`||w_c||^2 <= E_W`. K_A majority classes have n_A samples each and K_B
minority classes n_A / R each. Three settings (Yang et al. 2022, Sec. 3-4):

  learnable_ce  W learnable, softmax cross entropy on logits h^T W.
  etf_ce        W = sqrt(E_W) M fixed (M a simplex ETF), cross entropy.
  etf_dr        W = sqrt(E_W) M fixed, the paper's dot-regression loss
                (1 / (2 sqrt(E_W E_H))) (w_c^T h - sqrt(E_W E_H))^2.

How the imbalance enters. The objective is `sum_c (n_c / N) mean_{i in c}
loss_i`, so it depends on n_A only through R; each class is represented by
`features_per_class` free vectors and weighted by n_c / N (exact for any real
R, e.g. n_A / R < 1). Features take one projected gradient step on their own
sample's loss (step `lr_h`), which is what plain gradient descent on N
per-sample copies does up to the constant N; the classifier takes a projected
step on the weighted mean loss (step `lr_w`). So the majority dominates W's
gradient exactly as in Fang et al.'s model, while with a fixed W every
feature evolves on its own and R cannot matter.

Convergence criterion (`steps_to_converge`): the first step at which every
feature has cosine >= `cos_tol` (0.99) with its own class's classifier column.
For the fixed ETF that is the known optimum. With a learnable classifier on
imbalanced data the optimum is not self-dual, so the criterion may never
hold; then the record says `converged: false` and reports `steps`.
`steps_to_nc1` (at `log_every` resolution) is the first logged step with
NC1 <= `nc1_tol`, which every setting reaches at its optimum.

A second, R-free study compares how fast etf_ce and etf_dr converge over a
grid of norm budgets E = E_W = E_H and matched step sizes. With free features
a large enough step lands on the target in one projected step under either
loss, so only matched step sizes are compared. Cross entropy saturates once
the logit scale sqrt(E_W E_H) is large (its pull on h decays
exponentially in sqrt(E_W E_H)); the DR loss's angular dynamics do not
depend on E, but near the optimum it is flat ((1 - cos)^2), so at small E
cross entropy wins.

Usage: python -m experiments.layer_peeled --out runs/layer_peeled

References:
  Fang, He, Long, Su. Exploring deep neural networks via layer-peeled model:
  Minority collapse in imbalanced training. PNAS 2021.
  Yang et al. Inducing Neural Collapse in Imbalanced Learning. NeurIPS 2022.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from nc_jax import etf, nc_metrics  # pylint: disable=g-import-not-at-top

SETTINGS = ("learnable_ce", "etf_ce", "etf_dr")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on (written to layer_peeled.json)."""
  k_a: int = 5
  k_b: int = 5
  feature_dim: int = 10
  features_per_class: int = 16
  e_w: float = 1.0  # unit ETF columns and unit features, as the reference.
  e_h: float = 1.0
  lr_h: float = 1.0
  lr_w: float = 1.0
  steps: int = 2000
  log_every: int = 10
  cos_tol: float = 0.99
  nc1_tol: float = 1e-3
  seed: int = 0
  ratios: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
  curve_ratio: float = 100.0
  conv_e: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
  conv_lrs: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
  conv_steps: int = 1000

  @property
  def num_classes(self) -> int:
    return self.k_a + self.k_b


def _project(x: jax.Array, radius: jax.Array, axis: int) -> jax.Array:
  """Projects each vector along `axis` onto the ball of the given radius."""
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


def _per_sample_loss(setting: str, h: jax.Array, w: jax.Array,
                     labels: jax.Array, scale: jax.Array) -> jax.Array:
  """`(N,)` losses of features `h (N, d)` against classifier `w (d, K)`."""
  if setting == "etf_dr":
    # Paper form of DR (Eq. 6); written here rather than through
    # nc_jax.losses so that E_W, E_H can be traced (vmapped) values.
    dot = jnp.sum(h * w.T[labels], axis=1)
    return (dot - scale) ** 2 / (2.0 * scale)
  logp = jax.nn.log_softmax(h @ w, axis=1)
  return -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]


def _train(setting: str, cfg: Config, ratio: jax.Array, e_w: jax.Array,
           e_h: jax.Array, lr_h: jax.Array, lr_w: jax.Array, steps: int
           ) -> dict[str, jax.Array]:
  """One projected-gradient-descent run; traceable, vmapped over the arrays.

  Returns:
    dict with final `h (N, d)`, `w (d, K)`, per-step `loss`, `min_cos`
    `(steps,)`, per-log `nc1` `(steps // log_every,)`, and the first step
    (1-based, -1 if never) at which the alignment criterion held.
  """
  k, d, m = cfg.num_classes, cfg.feature_dim, cfg.features_per_class
  labels = jnp.repeat(jnp.arange(k), m)
  counts = jnp.where(jnp.arange(k) < cfg.k_a, 1.0, 1.0 / ratio)
  weights = counts[labels] / (m * jnp.sum(counts))  # n_c / (N m), sums to 1.
  scale = jnp.sqrt(e_w * e_h)
  key_h, key_w = jax.random.split(jax.random.PRNGKey(cfg.seed))
  # Same initial point for every setting, ratio and grid cell (common random
  # numbers): random directions on the spheres of the constraints.
  h = jax.random.normal(key_h, (k * m, d))
  h = h / jnp.linalg.norm(h, axis=1, keepdims=True) * jnp.sqrt(e_h)
  if setting == "learnable_ce":
    w = jax.random.normal(key_w, (d, k))
    w = w / jnp.linalg.norm(w, axis=0, keepdims=True) * jnp.sqrt(e_w)
  else:
    w = jnp.sqrt(e_w) * etf.simplex_etf(k, d, seed=cfg.seed)
  tail = tuple(range(cfg.k_a, k))

  def step(carry, t):
    h, w, first = carry
    g_h = jax.grad(lambda h: jnp.sum(
        _per_sample_loss(setting, h, w, labels, scale)))(h)
    h = _project(h - lr_h * g_h, jnp.sqrt(e_h), axis=1)
    if setting == "learnable_ce":
      g_w = jax.grad(lambda w: jnp.sum(
          weights * _per_sample_loss(setting, h, w, labels, scale)))(w)
      w = _project(w - lr_w * g_w, jnp.sqrt(e_w), axis=0)
    loss = jnp.sum(weights * _per_sample_loss(setting, h, w, labels, scale))
    wy = w.T[labels]
    cos = jnp.sum(h * wy, 1) / jnp.maximum(
        jnp.linalg.norm(h, axis=1) * jnp.linalg.norm(wy, axis=1), 1e-12)
    min_cos = jnp.min(cos)
    first = jnp.where((first < 0) & (min_cos >= cfg.cos_tol), t + 1, first)
    return (h, w, first), (loss, min_cos)

  def log_block(carry, block):
    ts = block * cfg.log_every + jnp.arange(cfg.log_every)
    carry, (loss, min_cos) = jax.lax.scan(step, carry, ts)
    nc = nc_metrics.compute_jax(carry[0], labels, carry[1], num_classes=k,
                                tail_classes=tail)
    return carry, (loss, min_cos, nc["nc1"])

  carry = (h, w, jnp.asarray(-1, jnp.int32))
  (h, w, first), (loss, min_cos, nc1) = jax.lax.scan(
      log_block, carry, jnp.arange(steps // cfg.log_every))
  return {"h": h, "w": w, "loss": loss.reshape(-1),
          "min_cos": min_cos.reshape(-1), "nc1": nc1, "first": first}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sweep(setting: str, cfg: Config, steps: int, ratio, e_w, e_h, lr_h, lr_w):
  """`_train` vmapped over equal-length 1-D arrays of its traced arguments."""
  return jax.vmap(functools.partial(_train, setting, cfg, steps=steps))(
      ratio, e_w, e_h, lr_h, lr_w)


def _first_below(values: np.ndarray, tol: float, every: int) -> int | None:
  hit = np.nonzero(values <= tol)[0]
  return int((hit[0] + 1) * every) if hit.size else None


def run(cfg: Config) -> dict[str, Any]:
  """Runs the R sweep and the convergence study; returns JSON-ready results."""
  if cfg.steps % cfg.log_every or cfg.conv_steps % cfg.log_every:
    raise ValueError("steps and conv_steps must be multiples of log_every.")
  k = cfg.num_classes
  labels = np.repeat(np.arange(k), cfg.features_per_class)
  tail = tuple(range(cfg.k_a, k))
  ratios = np.asarray(cfg.ratios, np.float32)
  ones = np.ones_like(ratios)
  records, curves = [], {}
  # Curves are kept for one ratio: curve_ratio if swept, else the largest.
  curve_ratio = (cfg.curve_ratio if any(
      math.isclose(r, cfg.curve_ratio) for r in cfg.ratios) else max(cfg.ratios))
  for setting in SETTINGS:
    out = jax.device_get(_sweep(setting, cfg, cfg.steps, ratios,
                                cfg.e_w * ones, cfg.e_h * ones,
                                cfg.lr_h * ones, cfg.lr_w * ones))
    for i, ratio in enumerate(cfg.ratios):
      nc = nc_metrics.compute(out["h"][i], labels, out["w"][i],
                              num_classes=k, tail_classes=tail)
      loss = out["loss"][i]
      tenth = max(len(loss) // 10, 1)
      first = int(out["first"][i])
      records.append({
          "setting": setting, "ratio": float(ratio),
          "minority_cos_w": nc["minority_cos_w"],
          "minority_cos_h": nc["minority_cos_h"], "nc1": nc["nc1"],
          "steps_to_converge": first if first > 0 else cfg.steps,
          "converged": first > 0,
          "steps_to_nc1": _first_below(out["nc1"][i], cfg.nc1_tol,
                                       cfg.log_every),
          "final_loss": float(loss[-1]),
          # Loss change over the last 10% of steps: ~0 when optimised out.
          "loss_change_last_10pct": float(loss[-1] - loss[-tenth - 1]),
          "final_min_cos_hw": float(out["min_cos"][i][-1]),
          "nc_metrics": nc,
      })
      if math.isclose(ratio, curve_ratio):
        curves[setting] = {key: out[key][i].tolist()
                           for key in ("loss", "min_cos", "nc1")}
  convergence = _convergence_study(cfg)
  return {"records": records, "convergence": convergence, "curves": curves,
          "curve_ratio": curve_ratio, "config": dataclasses.asdict(cfg)}


def _convergence_study(cfg: Config) -> list[dict[str, Any]]:
  """etf_ce vs etf_dr steps to converge over (E, lr); R plays no part."""
  grid = [(e, lr) for e in cfg.conv_e for lr in cfg.conv_lrs]
  e = np.asarray([g[0] for g in grid], np.float32)
  lr = np.asarray([g[1] for g in grid], np.float32)
  out = []
  for setting in ("etf_ce", "etf_dr"):
    res = jax.device_get(_sweep(setting, cfg, cfg.conv_steps, np.ones_like(e),
                                e, e, lr, lr))
    for i, (e_i, lr_i) in enumerate(grid):
      first = int(res["first"][i])
      out.append({
          "setting": setting, "e_w": e_i, "e_h": e_i, "lr": lr_i,
          "steps_to_converge": first if first > 0 else cfg.conv_steps,
          "converged": first > 0,
          "steps_to_nc1": _first_below(res["nc1"][i], cfg.nc1_tol,
                                       cfg.log_every)})
  return out


def convergence_grid(study: Sequence[dict[str, Any]]
                     ) -> dict[tuple[str, float, float], dict[str, Any]]:
  """The convergence study keyed by (setting, E, lr)."""
  return {(r["setting"], r["e_w"], r["lr"]): r for r in study}


def plot(results: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
  """Writes minority_collapse.png and convergence.png; returns their paths."""
  cfg = results["config"]
  k = cfg["k_a"] + cfg["k_b"]
  colours = {"learnable_ce": "C3", "etf_ce": "C0", "etf_dr": "C2"}
  # The two ETF settings coincide; larger markers keep etf_ce visible.
  size = {"learnable_ce": 5, "etf_ce": 9, "etf_dr": 4}
  fig, ax = plt.subplots(figsize=(6, 4))
  for setting in SETTINGS:
    recs = [r for r in results["records"] if r["setting"] == setting]
    x = [r["ratio"] for r in recs]
    ax.plot(x, [r["minority_cos_w"] for r in recs], "o-", ms=size[setting],
            color=colours[setting], label=f"{setting}: classifier")
    ax.plot(x, [r["minority_cos_h"] for r in recs], "x--", ms=size[setting],
            color=colours[setting], alpha=0.7, label=f"{setting}: features")
  ax.axhline(-1 / (k - 1), color="k", lw=0.8, ls=":", label="-1/(K-1)")
  ax.set_xscale("log")
  ax.set_xlabel("imbalance ratio R = n_A / n_B")
  ax.set_ylabel("mean cosine among minority classes")
  ax.set_title(f"Layer-peeled model, K_A={cfg['k_a']}, K_B={cfg['k_b']}, "
               f"E_W={cfg['e_w']:g}, E_H={cfg['e_h']:g}", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths = [out / "minority_collapse.png"]
  fig.savefig(paths[0], dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  every = cfg["log_every"]
  for setting, c in results["curves"].items():
    steps = np.arange(1, len(c["min_cos"]) + 1)
    axes[0].plot(steps, np.maximum(1 - np.asarray(c["min_cos"]), 1e-9),
                 color=colours[setting], label=setting)
    axes[1].plot(every * np.arange(1, len(c["nc1"]) + 1),
                 np.maximum(c["nc1"], 1e-12), color=colours[setting],
                 label=setting)
  axes[0].axhline(1 - cfg["cos_tol"], color="k", lw=0.8, ls=":")
  axes[0].set_ylabel("1 - min_i cos(h_i, w_{y_i})")
  axes[1].set_ylabel("NC1")
  for a in axes[:2]:
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_title(f"R = {results['curve_ratio']:g}", fontsize=9)
    a.legend(fontsize=7)
  grid = convergence_grid(results["convergence"])
  for j, lr in enumerate(cfg["conv_lrs"]):
    for setting, style in (("etf_ce", "o-"), ("etf_dr", "s--")):
      es = cfg["conv_e"]
      axes[2].plot(es, [grid[(setting, e, lr)]["steps_to_converge"]
                        for e in es], style, color=f"C{j}",
                   label=f"{setting.split('_')[1]}, lr={lr:g}")
  axes[2].set_xscale("log")
  axes[2].set_yscale("log")
  axes[2].set_xlabel("E_W = E_H")
  axes[2].set_ylabel(f"steps to cos >= {cfg['cos_tol']} (cap = not reached)")
  axes[2].set_title("fixed ETF: CE (solid) vs DR (dashed)", fontsize=9)
  axes[2].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  paths.append(out / "convergence.png")
  fig.savefig(paths[1], dpi=120)
  plt.close(fig)
  return paths


def format_table(results: dict[str, Any]) -> str:
  """Compact text tables of the sweep and the convergence study."""
  lines = [f"{'setting':<13}{'R':>7}{'min_cos_w':>10}{'min_cos_h':>10}"
           f"{'nc1':>10}{'steps':>7}{'nc1_steps':>10}{'loss':>9}"]
  for r in results["records"]:
    conv = str(r["steps_to_converge"]) + ("" if r["converged"] else "*")
    nc1s = "-" if r["steps_to_nc1"] is None else str(r["steps_to_nc1"])
    lines.append(f"{r['setting']:<13}{r['ratio']:>7g}"
                 f"{r['minority_cos_w']:>10.3f}{r['minority_cos_h']:>10.3f}"
                 f"{r['nc1']:>10.2e}{conv:>7}{nc1s:>10}"
                 f"{r['final_loss']:>9.4f}")
  lines.append("(* = criterion never met; steps = cos(h_i, w_y) >= "
               f"{results['config']['cos_tol']} for all i)")
  cfg = results["config"]
  lines.append("fixed ETF, any R: steps to converge as etf_ce/etf_dr "
               f"(* = not within {cfg['conv_steps']})")
  lines.append(f"{'E_W=E_H':>8}" + "".join(f"{'lr=' + format(lr, 'g'):>12}"
                                           for lr in cfg["conv_lrs"]))
  grid = convergence_grid(results["convergence"])
  for e in cfg["conv_e"]:
    cells = ["/".join(
        str(grid[(s, e, lr)]["steps_to_converge"]) +
        ("" if grid[(s, e, lr)]["converged"] else "*")
        for s in ("etf_ce", "etf_dr")) for lr in cfg["conv_lrs"]]
    lines.append(f"{e:>8g}" + "".join(f"{c:>12}" for c in cells))
  return "\n".join(lines)


def _json_safe(x: Any) -> Any:
  """NaN (e.g. a statistic over fewer than two classes) becomes null."""
  if isinstance(x, float) and math.isnan(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def _parse(argv: Sequence[str] | None) -> tuple[Config, pathlib.Path]:
  d = Config()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/layer_peeled")
  for field in dataclasses.fields(Config):
    default = getattr(d, field.name)
    if isinstance(default, tuple):
      p.add_argument(f"--{field.name}", type=float, nargs="+",
                     default=list(default))
    else:
      p.add_argument(f"--{field.name}", type=type(default), default=default)
  args = p.parse_args(argv)
  kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
  kw = {key: tuple(v) if isinstance(v, list) else v for key, v in kw.items()}
  return Config(**kw), pathlib.Path(args.out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  cfg, out = _parse(argv)
  if cfg.feature_dim < cfg.num_classes:
    raise ValueError("feature_dim must be >= k_a + k_b (the ETF needs d >= K).")
  out.mkdir(parents=True, exist_ok=True)
  start = time.time()
  results = run(cfg)
  results["seconds"] = time.time() - start
  with open(out / "layer_peeled.json", "w") as f:
    json.dump(_json_safe(results), f, indent=1)
  paths = plot(results, out)
  print(format_table(results))
  print(f"wrote {out / 'layer_peeled.json'}, "
        f"{', '.join(str(p) for p in paths)} in {results['seconds']:.1f}s")
  return results


if __name__ == "__main__":
  main()
