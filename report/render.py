"""Write the privacy budget report's blocks as Markdown and as self-contained HTML.

The text is built once as a list of blocks (each section's ``render``, :mod:`report.sections`) and
written in both formats, so the two say the same thing. The HTML has inline CSS and the plots
embedded as base64 PNG: it opens in a browser with no other file and no network.
"""

from __future__ import annotations

import base64
import html as _html
from pathlib import Path
from typing import Mapping

from report.blocks import Block, fmt

__all__ = ["markdown", "html", "fmt", "Block"]


# ------------------------------------------------------------------------- writers


def markdown(blocks: list[Block], images: Mapping[str, Path]) -> str:
    """The blocks as Markdown text; plots are linked as sibling PNG files."""
    lines: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "alert":
            lines += [f"**{b[1]}**", ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            esc = [[c.replace("|", "\\|") for c in row] for row in b[2]]
            lines.append("| " + " | ".join(b[1]) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(row) + " |" for row in esc]
            lines.append("")
        elif kind == "img":
            lines += [f"![{b[2]}]({images[b[1]].name})", "", f"*{b[2]}*", ""]
    return "\n".join(lines)


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#555}.note{background:#fff8e1;border-left:4px solid #f0ad4e;padding:.4em .8em}
.alert{background:#fdecea;border-left:4px solid #d9534f;padding:.4em .8em;font-weight:bold}
"""


def html(blocks: list[Block], images: Mapping[str, Path], *, run_id: str, not_private: str | None = None) -> str:
    """The blocks as self-contained HTML: inline CSS, plots as base64 data URIs, no external references.

    ``run_id`` names the page; ``not_private`` (why the run has no guarantee) goes on its first line.
    """
    e = _html.escape
    reason = not_private
    title = ("NOT PRIVATE: " if reason else "") + "Privacy budget report: " + str(run_id)
    # The first line names the file and, for a run without a guarantee, says so and why (the
    # title and a meta element, both on line 1; the body then opens with the same alert).
    first = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
             + (f'<meta name="dpfl-not-private" content="NOT PRIVATE: {e(reason, quote=True)}.">' if reason else ""))
    parts = [first, f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "alert":
            parts.append(f'<p class="alert">{e(b[1])}</p>')
        elif kind == "p":
            cls = ""
            if b[1].startswith("Note:"):
                cls = ' class="note"'
            elif b[1].startswith("THIS RUN IS NOT PRIVATE"):
                cls = ' class="alert"'
            parts.append(f"<p{cls}>{e(b[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(images[b[1]]).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{e(b[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
