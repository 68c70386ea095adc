"""The package's imports against the layers of docs/architecture.md: a DAG, nothing imported from above.

The layer table is read from the docs themselves (the "Layers" section), so the docs and the code cannot drift:
every module of the package must be in exactly one row, every import (inside functions too) must go to a layer
the importing module's row allows, and the import graph must have no cycle.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lorajax"
DOC = ROOT / "docs" / "architecture.md"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``lorajax/quant/_kernel.py`` -> ``lorajax.quant._kernel``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def doc_name(path: Path) -> str:
    """How the docs name a module: its path inside the package, ``quant/_kernel.py``."""
    return path.relative_to(PACKAGE).as_posix()


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def read_layers(text: str) -> tuple[dict[str, int], dict[int, set[int]], dict[int, str]]:
    """The "Layers" table: ``(doc name -> layer, layer -> layers it may import, layer -> its name)``."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    where: dict[str, int] = {}
    allowed: dict[int, set[int]] = {}
    names: dict[int, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].isdigit():
            continue
        n = int(cells[0])
        names[n] = cells[1]
        for mod in re.findall(r"`([^`]+\.py)`", cells[2]):
            assert mod not in where, f"{mod} is in layers {where[mod]} and {n} of docs/architecture.md"
            where[mod] = n
        ranges = re.findall(r"(\d+)(?:\s*[–-]\s*(\d+))?", cells[4])
        allowed[n] = {k for lo, hi in ranges for k in range(int(lo), int(hi or lo) + 1)}
    return where, allowed, names


def imports(path: Path, known: set[str], package: Path = PACKAGE) -> set[str]:
    """The package modules ``path`` imports, anywhere in it (``from lorajax.quant import x`` -> ``lorajax.quant.x``
    if that is a module, else ``lorajax.quant``)."""
    me = module_name(path, package)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = me.split(".") if is_pkg else me.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in known else base
                if target in known:
                    out.add(target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
    out.discard(me)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = package_modules(package)
    known = set(mods)
    return {m: imports(p, known, package) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_violations(graph: dict[str, set[str]], layer: dict[str, int], allowed: dict[int, set[int]]) -> list[str]:
    return [
        f"{m} (layer {layer[m]}) imports {t} (layer {layer[t]})"
        for m in sorted(graph)
        for t in sorted(graph[m])
        if layer[t] not in allowed[layer[m]]
    ]


@pytest.fixture(scope="module")
def layers():
    where, allowed, names = read_layers(DOC.read_text(encoding="utf-8"))
    mods = package_modules()
    return {m: where.get(doc_name(p)) for m, p in mods.items()}, allowed, names, where


def test_the_docs_place_every_module_in_one_layer(layers):
    layer, allowed, names, where = layers
    unplaced = sorted(doc_name(p) for m, p in package_modules().items() if layer[m] is None)
    assert not unplaced, f"docs/architecture.md's Layers table does not place: {unplaced}"
    on_disk = {doc_name(p) for p in package_modules().values()}
    assert not set(where) - on_disk, f"the Layers table names modules that do not exist: {sorted(set(where) - on_disk)}"
    assert sorted(names) == list(range(1, len(names) + 1)), "layers are numbered 1, 2, ... from the bottom"
    for n in names:  # a layer may import itself and layers below it, never one above
        assert n in allowed[n] and max(allowed[n]) == n, f"layer {n} ({names[n]}): 'may import' must end at {n}"


def test_no_import_goes_against_the_layers(layers):
    layer, allowed, _, _ = layers
    bad = layer_violations(import_graph(), layer, allowed)
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles (imports inside functions count): {found}"


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    layer, allowed = {"a": 1, "b": 2}, {1: {1}, 2: {1, 2}}
    assert layer_violations({"a": {"b"}, "b": {"a"}}, layer, allowed) == ["a (layer 1) imports b (layer 2)"]


def test_imports_inside_functions_and_relative_imports_count(tmp_path):
    pkg = tmp_path / "lorajax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_a.py").write_text("def f():\n    from lorajax.sub import _b\n    from lorajax import _c\n")
    (pkg / "sub" / "__init__.py").write_text("from ._b import g\n")
    (pkg / "sub" / "_b.py").write_text("g = 1\n")
    (pkg / "_c.py").write_text("")
    graph = import_graph(pkg)
    assert graph["lorajax._a"] == {"lorajax.sub._b", "lorajax._c"}
    assert graph["lorajax.sub"] == {"lorajax.sub._b"}


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Any module may be the first of the package to be imported (``Import order`` in docs/architecture.md)."""
    script = textwrap.dedent(
        f"""
        import importlib, sys, types
        import jax.numpy
        failed = []
        for name in {sorted(package_modules())!r}:
            for key in [k for k in sys.modules if k == "lorajax" or k.startswith("lorajax.")]:
                del sys.modules[key]
            stub = types.ModuleType("lorajax")  # the package without its __init__: `name` is imported first
            stub.__path__ = [{str(PACKAGE)!r}]
            sys.modules["lorajax"] = stub
            try:
                if name == "lorajax":
                    del sys.modules["lorajax"]
                importlib.import_module(name)
            except Exception as e:
                failed.append(f"{{name}}: {{e!r}}")
        print("\\n".join(failed))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not run.stdout.strip(), "modules that cannot be imported first:\n" + run.stdout
