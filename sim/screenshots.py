"""``python -m sim.screenshots URL OUT_DIR``: screenshots of a page, desktop and phone width.

Takes ``desktop.png`` (1280x1100) and ``phone.png`` (390x844 at 2x) of a peer's page or the
simulator's live page with Playwright (the dev extra) driving Debian's ``chromium``
headless, every background service of the browser off: it fetches nothing but ``URL``,
which must be on 127.0.0.1. ``--wait-for SELECTOR`` waits for an element first (default: a
decision in the peer page's feed); ``--prefix`` names the files ``PREFIX-desktop.png``...
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Final

CHROMIUM: Final = "/usr/bin/chromium"
# Chromium reaches for update, sync and safe-browsing services unless told not to; none is
# reachable (or wanted) from a test or a screenshot.
CHROMIUM_ARGS: Final = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORTS: Final = {
    "desktop": ({"width": 1280, "height": 1100}, 1),
    "phone": ({"width": 390, "height": 844}, 2),
}
SETTLE_MS: Final = 1500  # one state tick of the page, so the numbers are filled in


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.screenshots", description=__doc__)
    p.add_argument("url", help="the page, on 127.0.0.1")
    p.add_argument("out", type=Path, help="folder for the PNG files")
    p.add_argument("--wait-for", default="#feed li", metavar="SELECTOR")
    p.add_argument("--prefix", default="")
    args = p.parse_args(argv)
    if urllib.parse.urlsplit(args.url).hostname != "127.0.0.1":
        p.error("the URL must be on 127.0.0.1 (a local peer or simulator)")
    try:
        from playwright.sync_api import Error, sync_playwright  # noqa: PLC0415  # dev extra
    except ImportError:
        p.error("needs playwright: pip install -e '.[dev]'")
    if not Path(CHROMIUM).is_file():
        p.error(f"needs {CHROMIUM}: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = f"{args.prefix}-" if args.prefix else ""
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS)
            )
            for name, (viewport, scale) in VIEWPORTS.items():
                page = browser.new_page(viewport=viewport, device_scale_factor=scale)  # type: ignore[arg-type]
                page.goto(args.url)
                page.wait_for_selector(args.wait_for, timeout=30_000)
                page.wait_for_timeout(SETTLE_MS)
                path = args.out / f"{prefix}{name}.png"
                page.screenshot(path=str(path))
                print(path)
                page.close()
            browser.close()
    except Error as exc:
        print(f"python -m sim.screenshots: error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
