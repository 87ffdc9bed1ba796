"""The package's shape, read from its source: what docs/architecture.md
promises about imports, names and sizes."""

from __future__ import annotations

import ast
import collections
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nc_jax"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for p in PACKAGE.rglob("*.py"):
    parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = p
  return out


def _import_graph() -> dict[str, set[str]]:
  """Module -> the nc_jax modules it imports, anywhere in its body (inside
  functions too). `from a import b` counts `a.b` when that is a module."""
  mods = _modules()
  graph = collections.defaultdict(set)
  for name, path in mods.items():
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}"
                   in mods else node.module for a in node.names]
      for t in targets:
        while t not in mods and "." in t:
          t = t.rsplit(".", 1)[0]
        if t in mods and t != name:
          graph[name].add(t)
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in list(graph):
    if v not in index:
      visit(v)
  return out


def test_the_import_graph_has_no_cycle():
  graph = _import_graph()
  assert graph, "no imports found: the walk is broken"
  assert _cycles(graph) == []
  # The walk sees a cycle where there is one.
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]


def test_the_dataset_interface_imports_no_implementation():
  implementations = {"nc_jax.data.in_memory", "nc_jax.data.imagenet_lt",
                     "nc_jax.data.cub", "nc_jax.data.sources",
                     "nc_jax.data.pack", "nc_jax.data.file_stream"}
  assert not _import_graph()["nc_jax.data.datasets"] & implementations
  # Not by name either: one module loads them (`registry`).
  assert "import_module" not in (PACKAGE / "data" / "datasets.py").read_text()


def test_no_function_is_longer_than_80_lines():
  long = []
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > 80:
          long.append((n, f"{path.relative_to(PACKAGE)}:{node.name}"))
  assert not long, sorted(long, reverse=True)


# Names that are one interface implemented in several modules.
INTERFACE_NAMES = {
    "make",   # a dataset module's constructor (nc_jax.data.datasets)
    "main", "run",  # a command module's entry (nc_jax.cli)
    "ETFHead",  # the head in Linen (models.heads) and in NNX (nnx)
}


def test_a_public_name_is_defined_once():
  where = collections.defaultdict(list)
  for path in PACKAGE.rglob("*.py"):
    for node in ast.parse(path.read_text()).body:
      if (isinstance(node, (ast.FunctionDef, ast.ClassDef))
          and not node.name.startswith("_")):
        where[node.name].append(str(path.relative_to(PACKAGE)))
  twice = {n: v for n, v in where.items()
           if len(v) > 1 and n not in INTERFACE_NAMES}
  assert not twice, twice
