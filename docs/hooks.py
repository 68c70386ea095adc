"""MkDocs hook: serve files that live outside docs/ without keeping copies of them, and check every built link.

benchmarks/RESULTS.md becomes the "Benchmarks" page, CHANGELOG.md the "Changelog" page, the notebooks in
notebooks/ become pages (mkdocs-jupyter renders them, unexecuted: they are committed without outputs), and the
demo's plot is served for the demo page. The sources stay where they are, so the site can never drift from them.

The pages link to those files where they live in the repository (``../benchmarks/RESULTS.md#precision`` from
docs/guide/), so the links work on GitHub too; ``on_page_markdown`` rewrites each such link to the file's place in
the site before MkDocs validates it.

After the build, ``on_post_build`` reads every page of the site and reports (as warnings, which fail
``mkdocs build --strict``) each relative link to a missing file or a missing anchor, whatever wrote it: Markdown,
mkdocstrings, or mkdocs-jupyter's notebook pages and tables of contents (which MkDocs' own anchor validation does
not see), and each private name (``_module.NAME``, ``lorajax._x``) left on an API reference page.
"""

from __future__ import annotations

import logging
import posixpath
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("mkdocs.hooks.lorajax")

# site path -> file in the repository
EXTERNAL = {
    "benchmarks.md": "benchmarks/RESULTS.md",
    "changelog.md": "CHANGELOG.md",
    "notebooks/01_lora_from_scratch.ipynb": "notebooks/01_lora_from_scratch.ipynb",
    "notebooks/02_lorajax_tour.ipynb": "notebooks/02_lorajax_tour.ipynb",
    "assets/demo_loss_curves.png": "assets/demo_loss_curves.png",
}
SITE_PATH = {source: site for site, source in EXTERNAL.items()}

# [text](target) / ![alt](target "title"): the target, up to a space or the closing parenthesis.
LINK = re.compile(r"(\]\()([^)\s]+)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")
# A private name in an API page's text: `_names.QUERY`, `lorajax._targets`, `_AllLinear(`.
PRIVATE = re.compile(r"(?<![\w.])_[A-Za-z]\w*(?:\.\w+|\()|\blorajax\._\w+")


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files: Files, config: MkDocsConfig) -> Files:
    for site_path, source in EXTERNAL.items():
        path = ROOT / source
        if not path.is_file():
            raise FileNotFoundError(f"docs/hooks.py: {source} is missing (it is served as {site_path})")
        if site_path == source:
            # A plain File rooted at the repository: mkdocs-jupyter's NotebookFile wrapper needs a src_dir.
            files.append(
                File(source, src_dir=str(ROOT), dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls)
            )
        else:
            files.append(File.generated(config, site_path, abs_src_path=str(path)))
    return files


def repository_path(page_src: str) -> str:
    """Where the page's source lives, relative to the repository root."""
    return EXTERNAL.get(page_src, "docs/" + page_src)


def site_target(page_src: str, target: str) -> str:
    """``target`` as the site needs it: a link to a served file outside docs/ becomes a link to its site path."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path or parts.path.startswith("/"):
        return target
    here = posixpath.dirname(repository_path(page_src))
    in_repo = posixpath.normpath(posixpath.join(here, unquote(parts.path)))
    if in_repo.startswith("docs/"):
        site = in_repo.removeprefix("docs/")
    elif in_repo in SITE_PATH:
        site = SITE_PATH[in_repo]
    else:
        return target  # MkDocs reports it if it is broken
    new = posixpath.relpath(site, posixpath.dirname(page_src) or ".")
    return new + (f"#{parts.fragment}" if parts.fragment else "")


def rewrite_links(markdown: str, page_src: str) -> str:
    """Rewrite the relative link targets outside code (fenced blocks and code spans stay as they are)."""

    def prose(text: str) -> str:
        pieces = CODE.split(text)
        spans = CODE.findall(text)
        out = [LINK.sub(lambda m: m.group(1) + site_target(page_src, m.group(2)), p) for p in pieces]
        return "".join(o + (spans[i] if i < len(spans) else "") for i, o in enumerate(out))

    result, last = [], 0
    for fence in FENCE.finditer(markdown):
        result += [prose(markdown[last : fence.start()]), fence.group(0)]
        last = fence.end()
    return "".join([*result, prose(markdown[last:])])


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return rewrite_links(markdown, page.file.src_uri)


class _Collect(HTMLParser):
    """The ids and link targets of one HTML page, and the text of its main content."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.text: list[str] = []
        self._article = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if named.get(key):
                self.ids.add(str(named[key]))
        if tag == "a" and named.get("href"):
            self.hrefs.append(str(named["href"]))
        if tag == "article":
            self._article += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "article":
            self._article -= 1

    def handle_data(self, data: str) -> None:
        if self._article:
            self.text.append(data)


def check_site(site: Path) -> list[str]:
    """Every broken relative link or anchor in the built site, and every private name on an API page."""
    pages: dict[Path, _Collect] = {}
    for path in sorted(site.rglob("*.html")):
        parser = _Collect()
        parser.feed(path.read_text(encoding="utf-8"))
        pages[path] = parser
    problems = []
    for path, parser in pages.items():
        name = path.relative_to(site).as_posix()
        if name == "404.html":  # its links are absolute: the page is served at any depth
            continue
        for href in parser.hrefs:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith(("/", "mailto:")):
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{name}: link to a missing file: {href}")
            elif parts.fragment and target in pages and unquote(parts.fragment) not in pages[target].ids:
                problems.append(f"{name}: link to a missing anchor: {href}")
        if name.startswith("api/"):
            text = "".join(parser.text)
            for match in sorted(set(PRIVATE.findall(text))):
                problems.append(f"{name}: private name {match!r} on an API page (document the public name)")
    return problems


def on_post_build(config: MkDocsConfig) -> None:
    for problem in dict.fromkeys(check_site(Path(config.site_dir))):  # once each, in order
        log.warning(problem)
