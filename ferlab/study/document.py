"""A tiny document model (headings, paragraphs, tables, figures) rendered to Markdown and self-contained HTML.

The HTML embeds every figure as a base64 ``data:`` URL and carries its CSS inline: it makes no request at all,
so it opens the same from a mail attachment, a CI artefact or ``file://``.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass
class Para:
    text: str
    kind: str = ""  # "" or "note" (rendered as a side note)


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str


@dataclass
class Figure:
    path: Path  # a PNG file
    caption: str
    width: int = 0  # display width in CSS pixels (0: natural, capped by the page)


Block = Heading | Para | Table | Figure


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


# ----------------------------------------------------------------------------- Markdown
def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table, root: Path) -> str:
    lines = [f"*{t.caption}*", "", "| " + " | ".join(map(_md_cell, t.header)) + " |",
             "|" + "|".join("---" for _ in t.header) + "|"]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in t.rows]
    return "\n".join(lines)


def _md_figure(f: Figure, root: Path) -> str:
    rel = Path(f.path).resolve().relative_to(root.resolve()).as_posix()
    return f"![{_md_cell(f.caption)}]({rel})\n\n*{f.caption}*"


MD_RENDER: dict[type, Callable[[Block, Path], str]] = {
    Heading: lambda b, root: "#" * b.level + " " + b.text,
    Para: lambda b, root: ("> " + b.text) if b.kind == "note" else b.text,
    Table: _md_table,
    Figure: _md_figure,
}


def to_markdown(doc: Document, root: Path) -> str:
    """The document as Markdown; figure links are relative to ``root`` (the folder report.md is written to)."""
    parts = [f"# {doc.title}"] + [MD_RENDER[type(b)](b, root) for b in doc.blocks]
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- HTML
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232a;background:#fff;
  max-width:1100px;margin:0 auto;padding:24px 28px 64px}
h1{font-size:26px;margin:0 0 8px}h2{font-size:21px;margin:36px 0 8px;border-bottom:1px solid #d8dee4;
  padding-bottom:4px}h3{font-size:17px;margin:24px 0 6px}
p.note{background:#f6f8fa;border-left:4px solid #8c959f;padding:6px 12px;margin:12px 0}
table{border-collapse:collapse;margin:6px 0 4px;font-size:13.5px}
th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:left;white-space:nowrap}
th{background:#f6f8fa}td.num{text-align:right}
caption{caption-side:top;text-align:left;font-style:italic;color:#57606a;padding:2px 0 6px;white-space:normal}
figure{margin:14px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-style:italic;color:#57606a;font-size:13.5px;margin-top:4px}
nav{font-size:13.5px;margin:4px 0 16px}nav a{margin-right:12px}
"""


_NUMERIC = re.compile(r"^[+-]?[0-9][0-9,.]*(?:%| ?± ?[0-9.]+%?| s| min| h| \([0-9]+\))?$")


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if _NUMERIC.match(c) else ''}>{html.escape(c)}</td>"
                                    for c in r) + "</tr>" for r in t.rows)
    return (f"<table><caption>{html.escape(t.caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def _html_figure(f: Figure) -> str:
    style = f' style="width:{f.width}px"' if f.width else ""
    return (f'<figure><img src="{_data_url(f.path)}" alt="{html.escape(f.caption, quote=True)}"{style}>'
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")


def _html_heading(h: Heading) -> str:
    anchor = f' id="{html.escape(h.anchor, quote=True)}"' if h.anchor else ""
    return f"<h{h.level}{anchor}>{html.escape(h.text)}</h{h.level}>"


HTML_RENDER: dict[type, Callable[[Block], str]] = {
    Heading: _html_heading,
    Para: lambda b: f'<p class="{b.kind}">{html.escape(b.text)}</p>' if b.kind else f"<p>{html.escape(b.text)}</p>",
    Table: _html_table,
    Figure: _html_figure,
}


def to_html(doc: Document) -> str:
    """The document as one self-contained HTML page (inline CSS, images as data URLs, no external request)."""
    nav = "".join(f'<a href="#{html.escape(b.anchor, quote=True)}">{html.escape(b.text.split(":")[0])}</a>'
                  for b in doc.blocks if isinstance(b, Heading) and b.anchor)
    body = "\n".join(HTML_RENDER[type(b)](b) for b in doc.blocks)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            '<link rel="icon" href="data:,">'
            f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head>\n<body>"
            f"<h1>{html.escape(doc.title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")
