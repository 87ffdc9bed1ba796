"""Weights files on disk: which kinds nc_jax reads, and reading them.

A PyTorch `state_dict` file (`.pth`, `.pt`, `.bin`, written by
`torch.save`; read with torch, `weights_only=True`) or a safetensors file
(`.safetensors`), as `{name: numpy array}` in torch's layout. `check_file`
says what can be known without reading the tensors (the file exists, its
suffix and first bytes are of a known kind, the package that reads it is
installed), so that a run can refuse a wrong file before it writes its
workdir. Mapping the tensors into a model is `nc_jax.pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import zipfile
from typing import Mapping

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)

# How many tensor names an error lists before "and N more".
_MAX_LISTED = 10


class PretrainedError(ValueError):
  """A pretrained-weights file that cannot be read or does not fit the model.

  The message names the file, what is wrong and the fix.
  """


def _listed(names: list[str]) -> str:
  """Up to `_MAX_LISTED` names, then how many more (errors stay one line)."""
  shown = ", ".join(names[:_MAX_LISTED])
  rest = len(names) - _MAX_LISTED
  return f"{shown} and {rest} more" if rest > 0 else shown


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _missing_package(path, "torch") from e
  try:
    # weights_only: a state_dict is tensors in dicts; never run a pickle's
    # code from a downloaded file.
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle, zip and runtime errors.
    first = (str(e).splitlines() or [""])[0][:200]
    raise PretrainedError(
        f"Could not read {path} as a PyTorch state_dict ({type(e).__name__}:"
        f" {first}). Save the weights with torch.save(model.state_dict(), "
        "path), not the model object.") from e
  if not isinstance(obj, Mapping):
    raise PretrainedError(
        f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of"
        " names to tensors). Save it with torch.save(model.state_dict(), "
        "path).")
  other = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if other:
    raise PretrainedError(
        f"{path} is not a plain state_dict: entries {_listed(other)} are not "
        "tensors (a training checkpoint?). Save the model's state_dict alone "
        "(e.g. torch.save(checkpoint['state_dict'], path)).")
  out = {}
  for name, t in obj.items():
    t = t.detach().cpu()
    # numpy has no bfloat16; float32 holds it (and float16) exactly.
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
      t = t.float()
    out[str(name)] = t.numpy()
  return out


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _missing_package(path, "safetensors") from e
  try:
    return dict(load_file(str(path)))
  except Exception as e:  # safetensors' own error type, or numpy's.
    raise PretrainedError(
        f"Could not read {path} as a safetensors file ({type(e).__name__}: "
        f"{e}). Is it a complete .safetensors file with float16/32/64 "
        "tensors?") from e


def _missing_package(path: pathlib.Path, package: str) -> PretrainedError:
  if package == "torch":
    return PretrainedError(
        f"Reading the PyTorch file {path} needs torch: pip install torch "
        "(the CPU build is enough), or pip install "
        "'nc_jax[pretrained-torch]'; or give the weights as a .safetensors "
        "file.")
  return PretrainedError(
      f"Reading the safetensors file {path} needs the safetensors package:"
      " pip install safetensors, or pip install "
      "'nc_jax[pretrained-safetensors]'.")


def _installed(package: str) -> bool:
  try:
    return importlib.util.find_spec(package) is not None
  except (ImportError, ValueError):  # e.g. sys.modules[package] is None
    return False


def check_file(path: str | os.PathLike[str]) -> pathlib.Path:
  """What can be known of a weights file without reading its tensors: it
  exists, its suffix is known, the package that reads it is installed and
  its first bytes are those of its kind (`_check_header`).

  Returns:
    The path.

  Raises:
    PretrainedError: naming the problem and the fix.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise PretrainedError(
        f"No pretrained-weights file at {path} (nc_jax never downloads "
        "weights): pass the path of a torchvision ResNet-50 state_dict "
        "(.pth) or a timm .safetensors file you have.")
  suffix = path.suffix.lower()
  if suffix not in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES:
    raise PretrainedError(
        f"Unknown pretrained-weights file type {suffix or '(no suffix)'!r} "
        f"for {path}: expected a PyTorch state_dict "
        f"({', '.join(TORCH_SUFFIXES)}) or a safetensors file "
        "(.safetensors). Rename the file if it is one of these.")
  package = "torch" if suffix in TORCH_SUFFIXES else "safetensors"
  if not _installed(package):
    raise _missing_package(path, package)
  _check_header(path, package)
  return path


def _check_header(path: pathlib.Path, package: str) -> None:
  """The file's first bytes are those its format starts with, so that a
  wrong file stops the run before it writes its workdir (reading it is
  left to step 0)."""
  with open(path, "rb") as f:
    head = f.read(9)
  size = path.stat().st_size
  if package == "torch":
    # torch.save writes a zip archive (PyTorch >= 1.6) or a pickle.
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
      return
    raise PretrainedError(
        f"{path} is not a PyTorch file (neither the zip archive nor the "
        "pickle that torch.save writes). Pass a torchvision ResNet-50 "
        "state_dict saved with torch.save(model.state_dict(), path).")
  n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
  if not (0 < n <= size - 8 and head[8:9] == b"{"):
    raise PretrainedError(
        f"{path} is not a safetensors file (its first 8 bytes do not give "
        "the length of a JSON header inside the file). Pass a complete "
        ".safetensors file, e.g. timm's resnet50 weights.")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """A weights file's tensors, by name, as numpy arrays (torch's layout).

  Args:
    path: a `.pth` / `.pt` / `.bin` file written by `torch.save(state_dict)`
      (read with torch, `weights_only=True`), or a `.safetensors` file.

  Returns:
    `{name: array}`, e.g. `conv1.weight` `(64, 3, 7, 7)` OIHW; bfloat16 and
    float16 tensors of a torch file come back as float32.

  Raises:
    PretrainedError: no such file, an unknown suffix, the reading package
      is not installed, or the file cannot be read as a state_dict.
  """
  path = check_file(path)
  if path.suffix.lower() in TORCH_SUFFIXES:
    return _read_torch(path)
  return _read_safetensors(path)
