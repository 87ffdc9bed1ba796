"""The layer-peeled experiment at small size: minority collapse and outputs."""

import json

import pytest

from experiments import layer_peeled

pytestmark = pytest.mark.slow  # trains the layer-peeled model

K = 10
SIMPLEX = -1 / (K - 1)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("layer_peeled")
  # The convergence grid has as many cells (3 x 1) and steps as the R sweep,
  # so its two ETF programs reuse the sweep's compilations.
  res = layer_peeled.main([
      "--out", str(out), "--ratios", "1", "10", "1000", "--steps", "400",
      "--features_per_class", "4", "--curve_ratio", "10",
      "--conv_e", "1", "10", "30", "--conv_lrs", "1", "--conv_steps", "400"])
  return out, res


def _by(res, setting):
  return {r["ratio"]: r for r in res["records"] if r["setting"] == setting}


def test_learnable_classifier_shows_minority_collapse(results):
  _, res = results
  rec = _by(res, "learnable_ce")
  cos = [rec[r]["minority_cos_w"] for r in (1.0, 10.0, 1000.0)]
  assert cos[0] == pytest.approx(SIMPLEX, abs=0.02)  # balanced: an ETF.
  assert cos[0] < cos[1] < cos[2]
  assert cos[2] > 0.9  # minority classifiers (almost) coincide.
  assert rec[1000.0]["minority_cos_h"] > 0.9


@pytest.mark.parametrize("setting", ["etf_ce", "etf_dr"])
def test_fixed_etf_keeps_minority_classes_apart(results, setting):
  _, res = results
  for rec in _by(res, setting).values():
    assert rec["minority_cos_w"] == pytest.approx(SIMPLEX, abs=1e-5)
    # DR approaches the vertices sublinearly; 400 steps leave ~2e-3.
    assert rec["minority_cos_h"] == pytest.approx(SIMPLEX, abs=1e-2)
    assert rec["converged"]


def test_dr_beats_saturated_ce_at_large_norms(results):
  _, res = results
  grid = layer_peeled.convergence_grid(res["convergence"])
  assert grid[("etf_dr", 10.0, 1.0)]["converged"]
  assert (grid[("etf_dr", 10.0, 1.0)]["steps_to_converge"] <
          grid[("etf_ce", 10.0, 1.0)]["steps_to_converge"])


def test_writes_json_and_pngs(results):
  out, res = results
  data = json.loads((out / "layer_peeled.json").read_text())
  assert len(data["records"]) == 3 * 3
  keys = {"setting", "ratio", "minority_cos_w", "minority_cos_h", "nc1",
          "steps_to_converge", "final_loss"}
  assert keys <= set(data["records"][0])
  assert data["config"]["steps"] == 400
  for name in ("minority_collapse.png", "convergence.png"):
    assert (out / name).stat().st_size > 1000
  assert "learnable_ce" in layer_peeled.format_table(res)
