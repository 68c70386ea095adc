"""Griffe extension: present lorajax's docstrings as Markdown for mkdocstrings, without touching the sources.

The docstrings are Google-style with two reStructuredText habits that Markdown does not understand:
- doctest examples (``>>>`` lines and their output) written as plain text; they become ```` ```pycon ```` fences, so
  they render as code (and ``x["kernel"]`` in them is not read as a Markdown link);
- Sphinx roles such as ``:func:`masked` ``; a role naming a public lorajax name becomes a link to its API entry,
  any other one a code span.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):`~?([^`]+)`")


def public_names() -> set[str]:
    """``lorajax.__all__``, read statically (building the docs imports neither lorajax nor JAX)."""
    tree = ast.parse((ROOT / "lorajax" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def fence_doctests(text: str) -> str:
    """Wrap each run of doctest lines (a ``>>>`` line up to the next blank line) in a pycon fence."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class LorajaxDocstrings(griffe.Extension):
    def __init__(self) -> None:
        self.public = public_names()

    def _role(self, match: re.Match[str]) -> str:
        name = match.group(1).removeprefix("lorajax.")
        return f"[`{name}`][lorajax.{name}]" if name in self.public else f"`{match.group(1)}`"

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(self._role, fence_doctests(obj.docstring.value))
