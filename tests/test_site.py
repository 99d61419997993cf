"""common/site.py: token text and explanations are escaped (a '<script>' token shows as text), tables sort on
their data values, the histogram draws one bar per bin, and a page references nothing outside itself."""
import re

from common import site


def test_token_text_is_escaped():
    nasty = [("<script>alert(1)</script>", 1.0, True), (" & ", 0.5, False), ('"q"', 0.0, False), ("'s", 0.2, False)]
    out = site.context_html(nasty, 1.0)
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert " &amp; " in out and "&quot;q&quot;" in out and "&#x27;s" in out
    assert out.count('class="tok target"') == 1 and out.count("<span") == 4
    table = site.sortable_table("t", [("feature", True), ("text", False)],
                                [([site.cell(3, num=True, link="features/primary/3.html"), site.cell("<b>&")], "3 <B>&")])
    assert "<b>&" not in table and "&lt;b&gt;&amp;" in table and 'data-search="3 &lt;b&gt;&amp;"' in table
    assert site.esc('"><img src=x onerror=alert(1)>') == "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"


def test_cells_sort_keys_and_histogram():
    assert 'data-v="0.25"' in site.cell(0.25, num=True) and 'data-v=""' in site.cell(None, num=True)
    svg = site.histogram_svg([0, 1, 2, 3], [5, 0, 2])
    assert svg.count("<rect") == 3 and "<svg" in svg
    assert "never fires" in site.histogram_svg([], [])


def test_page_is_self_contained():
    html = site.page("t <x>", site.sortable_table("t", [("a", True)], [([site.cell(1, num=True)], "1")]), script=True)
    assert "<title>t &lt;x&gt;</title>" in html
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)          # nothing fetched from elsewhere
    assert "default-src 'none'" in html and "<script>" in html
