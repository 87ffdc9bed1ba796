"""Every number in the README's results table is one a committed run measured.

A "final" or "best" cell lists one top-1 per seed ("77.00, 76.02"), each
of which must be that block's top-1 in some `results/**/results.json` of
the row's ratio, optionally followed by "(mean M ± S)", which must be the
listed values' mean and std (n - 1), as `nc-jax-report` pools them.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CELL = re.compile(r"^(?P<values>[\d., ]+?)\s*(\(mean (?P<mean>[\d.]+) ± "
                  r"(?P<std>[\d.]+)\))?$")


def _table_rows() -> list[dict[str, str]]:
  text = (REPO / "README.md").read_text()
  section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
  lines = [l for l in section.splitlines() if l.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  return [dict(zip(header, (c.strip() for c in l.strip("|").split("|"))))
          for l in lines[2:]]


def _measured() -> dict[tuple[float, str], set[float]]:
  """(ratio, "final" | "best") -> the top-1s the committed runs reached."""
  out: dict[tuple[float, str], set[float]] = {}
  for path in (REPO / "results").rglob("results.json"):
    res = json.loads(path.read_text())
    ratio = float(res["config"].get("imb_factor", "nan"))
    for block in ("final", "best"):
      out.setdefault((ratio, block), set()).add(round(res[block]["top1"], 2))
  return out


def test_the_results_table_is_measured():
  rows = _table_rows()
  assert len(rows) >= 5 and {"r", "final", "best"} <= set(rows[0])
  measured = _measured()
  for row in rows:
    for block in ("final", "best"):
      m = CELL.match(row[block])
      assert m, f"README results row {row}: {block} cell {row[block]!r}"
      values = [float(v) for v in m["values"].split(",")]
      for v in values:
        assert v in measured.get((float(row["r"]), block), set()), (
            f"README's {block} {v} (r = {row['r']}, {row['method']}) is in "
            "no committed results.json")
      if m["mean"]:
        assert len(values) > 1
        assert abs(float(m["mean"]) - np.mean(values)) < 6e-4, row
        assert abs(float(m["std"]) - np.std(values, ddof=1)) < 6e-3, row
