"""Relative links in the repository's Markdown point at files that exist.

The README, docs/ and the results/ indexes link to run folders, RUN.md
files and other pages; a renamed or never-written target used to go
unnoticed until a reader clicked it.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Inline links only: `[text](target)`; the target has no spaces.
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules"}


def _markdown_files() -> list[pathlib.Path]:
  files = []
  for p in ROOT.rglob("*.md"):
    rel = p.relative_to(ROOT)
    if any(part in _SKIP_DIRS or part.endswith(".egg-info") or
           part.startswith(".") for part in rel.parts[:-1]):
      continue
    files.append(p)
  return sorted(files)


def _relative_links(text: str) -> list[tuple[int, str]]:
  """(line number, target) of every relative link, anchors dropped."""
  out = []
  for i, line in enumerate(text.splitlines(), 1):
    for m in _LINK.finditer(line):
      target = m.group(1)
      if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("#"):
        continue  # a URL (http:, mailto:) or an anchor on the same page
      out.append((i, target.split("#")[0]))
  return out


def test_link_parser_finds_relative_targets():
  text = ("see [a](docs/x.md#part) and [b](https://e.org/y) [c](#top)\n"
          "[d](../r/RUN.md)")
  assert _relative_links(text) == [(1, "docs/x.md"), (2, "../r/RUN.md")]


def test_markdown_files_are_found():
  names = {p.relative_to(ROOT).as_posix() for p in _markdown_files()}
  assert {"README.md", "docs/results.md", "docs/architecture.md"} <= names


@pytest.mark.parametrize(
    "md", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(md: pathlib.Path):
  broken = [f"{md.relative_to(ROOT)}:{line}: {target}"
            for line, target in _relative_links(md.read_text())
            if not (md.parent / target).exists()]
  assert not broken, "links to missing files:\n" + "\n".join(broken)
