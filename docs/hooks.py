"""MkDocs hook: benchmarks/RESULTS.md, the figures the benchmark commands write, becomes the site's
"Results" page (results.md), so that the site shows the same file the commands rewrite instead of a
copy that could fall behind. Its links into docs/ are made relative to the page."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"


def results_page_text(text):
    """RESULTS.md's text as a page of docs/: its links to ../docs/x become x."""
    return text.replace("](../docs/", "](")


def on_files(files, config):
    from mkdocs.structure.files import File  # here: the rewrite above is tested without mkdocs installed

    files.append(File.generated(config, "results.md", content=results_page_text(RESULTS.read_text())))
    return files


def on_config(config):
    # A rebuild under `mkdocs serve` when the figures change.
    config.watch.append(str(RESULTS))
    return config
