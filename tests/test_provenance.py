"""The provenance block of results.json: the command as it would be typed."""

from __future__ import annotations

import sys

import pytest

from nc_jax import provenance


@pytest.mark.parametrize("orig,argv,want", [
    (["/usr/bin/python3", "-m", "experiments.cifar_lt", "--config", "quick",
      "--workdir", "runs/a b"], ["/repo/experiments/cifar_lt.py"],
     "python -m experiments.cifar_lt --config quick --workdir 'runs/a b'"),
    (["/usr/bin/python3", "-X", "importtime", "/venv/bin/nc-jax-train",
      "--config", "quick"], ["/venv/bin/nc-jax-train", "--config", "quick"],
     "nc-jax-train --config quick"),
])
def test_command_is_recorded_as_typed(monkeypatch, orig, argv, want):
  monkeypatch.setattr(sys, "orig_argv", orig)
  monkeypatch.setattr(sys, "argv", argv)
  assert provenance.command() == want
  assert provenance.describe()["command"] == want
