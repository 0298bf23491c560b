"""``report.html``: the demo's ``report.md`` as one offline HTML file, with the explorer.

A minimal Markdown converter for what the report template produces (headings, paragraphs,
a quoted warning, pipe tables, bullet lists, images, ``**bold**``, code spans, backslash
escapes), so that no Markdown package is needed. Text is escaped for HTML here except the
entities :func:`credanno.outputs.md_text` already wrote (``&lt;`` stays ``&lt;``); code
spans are escaped whole. Figures are inlined as base64 PNGs; the explorer page of the
teacher store goes in an ``<iframe srcdoc>`` (its HTML attribute-escaped), so the report is
one file that opens without a server or network.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from pathlib import Path

_CODE = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")
_ESCAPED = re.compile(r"\\([\\`*_\[\]|~$#+\-=!().>])")
_AMP = re.compile(r"&(?!#?[A-Za-z0-9]+;)")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_EM = re.compile(r"(?<![*\w])\*([^*\s][^*]*)\*(?![*\w])")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")

#: how an image path becomes a ``src`` (the report: a data URI of the file)
ImageSource = Callable[[str], str | None]


def _text(s: str) -> str:
    """Plain text to HTML, keeping the entities md_text already wrote."""
    return _AMP.sub("&amp;", s).replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _href(url: str) -> str:
    return "#" if url.strip().lower().startswith(("javascript:", "data:", "vbscript:")) else url


def inline(s: str, image: ImageSource | None = None) -> str:
    """One line of Markdown inline syntax to HTML."""
    saved: list[str] = []

    def keep(html_text: str) -> str:
        saved.append(html_text)
        return f"\x00{len(saved) - 1}\x00"

    def code(m: re.Match) -> str:
        body = m.group(2)
        if body.startswith(" ") and body.endswith(" ") and body.strip():
            body = body[1:-1]
        return keep(f"<code>{html.escape(body)}</code>")

    def img(m: re.Match) -> str:
        src = image(m.group(2)) if image is not None else m.group(2)
        alt = m.group(1)
        if src is None:
            return keep(f"<em>[figure missing: {alt}]</em>")
        return keep(f'<img alt="{alt}" src="{html.escape(src, quote=True)}">')

    s = _CODE.sub(code, s)
    s = _ESCAPED.sub(lambda m: keep(html.escape(m.group(1))), s)
    s = _text(s)
    s = _IMAGE.sub(img, s)
    s = _LINK.sub(lambda m: f'<a href="{html.escape(_href(m.group(2)), quote=True)}">'
                            f"{m.group(1)}</a>", s)
    s = _BOLD.sub(r"<strong>\1</strong>", s)
    s = _EM.sub(r"<em>\1</em>", s)
    return re.sub("\x00(\\d+)\x00", lambda m: saved[int(m.group(1))], s)


def _cells(line: str) -> list[str]:
    parts = _CELL_SPLIT.split(line.strip())
    if parts and parts[0].strip() == "":
        parts = parts[1:]
    if parts and parts[-1].strip() == "":
        parts = parts[:-1]
    return [p.strip() for p in parts]


def _table(lines: list[str], image: ImageSource | None) -> str:
    head = _cells(lines[0])
    body = lines[1:]
    aligns: list[str] = []
    if body and set(body[0].replace("|", "").strip()) <= set("-: "):
        aligns = ["right" if c.endswith(":") else "" for c in _cells(body[0])]
        body = body[1:]

    def row(cells: list[str], tag: str) -> str:
        out = []
        for j, c in enumerate(cells):
            style = ' style="text-align:right"' if j < len(aligns) and aligns[j] else ""
            out.append(f"<{tag}{style}>{inline(c, image)}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"

    return ("<table><thead>" + row(head, "th") + "</thead><tbody>"
            + "".join(row(_cells(b), "td") for b in body) + "</tbody></table>")


def _block(kind: str, lines: list[str], image: ImageSource | None) -> str:
    if kind == "table":
        return _table(lines, image)
    if kind == "quote":
        return "<blockquote><p>" + inline(" ".join(ln[1:].strip() for ln in lines),
                                          image) + "</p></blockquote>"
    if kind == "list":
        return "<ul>" + "".join(f"<li>{inline(ln[2:].strip(), image)}</li>"
                                for ln in lines) + "</ul>"
    return "<p>" + inline(" ".join(ln.strip() for ln in lines), image) + "</p>"


def _kind(line: str) -> str:
    s = line.lstrip()
    if s.startswith("|"):
        return "table"
    if s.startswith(">"):
        return "quote"
    if s.startswith(("- ", "* ")):
        return "list"
    return "para"


def markdown_html(text: str, image: ImageSource | None = None) -> str:
    """The HTML body of a Markdown document (the subset the demo's report uses)."""
    out: list[str] = []
    kind, lines = "", []

    def flush() -> None:
        if lines:
            out.append(_block(kind, lines, image))
            lines.clear()

    for line in text.splitlines():
        heading = re.match(r"(#{1,6}) +(.*)", line)
        if not line.strip() or heading:
            flush()
            if heading:
                level = len(heading.group(1))
                out.append(f"<h{level}>{inline(heading.group(2).strip(), image)}</h{level}>")
            continue
        this = _kind(line)
        if lines and this != kind:
            flush()
        kind = this if not lines else kind
        lines.append(line)
    flush()
    return "\n".join(out)


def png_data_uri(folder: Path) -> ImageSource:
    """Image paths relative to ``folder`` -> ``data:`` URIs (None for a missing file)."""

    def source(rel: str) -> str | None:
        path = folder / rel
        if not path.is_file():
            return None
        mime = "image/svg+xml" if path.suffix.lower() == ".svg" else "image/png"
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")

    return source


_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1200px; margin: 20px auto;
       padding: 0 16px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; }
th { background: #f5f5f5; }
blockquote { background: #fff3cd; border-left: 4px solid #e0b84c; margin: 8px 0;
             padding: 4px 12px; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 3px; }
iframe { width: 100%; height: 940px; border: 1px solid #ccc; }
"""


def report_html(markdown: str, folder: Path, explorer: str | None = None,
                title: str = "credanno demo report") -> str:
    """The whole report page: ``markdown`` with figures from ``folder`` inlined, then the
    explorer page (``explorer``, full HTML) in an iframe."""
    body = markdown_html(markdown, png_data_uri(folder))
    if explorer is not None:
        body += ("\n<h2>Explore the teacher's learned space</h2>\n<p>The test images on the "
                 "teacher's t-SNE map: hover a point for its patch and ratings, click it for "
                 "its nearest training images and their k-NN vote.</p>\n"
                 f'<iframe id="explorer" title="explorer" srcdoc="{html.escape(explorer)}">'
                 "</iframe>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"{body}\n</body>\n</html>\n")
