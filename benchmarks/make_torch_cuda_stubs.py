r"""Stub shared libraries that let PyPI's CUDA torch wheel import on a CPU box.

    pip install --no-deps torch filelock
    python benchmarks/make_torch_cuda_stubs.py /opt/torchstubs
    LD_LIBRARY_PATH=/opt/torchstubs python benchmarks/torch_reference.py

PyPI's Linux torch wheel links cuDNN, cuBLAS, NCCL, ... (the nvidia-* wheels,
several GB). For CPU-only timing we build, for each missing soname, an empty
library that defines the symbols torch imports from it (with the symbol
versions it asks for). The libraries are never called: without a GPU torch
never enters its CUDA paths. Needs gcc and binutils (nm).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import importlib.util

TORCH_LIB = os.path.join(
    os.path.dirname(importlib.util.find_spec("torch").origin), "lib")
SYSTEM_LIBS = ["libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1",
               "libdl.so.2", "librt.so.1", "libpthread.so.0"]


def _nm(path: str, undefined: bool) -> list[str]:
  flag = "--undefined-only" if undefined else "--defined-only"
  out = subprocess.run(["nm", "-D", flag, path], capture_output=True,
                       text=True).stdout
  return [line.split()[-1] for line in out.splitlines() if line.split()]


def _missing_sonames(libs: list[str]) -> tuple[set[str], set[str]]:
  missing, found = set(), set()
  for lib in libs:
    out = subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
    for line in out.splitlines():
      m = re.match(r"\s*(\S+) => (.*)", line)
      if m and "not found" in m.group(2):
        missing.add(m.group(1))
      elif m:
        found.add(m.group(2).split()[0])
  return missing, found


def main(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  libs = [os.path.join(TORCH_LIB, f) for f in os.listdir(TORCH_LIB)
          if f.endswith(".so")]
  missing, found = _missing_sonames(libs)
  # Never shadow the driver: torch only dlopens it, and a stub there would
  # hide a real GPU from anything run with this LD_LIBRARY_PATH.
  missing.discard("libcuda.so.1")
  defined = set()
  for path in libs + sorted(found):
    if os.path.exists(path):
      defined.update(s.split("@")[0] for s in _nm(path, False))
  per_version = collections.defaultdict(set)
  unversioned = set()
  for path in libs:
    for s in _nm(path, True):
      if "@" in s:
        name, ver = re.split("@+", s)[:2]
        if name not in defined:
          per_version[ver].add(name)
      elif s not in defined:
        unversioned.add(s)
  # Version tags are usually the soname; NVSHMEM's is not.
  tag_lib = {v: v for v in per_version}
  tag_lib.update({v: next((m for m in missing if m.startswith("libnvshmem")),
                          v) for v in per_version if v == "NVSHMEM"})
  for i, lib in enumerate(sorted(missing)):
    tags = [v for v in per_version if tag_lib[v] == lib]
    names = set().union(*(per_version[v] for v in tags)) if tags else set()
    if i == 0:  # unversioned leftovers can live in any one stub
      names |= unversioned
    src = os.path.join(out_dir, lib + ".c")
    with open(src, "w") as f:
      f.write("".join(f"void {n}(void) {{}}\n" for n in sorted(names)))
    cmd = ["gcc", "-shared", "-fPIC", "-o", os.path.join(out_dir, lib), src,
           "-Wl,-soname," + lib]
    if tags:
      vmap = os.path.join(out_dir, lib + ".map")
      with open(vmap, "w") as f:
        for v in tags:
          f.write(f"{v} {{ global: {'; '.join(sorted(per_version[v]))}; }};\n")
      cmd.append("-Wl,--version-script=" + vmap)
    subprocess.run(cmd, check=True)
    print(lib, len(names))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "/opt/torchstubs")
