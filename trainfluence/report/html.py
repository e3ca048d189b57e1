"""Small HTML helpers: every piece of text and every file name goes through :func:`esc` / :func:`url`."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote

from ..files import write_text

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px} .card{width:150px;font-size:.8em;text-align:center}
.card img{width:96px;height:96px;image-rendering:pixelated;border:3px solid #ccc}
.card.flip img{border-color:#d33} .card.suspect img{border-color:#e90} .cut{width:100%;border-top:2px dashed #d33;color:#d33;font-size:.8em;padding-top:2px} .muted{color:#777} .figure{max-width:100%} .nav a{margin-right:1em}
.small img{width:64px;height:64px} .row{display:flex;gap:6px;align-items:center;margin:4px 0}
.bad{color:#c00} .good{color:#070} code{background:#f4f4f4;padding:1px 4px}
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def url(path: str | Path) -> str:
    """A relative file path as an escaped URL attribute value."""
    return esc(quote(Path(path).as_posix()))


def img(src: str | Path, alt: str, cls: str = "") -> str:
    klass = f' class="{esc(cls)}"' if cls else ""
    return f'<img src="{url(src)}" alt="{esc(alt)}"{klass}>'


def link(href: str | Path, text: str) -> str:
    return f'<a href="{url(href)}">{esc(text)}</a>'


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return esc(f"{v:.4g}")
        return esc(v)

    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body>\n{body}\n</body></html>\n")


def write_page(path: str | Path, title: str, body: str) -> Path:
    return write_text(path, page(title, body))
