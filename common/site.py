"""The feature browser's HTML (browse_features.py): an index of sortable, searchable tables and one page per
feature. Static and offline: every style and script is inline here, nothing is fetched, and every piece of text
that came from data (token strings, explanations) goes through `esc` (tests/test_site.py).

Imports nothing of the project (it sits at the bottom of common/).
"""
from __future__ import annotations

import html

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th.sortable{cursor:pointer;background:#f4f4f4;user-select:none}th.sortable:hover{background:#e8e8e8}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap;line-height:1.7}
.tok{border-radius:2px}.tok.target{outline:2px solid #c0392b;font-weight:bold}
.note{color:#666;font-size:.85em}.search{margin:.5em 0;padding:.3em;width:24em}
.bar{fill:#2f6db5}.axis{stroke:#888}
.cols{display:flex;gap:2em;flex-wrap:wrap}
a{color:#1f5fa8}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th.sortable').forEach(function(th,col){
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort')});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){
        var x=a.cells[col].getAttribute('data-v'),y=b.cells[col].getAttribute('data-v');
        var nx=parseFloat(x),ny=parseFloat(y),c;
        if(!isNaN(nx)&&!isNaN(ny)){c=nx-ny}else{c=String(x).localeCompare(String(y))}
        return asc?c:-c});
      rows.forEach(function(r){body.appendChild(r)});
    });
  });
});
document.querySelectorAll('input.search').forEach(function(box){
  box.addEventListener('input',function(){
    var q=box.value.toLowerCase(),t=document.getElementById(box.getAttribute('data-table'));
    Array.prototype.forEach.call(t.tBodies[0].rows,function(r){
      r.style.display=(!q||r.getAttribute('data-search').indexOf(q)>=0)?'':'none'});
  });
});
"""


def esc(text) -> str:
    """Text from data as HTML text: <, >, &, quotes escaped (a token '<script>' shows as text)."""
    return html.escape(str(text), quote=True)


def page(title: str, body: str, script: bool = False) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; img-src data:\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n{body}\n"
            + (f"<script>{SORT_JS}</script>" if script else "") + "</body></html>\n")


def number(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"


def cell(v, num: bool = False, link: str | None = None) -> str:
    """A table cell: shown text escaped, `data-v` the sort key (numbers sort as numbers; '–' last)."""
    key = "" if v is None else (repr(float(v)) if num else str(v))
    shown = number(v) if num else esc("" if v is None else v)
    if link:
        shown = f'<a href="{esc(link)}">{shown}</a>'
    return f'<td{" class=num" if num else ""} data-v="{esc(key)}">{shown}</td>'


def sortable_table(table_id: str, headers: list[tuple[str, bool]], rows: list[tuple[list[str], str]]) -> str:
    """headers [(label, numeric)], rows [(cells already rendered by `cell`, search text)], with a search box."""
    head = "".join(f'<th class="sortable" scope="col">{esc(h)}</th>' for h, _ in headers)
    body = "\n".join(f'<tr data-search="{esc(search.lower())}">{"".join(cells)}</tr>' for cells, search in rows)
    return (f'<input class="search" type="search" placeholder="filter by feature id or word" data-table="{esc(table_id)}" '
            f'aria-label="filter {esc(table_id)}">\n<table class="sortable" id="{esc(table_id)}"><thead><tr>{head}'
            f"</tr></thead><tbody>\n{body}\n</tbody></table>")


def shade(value: float, vmax: float) -> str:
    a = 0.0 if vmax <= 0 else min(1.0, max(0.0, value / vmax))
    return f"background:rgba(230,126,34,{0.08 + 0.8 * a:.2f})" if value > 0 else ""


def context_html(tokens: list[tuple[str, float, bool]], vmax: float) -> str:
    """One context: [(token text, the feature's value there, is the firing token)], each token shaded by its value,
    the firing token outlined; the value in the tooltip."""
    out = []
    for text, v, target in tokens:
        cls = "tok target" if target else "tok"
        style = shade(v, vmax)
        out.append(f'<span class="{cls}"' + (f' style="{style}"' if style else "")
                   + f' title="{v:.3g}">{esc(text)}</span>')
    return '<div class="ctx">' + "".join(out) + "</div>"


def histogram_svg(edges: list[float], counts: list[int], width: int = 420, height: int = 140) -> str:
    """The activation histogram as inline SVG (no image file, no script)."""
    if not counts:
        return '<p class="note">never fires on these tokens</p>'
    top = max(counts) or 1
    n = len(counts)
    w = (width - 40) / n
    bars = "".join(f'<rect class="bar" x="{30 + i * w:.1f}" y="{height - 20 - (height - 30) * c / top:.1f}" '
                   f'width="{max(w - 1, 1):.1f}" height="{(height - 30) * c / top:.1f}"><title>{edges[i]:.3g} – '
                   f'{edges[i + 1]:.3g}: {c}</title></rect>' for i, c in enumerate(counts))
    axis = (f'<line class="axis" x1="30" y1="{height - 20}" x2="{width - 10}" y2="{height - 20}"/>'
            f'<text x="30" y="{height - 5}" font-size="10">{edges[0]:.3g}</text>'
            f'<text x="{width - 10}" y="{height - 5}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text>'
            f'<text x="26" y="14" font-size="10" text-anchor="end">{top}</text>')
    return (f'<svg class="histogram" role="img" aria-label="activation histogram" width="{width}" height="{height}" '
            f'>{bars}{axis}</svg>')


def simple_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain table; cells are rendered HTML (escape data with `esc` first)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

