"""Griffe extension: present lorajax's docstrings as Markdown for mkdocstrings, without touching the sources.

The docstrings are Google-style with two reStructuredText habits that Markdown does not understand:
- doctest examples (``>>>`` lines and their output) written as plain text; they become ```` ```pycon ```` fences, so
  they render as code (and ``x["kernel"]`` in them is not read as a Markdown link);
- Sphinx roles such as ``:func:`masked` ``; a role naming a public lorajax name becomes a link to its API entry,
  any other one a code span.

It also documents the target presets (``attn_qv = Preset("attn_qv", [_names.QUERY, ...], "doc")``): their
assignments name private constants and classes, so each preset's page entry shows ``attn_qv: Preset`` and, as its
docstring, the ``doc`` argument and the module-name regexes it matches, read from the code (never the private names).
"""

from __future__ import annotations

import ast
import importlib
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


def literal(expr: Any) -> Any:
    """The value of a literal expression as griffe stores it (a string of source code)."""
    return ast.literal_eval(str(expr))


def preset_classes(module: griffe.Module) -> set[str]:
    """Names of the classes in ``module`` that are ``Preset`` or derive from it (one level of bases is enough)."""
    classes = {name for name, obj in module.members.items() if not obj.is_alias and obj.is_class}
    return {"Preset"} | {name for name in classes if any(str(base) == "Preset" for base in module.members[name].bases)}


def document_presets(pkg: griffe.Module) -> None:
    """Give every public ``Preset`` instance of the package a docstring and a public annotation, and hide its value."""
    for module in pkg.modules.values():
        classes = preset_classes(module) if "Preset" in module.members else set()
        for name, obj in module.members.items():
            if name.startswith("_") or obj.is_alias or not obj.is_attribute:
                continue
            value = obj.value
            if not isinstance(value, griffe.ExprCall) or str(value.function) not in classes:
                continue
            args = value.arguments
            doc = literal(args[2]) if len(args) > 2 else ""
            patterns = [resolve_string(pkg, module, e) for e in getattr(args[1], "elements", [])]
            text = doc
            if patterns:
                text += (
                    "\n\nTakes the kernels whose module path (the parameter path without its leaf name) ends, after a "
                    "`/` or as a whole, in a match of one of these regexes:\n\n"
                )
                text += "\n".join(f"- `{p}`" for p in patterns)
            other = "attn_qv" if name == "mlp" else "mlp"
            text += f"\n\nPresets compose with `|`: `where=lorajax.{name} | lorajax.{other}`."
            obj.docstring = griffe.Docstring(text, parent=obj)
            obj.value = None
            obj.annotation = "Preset"
            obj.labels.discard("module-attribute")


def resolve_string(pkg: griffe.Module, module: griffe.Module, expr: Any) -> str:
    """A pattern argument: a string literal, or ``_names.CONST`` (a module-level string constant of the package)."""
    text = str(expr)
    if "." not in text:
        return str(literal(text))
    alias, const = text.rsplit(".", 1)
    target = module.members[alias]
    source = pkg.modules[target.target_path.split(".")[-1]] if target.is_alias else target
    try:
        return str(literal(source.members[const].value))
    except ValueError:  # built from other constants (``A + B``): read the value the module computes
        return str(getattr(importlib.import_module(source.path), const))


class LorajaxDocstrings(griffe.Extension):
    def __init__(self) -> None:
        self.public = public_names()

    def _role(self, match: re.Match[str]) -> str:
        name = match.group(1).removeprefix("lorajax.")
        return f"[`{name}`][lorajax.{name}]" if name in self.public else f"`{match.group(1)}`"

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        document_presets(pkg)

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(self._role, fence_doctests(obj.docstring.value))
