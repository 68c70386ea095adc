"""The docs cover the public API and their internal links resolve (no MkDocs needed: this reads the Markdown).

`mkdocs build --strict` (in .ci/run, with the `docs` extra) checks links between docs pages, anchors included; these
tests run in the plain test install and catch the rest early: a public name with no API entry, an API entry naming a
private path (the modules behind the names move), and a relative link from the README or the docs to a missing file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lorajax

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(r"^:::[ \t]+(\S+)[ \t]*$", re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target "title")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# Served from elsewhere in the repository by docs/hooks.py.
GENERATED = {
    "benchmarks.md",
    "changelog.md",
    "notebooks/01_lora_from_scratch.ipynb",
    "notebooks/02_lorajax_tour.ipynb",
    "assets/demo_loss_curves.png",
}


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def directives() -> list[str]:
    return [name for page in pages() for name in DIRECTIVE.findall(page.read_text(encoding="utf-8"))]


def test_docs_exist() -> None:
    assert (DOCS / "index.md").is_file() and (ROOT / "mkdocs.yml").is_file()
    assert len(pages()) >= 10


def test_every_public_name_has_an_api_entry() -> None:
    documented = set(directives())
    missing = [name for name in lorajax.__all__ if f"lorajax.{name}" not in documented]
    assert not missing, f"no `::: lorajax.NAME` entry in docs/ for {missing}: add them to a page under docs/api/"


def test_api_entries_name_public_names_once() -> None:
    names = directives()
    public = {f"lorajax.{name}" for name in lorajax.__all__}
    private = [name for name in names if name not in public]
    assert not private, f"API entries must use public names from lorajax.__all__, not {private}"
    repeated = sorted({name for name in names if names.count(name) > 1})
    assert not repeated, f"documented twice: {repeated}"


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", t)]


@pytest.mark.parametrize("path", [ROOT / "README.md", *pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in relative_links(path):
        file = target.split("#", 1)[0]
        resolved = (path.parent / file).resolve()
        in_site = resolved.relative_to(DOCS).as_posix() if resolved.is_relative_to(DOCS) else None
        if not (resolved.exists() or in_site in GENERATED):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_generated_pages_have_sources() -> None:
    hooks = (DOCS / "hooks.py").read_text(encoding="utf-8")
    for site_path in GENERATED:
        assert f'"{site_path}"' in hooks, site_path


def test_readme_stays_short_and_points_at_the_docs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 220, "the README is a summary (~200 lines): move detail into docs/"
    assert 'pip install -e ".[test]"' in readme and 'pip install -e ".[demo]" && python examples/finetune.py' in readme
    assert "docs/" in readme
