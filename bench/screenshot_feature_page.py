"""The README's screenshot of a feature page: the demo's feature browser opened in headless Chromium.

    .venv/bin/python bench/screenshot_feature_page.py                  # after make demo
    .venv/bin/python bench/screenshot_feature_page.py --page features/secondary/263.html --out docs/x.png

Needs Debian's chromium and playwright (requirements-test.txt). By default it shows the primary feature part8
ranked first for formality, the demo's clearest.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_page(site: Path) -> str:
    m = json.loads((ROOT / "checkpoints" / "part8_stimuli" / "metrics.json").read_text())
    return f"features/primary/{m['primary']['top']['formality'][0]['feature']}.html"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", default=str(ROOT / "checkpoints" / "feature_browser"), help="the browser's --out folder")
    p.add_argument("--page", default=None, help="page inside the site (default: part8's top formality feature)")
    p.add_argument("--out", default=str(ROOT / "docs" / "demo_feature_page.png"), help="PNG to write")
    p.add_argument("--height", type=int, default=1100, help="viewport height in pixels (default: 1100)")
    a = p.parse_args()
    from playwright.sync_api import sync_playwright

    site = Path(a.site).resolve()
    page_path = site / (a.page or default_page(site))
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("error: no chromium binary; apt-get install chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1150, "height": a.height})
        page.goto(page_path.as_uri())
        page.screenshot(path=a.out)
        browser.close()
    print(f"screenshot of {page_path} in {a.out}")


if __name__ == "__main__":
    main()
