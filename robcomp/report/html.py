"""Self-contained ``report.html``: plots inline as base64 PNG, tables sortable by clicking a
header (a few lines of inline JavaScript), no external resource of any kind."""
from __future__ import annotations

import base64
import html
from pathlib import Path

__all__ = ["render_html", "table_html"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1250px;padding:1rem 2rem;
color:#1a1a1a;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#555;font-size:.9rem}.finding{background:#f3f7fc;border-left:4px solid #1f77b4;padding:.5rem .8rem;margin:.6rem 0}
.question{color:#444;font-style:italic}.note{color:#555;font-size:.88rem}
figure{margin:.8rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}
.tablewrap{overflow-x:auto;margin:.5rem 0 1rem}
table{border-collapse:collapse;font-size:.8rem;white-space:nowrap}
th,td{border:1px solid #ddd;padding:.2rem .45rem;text-align:right}
th{background:#f5f5f5;cursor:pointer;user-select:none;position:sticky;top:0}
th:hover{background:#e8eef6}th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-size:.85rem;color:#555;padding:.2rem 0}
nav ul{columns:2;font-size:.9rem}
"""

_JS = """
(function(){
  function key(cell){var s=cell.textContent.trim();var n=parseFloat(s.replace(/[^0-9eE+\\-.]/g,' ').trim().split(' ')[0]);
    return (s===''||s==='-'||isNaN(n))?{n:false,v:s.toLowerCase()}:{n:true,v:n};}
  document.querySelectorAll('table.sortable').forEach(function(t){
    t.querySelectorAll('thead th').forEach(function(th,i){
      th.title='click to sort';
      th.addEventListener('click',function(){
        var asc=!th.classList.contains('asc');
        t.querySelectorAll('thead th').forEach(function(o){o.classList.remove('asc','desc');});
        th.classList.add(asc?'asc':'desc');
        var body=t.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);var c;
          if(x.n&&y.n){c=x.v-y.v;}else if(x.n!==y.n){c=x.n?-1:1;}else{c=x.v<y.v?-1:(x.v>y.v?1:0);}
          return asc?c:-c;});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
})();
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def table_html(head: list[str], rows: list[list[str]], caption: str = "") -> str:
    out = ['<div class="tablewrap"><table class="sortable">']
    if caption:
        out.append(f"<caption>{_e(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(alt)} ({_e(Path(path).name)})</figcaption></figure>")


def render_html(title: str, meta: list[str], findings: list[tuple[str, str, str]], sections: list[dict]) -> str:
    """``sections``: dicts with id, title, question, finding, plot (path or None), plots (more
    paths, optional), tables
    [(caption, head, rows)], notes, html (extra raw HTML, trusted: built by robcomp)."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    parts += [f'<p class="meta">{_e(m)}</p>' for m in meta]
    if findings:
        parts.append("<h2 id=\"findings\">Findings</h2><ul>")
        parts += [f'<li><a href="#{_e(i)}"><b>{_e(t)}</b></a>: {_e(f)}</li>' for i, t, f in findings]
        parts.append("</ul>")
    parts.append("<nav><ul>" + "".join(f'<li><a href="#{_e(s["id"])}">{_e(s["title"])}</a></li>' for s in sections)
                 + "</ul></nav>")
    for s in sections:
        parts.append(f'<section id="{_e(s["id"])}"><h2>{_e(s["title"])}</h2>')
        if s.get("question"):
            parts.append(f'<p class="question">{_e(s["question"])}</p>')
        if s.get("finding"):
            parts.append(f'<p class="finding"><b>Finding:</b> {_e(s["finding"])}</p>')
        parts.append(_img(s.get("plot"), s["title"]))
        parts += [_img(p, s["title"]) for p in s.get("plots", [])]
        for caption, head, rows in s.get("tables", []):
            parts.append(table_html(head, rows, caption))
        parts += [f'<p class="note">{_e(n)}</p>' for n in s.get("notes", [])]
        if s.get("html"):
            parts.append(s["html"])
        parts.append("</section>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)
