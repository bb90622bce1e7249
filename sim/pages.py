"""A run's report as a page: ``report.html`` beside ``report.md``, its plots shown inline.

    python -m sim.pages RUN_DIR... [--index DIR]

``sim.report.write`` writes the page of every run it reports; this command (re)writes the
pages of runs already on disk (any folder with a ``report.md``), and with ``--index`` an
``index.html`` there that links each run's page with its targets met and missed. The
pages are plain files with nothing to fetch: open them in any browser, from disk.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

PAGE: Final = "report.html"
INDEX: Final = "index.html"
_STYLE: Final = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d232b; max-width: 1100px;
  margin: 0 auto; padding: 1rem; }
table { border-collapse: collapse; font-size: .85rem; display: block; overflow-x: auto; }
th, td { border-bottom: 1px solid #dde1e6; padding: .25rem .5rem; text-align: left;
  white-space: nowrap; }
th { color: #66707c; }
code { font-size: .9em; }
figure { margin: 1rem 0; }
img { max-width: 100%; height: auto; border: 1px solid #dde1e6; }
figcaption, .muted { color: #66707c; font-size: .85rem; }
.pass { color: #1f8a4c; } .fail { color: #c0392b; }
"""


class PageError(Exception):
    """A run folder cannot be made into a page; the message says why."""


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _markdown() -> Any:
    """Markdown with tables, and raw HTML shown as text: a scenario file's names reach the
    report, and a page from disk must not run what one of them says."""
    try:
        import markdown  # noqa: PLC0415  # the sim extra's, as matplotlib for the plots
    except ImportError as exc:
        raise PageError("the report's page needs the sim extra: pip install -e '.[sim]'") from exc
    md = markdown.Markdown(extensions=["tables"])
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return md


def _title(markdown_text: str, fallback: str) -> str:
    for line in markdown_text.splitlines():
        if line.startswith("# "):
            return line[2:].replace("`", "").strip()
    return fallback


def write_page(run: Path) -> Path:
    """Write ``run/report.html`` from ``run/report.md`` and the run's PNG plots."""
    source = run / "report.md"
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise PageError(
            f"{source} cannot be read ({exc.strerror or exc}): pass the folder of a finished "
            "run (python -m sim.run ... --out FOLDER writes one)"
        ) from exc
    body = _markdown().convert(text)
    figures = [
        f'<figure><img src="{html.escape(png.name)}" alt="{html.escape(png.stem)}">'
        f"<figcaption>{html.escape(png.name)}</figcaption></figure>"
        for png in sorted(run.glob("*.png"))
    ]
    if figures:
        body += "\n<h2>Plots</h2>\n" + "\n".join(figures)
    page = run / PAGE
    page.write_text(_document(_title(text, run.name), body), encoding="utf-8")
    return page


def _targets(run: Path) -> tuple[int, int]:
    """(met, missed) targets of a run, from its report.json; (0, 0) without one."""
    try:
        data: Any = json.loads((run / "report.json").read_text(encoding="utf-8"))
        targets = data.get("targets") or []
        met = sum(1 for t in targets if t.get("ok"))
    except (OSError, ValueError, AttributeError):
        return 0, 0
    return met, len(targets) - met


def write_index(folder: Path, runs: Sequence[Path]) -> Path:
    """Write ``folder/index.html`` linking each run's page, with its targets."""
    items = []
    for run in runs:
        met, missed = _targets(run)
        link = Path(os.path.relpath(run / PAGE, folder)).as_posix()
        title = _title((run / "report.md").read_text(encoding="utf-8"), run.name)
        score = f'<span class="pass">{met} met</span>'
        if missed:
            score += f', <span class="fail">{missed} missed</span>'
        items.append(
            f'<li><a href="{html.escape(link)}">{html.escape(run.name)}</a>: '
            f"{html.escape(title)} <span class='muted'>({score})</span></li>"
        )
    body = "<h1>Simulator runs</h1>\n<ul>\n" + "\n".join(items) + "\n</ul>"
    index = folder / INDEX
    index.write_text(_document("Simulator runs", body), encoding="utf-8")
    return index


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sim.pages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's --out folder")
    p.add_argument("--index", type=Path, default=None, help="also write DIR/index.html")
    args = p.parse_args(argv)
    runs: list[Path] = []
    status = 0
    for run in args.runs:
        try:
            print(write_page(run))
            runs.append(run)
        except PageError as exc:
            print(f"python -m sim.pages: error: {exc}", file=sys.stderr)
            status = 1
    if args.index is not None and runs:
        args.index.mkdir(parents=True, exist_ok=True)
        print(write_index(args.index, runs))
    return status


if __name__ == "__main__":
    sys.exit(main())
