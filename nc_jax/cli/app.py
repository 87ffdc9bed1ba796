"""What the command-line entry points share: clean errors, config lookup.

Every entry point (`nc-jax-train` = `python -m nc_jax.cli.train`,
`nc-jax-report` = `python -m nc_jax.cli.report`, ...) is a module with a
`run()` function that calls `run_app(main)`. An input mistake then ends the
process with one line `error: ...` that names the fix and exit status 2,
never a traceback: flag-parsing errors (unknown or missing flags, bad
values), a config argument that does not parse, and the `UserError`s that
`main` raises (`nc_jax.train.ConfigError`, `nc_jax.checkpoint.
CheckpointError` and their subclasses).

`--config` takes a preset name or a config argument for the bundled config
file, or a path to a config file, from any working directory
(`resolve_config`).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags

EXIT_USAGE = 2
# The folder that holds the `nc_jax` package: the repository root for a
# checkout or an editable install, site-packages otherwise.
INSTALL_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = INSTALL_ROOT / "nc_jax" / "configs" / "cifar_lt.py"
# Where the bundled config file lived until 2026-12-07 (commands in older
# notes and job scripts name it): read as the bundled file from anywhere.
FORMER_DEFAULT_CONFIG = "nc_jax/configs/cifar_lt.py"
CONFIG_FORMS = (
    "a preset name (e.g. cifar10_r0.01_etf_dr; all in nc_jax.configs."
    "cifar_lt.presets()), a config argument such as quick,method=etf_dr or "
    "dataset=cifar100,imb=0.01, or a config file "
    "nc_jax/configs/cifar_lt.py[:ARGS]")


class UsageProblem(Exception):
  """An input mistake found by an entry point; the message names the fix."""


def fail(message: str) -> None:
  """Prints `error: message` to stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def _user_errors() -> tuple[type[BaseException], ...]:
  # Imported lazily: nc_jax.train imports jax, which must not start before
  # the entry point has set its XLA flags.
  errors: list[type[BaseException]] = [UsageProblem]
  if "nc_jax.train" in sys.modules:
    errors.append(sys.modules["nc_jax.train"].ConfigError)
  if "nc_jax.checkpoint" in sys.modules:
    errors.append(sys.modules["nc_jax.checkpoint"].CheckpointError)
  return tuple(errors)


def _one_line(e: BaseException) -> str:
  """A config_flags error without the traceback it embeds."""
  text = str(e)
  if "Traceback (most recent call last)" in text:
    # config_flags re-raises get_config's error with its traceback in the
    # message; the last line is the original error.
    last = [l for l in text.strip().splitlines() if l.strip()][-1]
    text = re.sub(r"^\w+(Error|Exception): ", "", last.strip())
  return " ".join(re.sub(r"\\n", " ", text).split())


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with every error as one `error:` line."""
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    msg = _one_line(e)
    missing = re.search(r"flag --(\w+)=None: Flag --\w+ must have a value", msg)
    if missing:
      name = missing.group(1)
      hint = f": {CONFIG_FORMS}" if name == "config" else ""
      fail(f"--{name} is required{hint}. Run with --helpshort for all flags.")
    fail(f"{msg}. Run with --helpshort for all flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if "Error whilst parsing config file" in str(e):
      # A config file's get_config refused its argument.
      fail(f"bad --config: {_one_line(e)}")
    # A --config.FIELD override that the locked config refuses (misspelt
    # field, wrong type).
    fail(_override_error(_one_line(e), argv))
  return []  # not reached


def _override_error(msg: str, argv: Sequence[str]) -> str:
  """One line for an override the locked config refuses, naming the whole
  `--config.a.b` path and ml_collections' suggestion, if it has one."""
  msg = " ".join(re.sub(r"\\n|[\\'\"]", " ", msg).split())
  m = re.search(r"Did you mean (\w+) instead of (\w+)", msg)
  if not (m or re.fullmatch(r"\w+", msg)):  # not an unknown field
    return (f"bad --config override: {msg}. The fields and their "
            f"defaults: {DEFAULT_CONFIG}.")
  bad = m.group(2) if m else msg
  given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
  path = next((a for a in given if a.split(".")[-1] == bad),
              f"--config.{bad}")
  if m:
    hint = f" Did you mean {path.rsplit('.', 1)[0]}.{m.group(1)}?"
  else:  # a field given at the wrong level, e.g. lr for optim.lr
    nested = _fields_named(path.rsplit(".", 1)[-1])
    hint = (f" Did you mean {' or '.join('--config.' + n for n in nested)}?"
            if nested else "")
  return (f"bad --config override: {path} is no field of the config.{hint} "
          f"The fields and their defaults: {DEFAULT_CONFIG}.")


def _fields_named(leaf: str) -> list[str]:
  """Dotted paths of the default config's fields whose last name is `leaf`
  (at most three; none if the config cannot be built)."""
  try:
    from nc_jax.configs import cifar_lt  # pylint: disable=g-import-not-at-top
    config = cifar_lt.get_config()
  except Exception:  # pylint: disable=broad-except
    return []  # only a hint: the error line stands without it
  found, stack = [], [("", config)]
  while stack:
    prefix, node = stack.pop()
    for key in sorted(node.keys()):
      value = node[key]
      if hasattr(value, "keys"):
        stack.append((f"{prefix}{key}.", value))
      elif key == leaf and prefix:
        found.append(prefix + key)
  return sorted(found)[:3]


def _adopt_help(module_name: str, program: str) -> None:
  """Makes --help of a console script show `module_name`'s flags and doc.

  absl's help lists the flags of the module run as `__main__`; a console
  script's `__main__` is a stub that imports the entry module instead.
  """
  if module_name == "__main__" or module_name not in sys.modules:
    return
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(program, flag)
  main_module = sys.modules.get("__main__")
  if main_module is not None and not main_module.__doc__:
    main_module.__doc__ = sys.modules[module_name].__doc__


def run_app(main: Callable[[list[str]], None],
            argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)` where input mistakes end as one `error:` line."""
  argv = list(sys.argv if argv is None else argv)
  sys.argv[:] = argv  # config_flags reads the overrides from sys.argv
  _adopt_help(main.__module__, argv[0])

  def guarded(args):
    try:
      main(args)
    except _user_errors() as e:
      fail(str(e))
    except Exception as e:  # pylint: disable=broad-except
      stopped = sys.modules.get("nc_jax.preemption")
      if stopped is None or not isinstance(e, stopped.Stopped):
        raise
      # A run ended early on purpose: one line, its own exit status
      # (nc_jax.preemption: EXIT_PREEMPTED, EXIT_DIVERGED, EXIT_NO_SPACE).
      prefix = "stopped" if isinstance(e, stopped.Preempted) else "error"
      print(f"{prefix}: {e}", file=sys.stderr, flush=True)
      _exit_after_stop(e.exit_code)

  app.run(guarded, argv=argv, flags_parser=parse_flags)


def check_output(path: str | os.PathLike, flag: str, *,
                 kind: str = "dir") -> pathlib.Path:
  """Checks, before any work, that the output `path` of `flag` can be
  written (nothing is created).

  Args:
    path: the flag's value.
    flag: the flag, for the message (`--out`).
    kind: "dir" (a folder, created if missing) or "file" (a new file, or
      one that `may_replace` allows to be replaced).

  Returns:
    The path, `~` expanded.

  Raises:
    UsageProblem: empty, the wrong kind of thing, under a file, or in a
      folder that is not writable.
  """
  if not str(path).strip():
    raise UsageProblem(f"{flag} is empty: pass a path.")
  p = pathlib.Path(path).expanduser()
  if p.exists():
    if kind == "dir" and not p.is_dir():
      raise UsageProblem(f"{flag} {p} is a file; pass a directory.")
    if kind == "file" and p.is_dir():
      raise UsageProblem(f"{flag} {p} is a directory; pass a file name "
                         f"(e.g. {p / 'run.msgpack'}).")
  # (numpy and the standard library only: jax is not started here.)
  from nc_jax import workdir  # pylint: disable=g-import-not-at-top
  try:
    if p.is_dir():
      if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {p} is not writable. Pass a folder you "
                         "can write to.")
    elif not p.exists():
      workdir.check_creatable(p, flag)
    elif not os.access(p.parent, os.W_OK | os.X_OK):
      raise ValueError(f"{flag} {p} cannot be replaced: {p.parent} is not "
                       "writable. Pass a folder you can write to.")
  except ValueError as e:
    raise UsageProblem(str(e)) from None
  return p


def _exit_after_stop(code: int) -> None:
  """Ends the process right after a stopped run's line.

  The run has closed its checkpointer and metric files and released its
  workdir by then. An ordinary exit would spend a second or more tearing
  down JAX and TensorFlow after Python has reset the signal handlers, so a
  second Ctrl-C then would kill the process with status 130 after all was
  saved; there is nothing left to tear down that matters on disk.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  jax = sys.modules.get("jax")
  if jax is not None:
    try:
      if jax.distributed.is_initialized():
        jax.distributed.shutdown()  # the other processes wait for it
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(code)  # pylint: disable=protected-access


# ------------------------------------------------------------------ config


def _find_file(path: str) -> pathlib.Path:
  p = pathlib.Path(path).expanduser()
  if p.as_posix().endswith(FORMER_DEFAULT_CONFIG):
    return DEFAULT_CONFIG
  if p.is_file():
    return p.resolve()
  if not p.is_absolute() and (INSTALL_ROOT / p).is_file():
    return INSTALL_ROOT / p
  looked = [str(p.resolve())]
  if not p.is_absolute():
    looked.append(str(INSTALL_ROOT / p))
  raise UsageProblem(
      f"config file {path} not found (looked at {' and '.join(looked)}). "
      f"Pass {CONFIG_FORMS}.")


def resolve_config(value: str) -> str:
  """The `--config` value as config_flags loads it: `/abs/file.py[:ARGS]`.

  `value` is a config file (`nc_jax/configs/cifar_lt.py:quick`; a
  relative path is looked up in the working directory, then beside the
  installed `nc_jax` package, so the bundled files work from anywhere; the
  former `nc_jax/configs/cifar_lt.py` is the bundled file),
  or, without `.py`, the ARGS of the bundled config file: a preset name
  (`cifar10_r0.01_etf_dr`) or `key=value`/variant list (`quick,method=ce`).
  The bundled file's argument is checked here, so a typo stops with its
  "did you mean" hint.

  Raises:
    UsageProblem: no such file, or an argument the config refuses.
  """
  value = value.strip()
  m = re.match(r"^(.*?\.py)(?::(.*))?$", value, re.S)
  if m:
    path, args = _find_file(m.group(1)), m.group(2)
  elif value:
    path, args = DEFAULT_CONFIG, value
  else:
    raise UsageProblem(f"--config is empty. Pass {CONFIG_FORMS}.")
  if path.resolve() == DEFAULT_CONFIG.resolve():
    from nc_jax.configs import cifar_lt  # pylint: disable=g-import-not-at-top
    try:
      cifar_lt.get_config(args)
    except ValueError as e:
      raise UsageProblem(f"bad --config {value!r}: {e}") from None
  return str(path) + (f":{args}" if args is not None else "")


def resolve_config_argv(argv: Sequence[str], name: str = "config"
                        ) -> list[str]:
  """`argv` with the value of `--NAME` (either form) put through
  `resolve_config`; exits with an `error:` line when it cannot be."""
  out = list(argv)
  i = 1
  while i < len(out):
    arg = out[i]
    if arg == "--":
      break
    try:
      for dash in ("--", "-"):
        if arg.startswith(f"{dash}{name}="):
          out[i] = f"{dash}{name}=" + resolve_config(arg.split("=", 1)[1])
        elif arg == f"{dash}{name}" and i + 1 < len(out):
          out[i + 1] = resolve_config(out[i + 1])
          i += 1
    except UsageProblem as e:
      fail(str(e))
    i += 1
  return out


def set_quiet_tensorflow() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
