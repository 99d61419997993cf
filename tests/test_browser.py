"""browse_features.py on the tiny demo, driven in a real headless Chromium (Debian's `chromium`, through Playwright):
the index sorts and filters, a link leads to a feature page whose highlighted tokens and histogram render; any
console error, page error or request outside the site fails the test. A screenshot is saved.

Without a chromium binary the browser test is skipped, except under CI (.ci/run installs it and sets CI=1), where
it fails instead."""
import json
import os
import shutil

import pytest

from conftest import run_script


@pytest.fixture(scope="module")
def site_dir(pipeline):
    out = pipeline / "browser"
    run_script("browse_features.py", "--sae", str(pipeline / "p1"), "--nfm", str(pipeline / "p2"), "--secondary",
               str(pipeline / "p3"), "--top", "6", "--val-tokens", "3000", "--cache-dir", str(pipeline / "cache"),
               "--out", str(out))
    return out


def test_site_files_and_pages(site_dir):
    m = json.loads((site_dir / "metrics.json").read_text())
    assert set(m["pages"]) == {"primary", "secondary"} and all(len(v) == 6 for v in m["pages"].values())
    for space, feats in m["pages"].items():
        for f in feats:
            page = (site_dir / "features" / space / f"{f}.html").read_text()
            assert 'class="tok target"' in page and '<svg class="histogram"' in page
            assert ("Primary pairs that drive it on these" in page) == (space == "secondary")
            assert ("Logit lens: promotes" in page) == (space == "primary")
            assert "://" not in page                                    # no address outside the site
    index = (site_dir / "index.html").read_text()
    assert index.count("<tr data-search=") == 12 and "://" not in index
    # the most frequent features first (--order frequency): the index's frequencies never increase
    freqs = [float(v) for v in __import__("re").findall(r'<td class=num data-v="([^"]+)">', index)[1::4][:6]]
    assert freqs == sorted(freqs, reverse=True)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_site_in_a_real_browser(site_dir, tmp_path):
    exe = chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on this CI machine: .ci/run should have installed Debian's chromium")
        pytest.skip("no chromium binary (apt-get install chromium); CI installs it")
    from playwright.sync_api import sync_playwright

    site = site_dir.resolve()
    problems, outside = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
        page.on("pageerror", lambda err: problems.append(f"page error: {err}"))

        def route(r):
            url = r.request.url
            if not url.startswith(site.as_uri()):
                outside.append(url)
                return r.abort()
            return r.continue_()
        page.route("**/*", route)

        page.goto((site / "index.html").as_uri())
        table = page.locator("#table-primary")
        freq = lambda: [float(v) for v in table.locator("tbody tr td:nth-child(2)").evaluate_all(  # noqa: E731
            "cells => cells.map(c => c.getAttribute('data-v'))")]
        table.locator("th", has_text="frequency").click()
        up = freq()
        assert up == sorted(up) and len(up) == 6
        table.locator("th", has_text="frequency").click()
        assert freq() == sorted(up, reverse=True)
        # the search box filters by feature id
        first = table.locator("tbody tr td:first-child").first.get_attribute("data-v")
        first_id = str(int(float(first)))
        page.locator('input[data-table="table-primary"]').fill(first_id)
        visible = table.locator("tbody tr:visible")
        assert visible.count() >= 1 and all(first_id in visible.nth(i).get_attribute("data-search")
                                            for i in range(visible.count()))
        # follow the link to the feature page
        visible.first.locator("a").click()
        page.wait_for_load_state()
        assert page.url.endswith(f"/features/primary/{first_id}.html")
        target = page.locator(".tok.target").first
        assert target.is_visible() and page.locator(".tok.target").count() >= 1
        shaded = page.locator(".tok[style*=background]").first.evaluate("e => getComputedStyle(e).backgroundColor")
        assert shaded.startswith("rgba(230, 126, 34")
        bars = page.locator("svg.histogram rect")
        assert bars.count() >= 1 and bars.first.bounding_box()["height"] > 0
        shot = tmp_path / "feature_page.png"
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    assert not problems, problems
    assert not outside, outside


def test_token_text_displays_as_text_in_the_browser(tmp_path):
    """Tokens such as '<script>', '&' and quotes are shown as typed, and nothing in them runs."""
    exe = chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on this CI machine")
        pytest.skip("no chromium binary")
    from playwright.sync_api import sync_playwright
    from common import site

    nasty = ["<script>window.__pwned=1</script>", " & ", '"quoted"', "<img src=x onerror=window.__pwned=2>"]
    html = site.page("escaping", site.context_html([(t, 1.0, i == 0) for i, t in enumerate(nasty)], 1.0))
    f = tmp_path / "escape.html"
    f.write_text(html)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f.as_uri())
        assert page.locator(".tok").all_text_contents() == nasty
        assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
        browser.close()
