"""A report as a list of blocks (headings, paragraphs, tables, pictures), written either as
Markdown or as one self-contained HTML page (pictures inlined, no script, nothing fetched), so
``report.md`` and ``report.html`` always say the same thing."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str
    strong: bool = False


@dataclass(frozen=True)
class Facts:
    """``key: value`` bullet points."""
    items: Sequence[tuple[str, object]]


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[object]]


@dataclass(frozen=True)
class Picture:
    """A PNG at ``path``, relative to the report's folder."""
    alt: str
    path: str


Block = Heading | Paragraph | Facts | Table | Picture


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; cells are ``str``-ed and ``|`` in them is escaped."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


def to_markdown(blocks: Sequence[Block]) -> str:
    """The blocks as Markdown, a blank line after each."""
    parts = []
    for block in blocks:
        match block:
            case Heading(text, level):
                parts.append(f"{'#' * level} {text}")
            case Paragraph(text, strong):
                parts.append(f"**{text}**" if strong else text)
            case Facts(items):
                parts.append("\n".join(f"- **{key}**: {value}" for key, value in items))
            case Table(headers, rows):
                parts.append(markdown_table(headers, rows))
            case Picture(alt, path):
                parts.append(f"![{alt}]({path})")
    return "\n\n".join(parts) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1280px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;display:block;margin:1em 0}
.strong{font-weight:bold;color:#a33}"""


def to_html(blocks: Sequence[Block], folder: Path, title: str) -> str:
    """The blocks as one HTML page; each picture is read from ``folder`` and inlined as a data URI."""
    def text(value: object) -> str:
        return html.escape(str(value))

    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{text(title)}</title>",
             f"<style>{STYLE}</style></head><body>"]
    for block in blocks:
        match block:
            case Heading(value, level):
                parts.append(f"<h{level}>{text(value)}</h{level}>")
            case Paragraph(value, strong):
                parts.append(f"<p class=\"strong\">{text(value)}</p>" if strong else f"<p>{text(value)}</p>")
            case Facts(items):
                parts.append("<ul>" + "".join(f"<li><b>{text(k)}</b>: {text(v)}</li>" for k, v in items) + "</ul>")
            case Table(headers, rows):
                head = "".join(f"<th>{text(h)}</th>" for h in headers)
                body = "".join("<tr>" + "".join(f"<td>{text(c)}</td>" for c in row) + "</tr>" for row in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            case Picture(alt, path):
                data = base64.b64encode((Path(folder) / path).read_bytes()).decode("ascii")
                parts.append(f"<img alt=\"{text(alt)}\" src=\"data:image/png;base64,{data}\">")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
