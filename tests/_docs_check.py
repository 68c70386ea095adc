"""Reading the docs as MkDocs and GitHub do, without either: pages, links, heading anchors, code blocks, commands.

Used by tests/test_docs.py. The anchors are computed as the three renderers compute them:
- the site (MkDocs, Python-Markdown's ``toc`` extension): ``markdown.extensions.toc.slugify`` of the heading's text
  with its inline markup rendered and its tags stripped, ``_1``, ``_2``... for repeats (``md_slugs``);
- GitHub: the text lower-cased, punctuation dropped, each space a ``-``, ``-1``, ``-2``... for repeats
  (``github_slugs``);
- notebooks on the site (mkdocs-jupyter): a heading's id is the same slugify of its text, inline code included, but
  the page's table of contents slugifies the heading with its inline code removed (``notebook_anchors``), so a
  notebook heading with inline code gets a contents entry that points nowhere.
A test checks ``md_slug`` against Python-Markdown itself where it is installed.
"""

from __future__ import annotations

import ast
import html
import json
import posixpath
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

FENCE = re.compile(r"^([ \t]*)(```+|~~~+)[ \t]*([^\n`]*)\n(.*?)^\1\2[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^[ \t]{0,3}\[[^\]]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$", re.MULTILINE)
HEADING = re.compile(r"^[ \t]{0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
ATTR_ID = re.compile(r"[ \t]*\{:?[^}]*#([\w-]+)[^}]*\}[ \t]*$")
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
DIRECTIVE = re.compile(r"^:::[ \t]+(\S+)[ \t]*$", re.MULTILINE)


# ------------------------------------------------------------------------------------------------ pages


def site_pages() -> dict[str, str]:
    """site path -> repository path of every page (and asset) the docs site serves from outside docs/.

    Read statically from docs/hooks.py's ``EXTERNAL`` (importing it needs MkDocs, which the test install lacks).
    """
    tree = ast.parse((DOCS / "hooks.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXTERNAL" for t in node.targets):
            return dict(ast.literal_eval(node.value))
    raise AssertionError("docs/hooks.py defines no EXTERNAL")


def markdown_sources() -> list[Path]:
    """Every Markdown file a reader sees: the README, the changelog, the benchmark results and the docs."""
    served = [ROOT / source for source in site_pages().values() if source.endswith(".md")]
    return [ROOT / "README.md", *served, *sorted(DOCS.rglob("*.md"))]


def notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def markdown_of(path: Path) -> str:
    """A Markdown file's text, or a notebook's markdown cells joined by blank lines."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def served_as(path: Path) -> str | None:
    """The file's path in the site (relative to the site root), or None when the site does not serve it."""
    if not path.is_relative_to(ROOT):
        return None
    repo = rel(path)
    if repo.startswith("docs/"):
        return repo.removeprefix("docs/")
    return {source: site for site, source in site_pages().items()}.get(repo)


def prose(text: str) -> str:
    """The text without fenced code blocks, HTML comments and inline code (links in them are not links)."""
    text = FENCE.sub("", text)
    text = COMMENT.sub("", text)
    return CODE_SPAN.sub("", text)


def links(text: str) -> list[str]:
    """Every link target outside code: inline links, images and reference definitions."""
    text = prose(text)
    return [m.group(2) for m in LINK.finditer(text)] + REFERENCE.findall(text)


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^/", target)


# ------------------------------------------------------------------------------------------------ anchors


def heading_text(raw: str, keep_code: bool = True) -> str:
    """A heading's text as the renderers see it: inline markup rendered, tags stripped, entities decoded."""
    raw = ATTR_ID.sub("", raw)
    code = [m.group(2).strip() for m in CODE_SPAN.finditer(raw)]
    raw = CODE_SPAN.sub("\x00", raw)  # code is taken literally: set it aside
    raw = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", raw)  # images: strip_tags drops <img>
    raw = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", raw)  # links: their text
    raw = re.sub(r"(\*\*|\*)(?=\S)(.+?)(?<=\S)\1", r"\2", raw)  # emphasis
    raw = re.sub(r"(?<!\w)(__|_)(?=\S)(.+?)(?<=\S)\1(?!\w)", r"\2", raw)  # not inside words (snake_case)
    raw = re.sub(r"\\([\\`*_{}\[\]()#+\-.!])", r"\1", raw)  # backslash escapes
    raw = re.sub(r"<[^>]+>", "", raw)
    pieces = raw.split("\x00")
    raw = "".join(p + (code[i] if keep_code and i < len(code) else "") for i, p in enumerate(pieces))
    return " ".join(html.unescape(raw).split())


def md_slug(text: str) -> str:
    """Python-Markdown's ``toc`` slugify (the default: ASCII, separator '-')."""
    value = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def github_slug(text: str) -> str:
    """GitHub's heading anchor (github-slugger): lower case, punctuation dropped, each space a '-'."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def headings(text: str) -> list[tuple[str, str | None]]:
    """(raw heading text, explicit ``{#id}`` or None) of each ATX heading outside code blocks."""
    out = []
    for match in HEADING.finditer(COMMENT.sub("", FENCE.sub("", text))):
        raw = match.group(2)
        explicit = ATTR_ID.search(raw)
        out.append((raw, explicit.group(1) if explicit else None))
    return out


def unique(slugs: list[str], sep: str) -> set[str]:
    seen: set[str] = set()
    for slug in slugs:
        base, n = slug, 0
        while slug in seen or not slug:
            n += 1
            slug = f"{base}{sep}{n}"
        seen.add(slug)
    return seen


def md_slugs(text: str) -> set[str]:
    """The anchors of a Markdown page on the site."""
    return unique([e or md_slug(heading_text(raw)) for raw, e in headings(text)], "_")


def github_slugs(text: str) -> set[str]:
    """The anchors of a Markdown file on GitHub (an explicit ``{#id}`` is shown as text there, not an anchor)."""
    return unique([github_slug(heading_text(raw)) for raw, _ in headings(text)], "-")


@dataclass
class NotebookAnchors:
    ids: set[str] = field(default_factory=set)  # what the headings carry (mkdocs-jupyter)
    toc_mismatches: list[str] = field(default_factory=list)  # headings whose contents entry points elsewhere


def notebook_anchors(path: Path) -> NotebookAnchors:
    found = NotebookAnchors()
    for raw, _ in headings(markdown_of(path)):
        heading_id = md_slug(heading_text(raw, keep_code=True))
        toc_id = md_slug(heading_text(raw, keep_code=False))
        found.ids.add(heading_id)
        if toc_id != heading_id:
            found.toc_mismatches.append(f"{raw!r}: heading #{heading_id}, contents entry #{toc_id}")
    return found


def api_anchors(path: Path) -> set[str]:
    """The anchors mkdocstrings writes on an API page: one per ``::: lorajax.name`` entry (members not listed)."""
    return set(DIRECTIVE.findall(path.read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------------------ code blocks


@dataclass
class Block:
    """A fenced code block of a page, with what the ``<!-- docs-test: ... -->`` comments before it say."""

    page: Path
    line: int
    info: str
    code: str
    skip: str | None = None  # why it does not run
    requires: list[str] = field(default_factory=list)  # modules it needs (skipped without them)
    setup: list[str] = field(default_factory=list)  # hidden code run before it
    output: str | None = None  # a ```text block right after it: what it prints


TEST_COMMENT = re.compile(r"<!--\s*docs-test:\s*(\w+)(.*?)-->", re.DOTALL)


def blocks(page: Path) -> list[Block]:
    """The page's fenced blocks in order; a ``docs-test`` comment applies to the next block.

    ``<!-- docs-test: skip REASON -->`` keeps it from running, ``<!-- docs-test: requires MODULE ... -->`` skips it
    without those modules, ``<!-- docs-test: setup\\nCODE\\n-->`` runs CODE first (hidden from readers).
    """
    text = page.read_text(encoding="utf-8")
    comments = [(m.start(), m) for m in TEST_COMMENT.finditer(text)]
    fences = [(m.start(), m) for m in FENCE.finditer(text)]
    found: list[Block] = []
    skip: str | None = None
    requires: list[str] = []
    setup: list[str] = []
    end = 0
    for start, m in sorted(comments + fences, key=lambda e: e[0]):
        if start < end:
            continue  # a comment inside a code block
        if m.re is TEST_COMMENT:
            action, rest = m.group(1), m.group(2).strip()
            if action == "skip":
                assert rest, f"{rel(page)}: `docs-test: skip` needs a reason"
                skip = rest
            elif action == "requires":
                requires += rest.split()
            elif action == "setup":
                setup.append(rest)
            else:
                raise AssertionError(f"{rel(page)}: unknown `docs-test: {action}`")
            continue
        indent, info, body = m.group(1), m.group(3).strip(), m.group(4)
        body = "\n".join(line.removeprefix(indent) for line in body.splitlines())
        if info == "text" and found and found[-1].info == "python" and not text[end:start].strip():
            found[-1].output = body  # a text block right after a python block: what it prints
        found.append(Block(page, text.count("\n", 0, start) + 1, info, body, skip, requires, setup))
        skip, requires, setup, end = None, [], [], m.end()
    return found


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.info.split()[:1] == ["python"]]


# ------------------------------------------------------------------------------------------------ commands


SCRIPT = re.compile(
    r"\bpython3?\s+((?:examples|benchmarks|notebooks|tests/fixtures)/[\w/]+\.py)((?:[ \t]+[^\s`|;&#]+)*)"
)
EXTRAS = re.compile(r"""pip install (?:-e )?["']?\.\[([\w,-]+)\]""")
MARKER = re.compile(r"pytest[^\n`]*?\s-m\s+[\"']?(?:not\s+)?(\w+)")


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, the ``--flags`` given to it) of every ``python examples/x.py ...`` in the text, code included."""
    out = []
    for m in SCRIPT.finditer(text):
        flags = [word.split("=", 1)[0] for word in m.group(2).split() if word.startswith("--")]
        out.append((m.group(1), flags))
    return out


def site_relative(page: Path, target: str) -> str | None:
    """Where a relative link from ``page`` lands in the site, following docs/hooks.py's rewriting of links to files
    served from outside docs/; None when the page is not served or the target is not."""
    here = served_as(page)
    if here is None:
        return None
    path, _, fragment = target.partition("#")
    in_repo = posixpath.normpath(posixpath.join(posixpath.dirname(rel(page)), path))
    site = served_as(ROOT / in_repo) if (ROOT / in_repo).exists() else None
    if site is None:
        return None
    return posixpath.relpath(site, posixpath.dirname(here) or ".") + (f"#{fragment}" if fragment else "")


# ------------------------------------------------------------------------------------------------ links


def site_anchors(target: Path) -> set[str] | None:
    """The anchors the site gives a file's page (None: not a page whose anchors we know)."""
    if target.suffix == ".ipynb":
        return notebook_anchors(target).ids
    if target.suffix != ".md":
        return None
    if target.parent == DOCS / "api":
        return api_anchors(target)
    return md_slugs(target.read_text(encoding="utf-8"))


def anchor_ok(anchors: set[str], fragment: str, api: bool) -> bool:
    # An API page's member anchors (lorajax.Preset.select) hang off its entries' anchors.
    return fragment in anchors or (api and any(fragment.startswith(a + ".") for a in anchors))


def link_problems(source: Path) -> list[str]:
    """Every relative link of ``source`` that is broken on GitHub (the file as it lies in the repository) or, where
    the site serves ``source``, on the site; anchors included."""
    problems = []
    served = served_as(source) is not None
    for target in links(markdown_of(source)):
        if not is_relative(target):
            continue
        path, _, fragment = target.partition("#")
        file = (source.parent / unquote(path)).resolve() if path else source
        if not file.exists():
            problems.append(f"{target}: no such file {rel(file)}")
            continue
        if served:
            landing = site_relative(source, target)
            if landing is None:
                problems.append(f"{target}: the site does not serve {rel(file)} (link it by URL, or not at all)")
                continue
            if source.suffix == ".ipynb" and landing != target:
                problems.append(f"{target}: from a notebook this lands on a different place in the site ({landing})")
        if not fragment or file.suffix not in (".md", ".ipynb"):
            continue
        api = file.parent == DOCS / "api"
        anchors = site_anchors(file)
        if served and anchors is not None and not anchor_ok(anchors, fragment, api):
            problems.append(f"{target}: no heading #{fragment} on the site (there: {sorted(anchors)})")
        if file.suffix == ".md" and not api:
            on_github = github_slugs(file.read_text(encoding="utf-8"))
            if fragment not in on_github:
                problems.append(f"{target}: no heading #{fragment} on GitHub (there: {sorted(on_github)})")
    return problems
