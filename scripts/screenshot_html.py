#!/usr/bin/env python3
"""Screenshots of rendered notebooks in a real headless browser: are figures visible, is the
math typeset, is anything cut off?

    make run                                            # renders build/html/*.html
    pip install playwright && apt-get install chromium  # once; no browser download needed
    python scripts/screenshot_html.py build/html/02_*.html build/html/06_*.html

For every page it saves a full-page PNG and the first screen under ``docs/screenshots/`` and
prints what it checked in the page itself: images that failed to load or have no size, math
that MathJax left untypeset, and elements wider than the page (cut off or scrolling sideways).
Exits 1 when a check fails. Uses the system Chromium (``--chromium``), so it works offline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in the page: counts of broken images, untypeset math and overflowing elements.
CHECKS_JS = """() => {
  const imgs = [...document.querySelectorAll('img')];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  const typeset = document.querySelectorAll('.MathJax, .MathJax_SVG, mjx-container').length;
  const raw = [...document.querySelectorAll('.jp-RenderedMarkdown, .jp-MarkdownOutput')]
    .map(e => e.innerText).join('\\n');
  const untypeset = (raw.match(/\\$[^$\\s][^$]*\\$/g) || []).length;
  const errors = [...document.querySelectorAll('.MathJax_Error, .MathJax, .MathJax_SVG')]
    .filter(e => /Math Processing Error/.test(e.textContent)).length
    + (document.body.innerText.match(/\\[Math Processing Error\\]/g) || []).length;
  const width = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('img, table, pre')]
    .filter(e => e.getBoundingClientRect().right > width + 1).length;
  return {images: imgs.length, broken, typeset, untypeset, errors, wide,
          height: document.documentElement.scrollHeight};
}"""


def shoot(page, html: Path, out_dir: Path) -> dict:
    """Load ``html``, wait for MathJax, save two PNGs and return the page checks."""
    page.goto(html.resolve().as_uri(), wait_until="load")
    page.wait_for_function(
        "() => !window.MathJax || !MathJax.Hub || MathJax.Hub.queue.pending === 0",
        timeout=60_000)
    page.wait_for_timeout(500)
    checks = page.evaluate(CHECKS_JS)
    out_dir.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out_dir / f"{html.stem}_top.png"))
    full = out_dir / f"{html.stem}_full.png"
    page.screenshot(path=str(full), full_page=True)
    try:  # a 256-colour palette keeps a 10,000-pixel page around 1 MB
        from PIL import Image

        Image.open(full).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(
            full, optimize=True)
    except ImportError:
        pass
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="+", type=Path, help="rendered notebooks (HTML)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="browser executable")
    ap.add_argument("--width", type=int, default=1200, help="viewport width in pixels")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.pages if not p.is_file()]
    if missing:
        ap.error(f"no such page: {', '.join(missing)} (run `make run` first)")
    if not Path(args.chromium).is_file():
        ap.error(f"no browser at {args.chromium}: apt-get install chromium, or pass --chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        ap.error("playwright is not installed: pip install playwright (the browser is the "
                 "system's; `playwright install` is not needed)")

    failed = False
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        for html in args.pages:
            c = shoot(page, html, args.out)
            ok = not (c["broken"] or c["untypeset"] or c["errors"] or c["wide"])
            failed |= not ok
            print(f"{'ok  ' if ok else 'FAIL'} {html.name}: {c['images']} images "
                  f"({c['broken']} broken), {c['typeset']} typeset formulas "
                  f"({c['errors']} errors), "
                  f"{c['untypeset']} left as raw $...$, {c['wide']} elements wider than the "
                  f"page, {c['height']} px tall -> {args.out}/{html.stem}_{{top,full}}.png")
        browser.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
