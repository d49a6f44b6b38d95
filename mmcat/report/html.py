"""The building blocks of a self-contained HTML report: one file, inline CSS, inline SVG and ``data:`` images, a
few lines of inline JavaScript (sortable tables), no network. It opens from disk, from an artifact store or from a
mail attachment, and looks the same years later.

The first script records script errors and ``console.error`` calls on ``<html data-js-errors>`` and the last one
sets ``data-js-ready``: a headless browser (the tests) or a person can tell that the page ran cleanly.
"""
from __future__ import annotations

import base64
from html import escape
from typing import Any, Iterable, List, Optional, Sequence

import numpy as np

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;
max-width:1180px;padding:0 16px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dce4;
padding-bottom:4px}h3{font-size:14px;margin:14px 0 6px}.sub{color:#5b6272;margin:0 0 12px}
table{border-collapse:collapse;margin:4px 0 12px}th,td{padding:3px 9px;border-bottom:1px solid #e6e8ee;
text-align:right;white-space:nowrap}th{background:#f3f5f9;font-weight:600}td.l,th.l{text-align:left}
table.sortable th{cursor:pointer}table.sortable th:after{content:" \\2195";color:#a4abb8;font-size:11px}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}.note{color:#5b6272;font-size:12px}
.bad{color:#b3261e}.bar{display:inline-block;height:10px;background:#4c78a8;vertical-align:middle}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{width:150px;border:1px solid #e0e3ea;border-radius:6px;
padding:6px;font-size:12px;overflow:hidden}.card img{width:100%;height:120px;object-fit:contain;border-radius:4px;
background:#f3f5f9}.card .t{font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.card .d{color:#5b6272;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden}
.pill{display:inline-block;padding:0 6px;border-radius:8px;
background:#eef1f6;font-size:11px}.pill.ok{background:#e3f4e6}.pill.err{background:#fbe4e2}
svg text{font-family:inherit}
"""

# first in <head>: from here on, every uncaught error and console.error lands in data-js-errors
ERROR_RECORDER = """
(function(){var root=document.documentElement,errs=[];function put(m){errs.push(String(m));
root.setAttribute('data-js-errors',JSON.stringify(errs));}root.setAttribute('data-js-errors','[]');
window.addEventListener('error',function(e){put(e.message||'error');});
window.addEventListener('unhandledrejection',function(e){put('unhandled rejection: '+e.reason);});
var ce=console.error;console.error=function(){put(Array.prototype.join.call(arguments,' '));
return ce.apply(console,arguments);};})();
"""

# click a header to sort (numbers by their data-v value); then mark the page ready
SORTABLE = """
document.querySelectorAll('table.sortable').forEach(function(t){
t.querySelectorAll('th').forEach(function(th,i){var asc=false;th.addEventListener('click',function(){
var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);asc=!asc;rows.sort(function(a,b){
var x=a.cells[i],y=b.cells[i],u=x.getAttribute('data-v'),v=y.getAttribute('data-v');
var c=(u!==null&&v!==null)?(parseFloat(u)-parseFloat(v)):x.textContent.localeCompare(y.textContent);
return asc?c:-c;});rows.forEach(function(r){body.appendChild(r);});});});});
document.documentElement.setAttribute('data-js-ready','1');
"""


def esc(value: Any) -> str:
    return escape(str(value), quote=True)


def page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    """A whole HTML document: ``sections`` are HTML fragments, in order."""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<script>{ERROR_RECORDER}</script>", f"<title>{esc(title)}</title>", f"<style>{CSS}</style>", "</head>",
        "<body>", f"<h1>{esc(title)}</h1>", f'<p class="sub">{esc(subtitle)}</p>', *sections,
        f"<script>{SORTABLE}</script>", "</body>", "</html>", ""])


def section(title: str, *parts: str, id: Optional[str] = None) -> str:
    anchor = f' id="{esc(id)}"' if id else ""
    return f"<section{anchor}><h2>{esc(title)}</h2>" + "".join(parts) + "</section>"


def cell(value: Any, fmt: str = "{:.4f}", left: bool = False) -> str:
    """A table cell; numbers carry their exact value in ``data-v`` (what sorting and checks read)."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        text = fmt.format(value) if isinstance(value, (float, np.floating)) else str(int(value))
        return f'<td data-v="{float(value)!r}">{esc(text)}</td>'
    return f'<td class="l">{esc(value)}</td>' if left else f"<td>{esc(value)}</td>"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], sortable: bool = False, cls: str = "",
          left_columns: int = 1) -> str:
    """``rows`` hold ready cells (:func:`cell` or raw ``<td>`` HTML); the first ``left_columns`` headers align left."""
    classes = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    head = "".join(f'<th class="l">{esc(h)}</th>' if i < left_columns else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(header))
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    attr = f' class="{classes}"' if classes else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_uri(rgb: np.ndarray, max_side: int = 128) -> str:
    """An RGB uint8 image as a JPEG ``data:`` URI, shrunk so its longer side is at most ``max_side``."""
    import cv2

    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w, 1))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 RGB array
        raise ValueError("could not encode a thumbnail")
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def hbar(fraction: float, width: int = 120, color: str = "#4c78a8") -> str:
    """An inline horizontal bar of ``fraction`` (0..1) of ``width`` pixels."""
    px = max(0, min(width, round(float(fraction) * width)))
    return f'<span class="bar" style="width:{px}px;background:{color}"></span>'


def listing(items: List[str], ordered: bool = True) -> str:
    tag = "ol" if ordered else "ul"
    return f"<{tag}>" + "".join(f"<li>{i}</li>" for i in items) + f"</{tag}>"
