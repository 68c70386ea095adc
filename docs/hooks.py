"""MkDocs hook: serve files that live outside docs/ without keeping copies of them.

benchmarks/RESULTS.md becomes the "Benchmarks" page, CHANGELOG.md the "Changelog" page, the notebooks in
notebooks/ become pages (mkdocs-jupyter renders them, unexecuted: they are committed without outputs), and the
demo's loss-curve plot is served for the demo page. The sources stay where they are, so the site can never drift
from them.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent

# site path -> file in the repository
EXTERNAL = {
    "benchmarks.md": "benchmarks/RESULTS.md",
    "changelog.md": "CHANGELOG.md",
    "notebooks/01_lora_from_scratch.ipynb": "notebooks/01_lora_from_scratch.ipynb",
    "notebooks/02_lorajax_tour.ipynb": "notebooks/02_lorajax_tour.ipynb",
    "assets/demo_loss_curves.png": "assets/demo_loss_curves.png",
}


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
