"""Input checks the commands run before any work (in-process; the commands
themselves, in subprocesses, are tests/test_cli.py)."""

from __future__ import annotations

import pytest

from nc_jax import sharding
from nc_jax.cli import app as cli
from nc_jax.cli import paper_table


def test_check_output_accepts_new_and_existing_places(tmp_path):
  assert cli.check_output(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
  assert cli.check_output(tmp_path, "--out") == tmp_path
  (tmp_path / "old.msgpack").write_bytes(b"x")
  assert cli.check_output(tmp_path / "old.msgpack", "--export", kind="file")
  assert not (tmp_path / "a").exists()  # nothing created


@pytest.mark.parametrize("make,value,kind,match", [
    (lambda p: None, "", "dir", "--out is empty"),
    (lambda p: (p / "f").write_text("x"), "f", "dir", "is a file; pass a "
     "directory"),
    (lambda p: (p / "f").write_text("x"), "f/sub", "dir", "cannot be "
     "created: .*/f is a file"),
    (lambda p: (p / "f").write_text("x"), "f/sub/x.msgpack", "file",
     "cannot be created: .*/f is a file"),
    (lambda p: (p / "d").mkdir(), "d", "file", "is a directory; pass a file "
     "name"),
])
def test_check_output_refuses_with_the_fix(tmp_path, make, value, kind,
                                           match):
  make(tmp_path)
  flag = "--export" if kind == "file" else "--out"
  with pytest.raises(cli.UsageProblem, match=match):
    cli.check_output(str(tmp_path / value) if value else value, flag,
                     kind=kind)


def test_check_output_refuses_an_unwritable_folder(tmp_path, monkeypatch):
  # (As root every folder is writable: the permission answer is faked.)
  monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
  with pytest.raises(cli.UsageProblem, match="is not writable"):
    cli.check_output(tmp_path / "out", "--out")


@pytest.mark.parametrize("args", [
    (None, None, None), (None, 1, None), (None, 1, 0), ("auto", None, None),
    ("127.0.0.1:1234", 2, 1), ("host.example:80", 1, 0),
    # Left for jax.distributed to find (SLURM, Open MPI, TPU pods).
    ("127.0.0.1:1234", None, None), ("127.0.0.1:1234", None, 3),
    ("127.0.0.1:1234", 4, None),
])
def test_distributed_arguments_that_work(args):
  sharding.check_distributed_args(*args)


@pytest.mark.parametrize("args,match", [
    ((None, 2, None), "without a coordinator address"),
    ((None, None, 1), "without a coordinator address"),
    (("127.0.0.1", 2, 0), "'127.0.0.1' is not HOST:PORT"),
    (("127.0.0.1:x", 2, 0), "is not HOST:PORT"),
    (("127.0.0.1:1234", 2, 5), "process_id=5 with num_processes=2"),
    (("127.0.0.1:1234", 2, -1), "process ids run from 0"),
    (("127.0.0.1:1234", None, -1), "process ids run from 0"),
    (("127.0.0.1:1234", 0, 0), "num_processes=0"),
])
def test_distributed_mistakes_name_the_flags(args, match):
  with pytest.raises(ValueError, match=match) as e:
    sharding.check_distributed_args(*args)
  assert "--coordinator_address=HOST:PORT" in str(e.value)


def test_distributed_environment_variables_are_checked(monkeypatch):
  monkeypatch.setenv("NC_JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match=r"\$NC_JAX_NUM_PROCESSES='two' is not "
                     "a whole number"):
    sharding.maybe_initialize_distributed()


def test_paper_table_messages_name_its_own_flags():
  msg = paper_table._in_own_flags(  # pylint: disable=protected-access
      "--workdir /r/cell cannot be created: /r is a file. Pass "
      "--config.data_dir= one of: x; or start it in another --workdir.")
  assert "--workdir" not in msg and "--config.data_dir" not in msg
  assert "the cell folder /r/cell" in msg and "--data_dir= one of" in msg
  assert "another --root" in msg and "--root holds one folder" in msg
  msg = paper_table._in_own_flags(  # pylint: disable=protected-access
      "x holds a run with a different config (num_seeds: 3 in the workdir, "
      "1 now). Resume it with the same config (--config.num_seeds=3 "
      "--config.num_epochs=200.0), or start the new run elsewhere.")
  assert "(--seeds 3 --epochs 200.0)" in msg and "--config." not in msg
  msg = paper_table._in_own_flags(  # pylint: disable=protected-access
      "x (--config.etf_rotation=gaussian)")
  assert "trains the presets as they are" in msg
