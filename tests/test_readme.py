"""The README's own-model snippets, NNX and Linen, run as printed (README
and test cannot drift: the code is read from README.md)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def readme_snippet(name: str) -> str:
  """The ```python block right after `<!-- snippet: NAME -->` in README.md."""
  text = (REPO / "README.md").read_text()
  m = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```",
                text, re.S)
  assert m, f"README.md has no python block after <!-- snippet: {name} -->"
  return m.group(1)


@pytest.mark.parametrize("name", ["own-model-nnx", "own-model"])
def test_own_model_snippet_runs_and_learns(name, tmp_path):
  code = readme_snippet(name)
  # As a user would: a fresh interpreter, outside the repository.
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO),
                            "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  m = re.search(r"DR loss ([\d.]+), train accuracy ([\d.]+)", out.stdout)
  assert m, out.stdout
  assert float(m.group(2)) >= 0.9, out.stdout  # the toy data is learnable
