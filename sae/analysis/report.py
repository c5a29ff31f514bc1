"""The feature browser: static HTML pages that open from disk (no server, no network).

One page is one sortable, filterable table with one row per unit (SAE feature or neuron) and the summary
metrics above it. CSS and JavaScript are inlined from `report_assets/`; images are relative paths next to the
page, so the whole `eval/` folder can be copied or zipped as is. Sorting and filtering state lives in the URL
hash (`index.html#sort=density:desc&filter.is_curve=true`), which makes a view linkable and testable.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sae.nn.io import atomic_write_bytes

ASSETS = "report_assets"


@dataclass(frozen=True)
class Column:
    """One table column. kind: "number" (sorted numerically; filter like >0.1 or 0.1..0.5), "text", "link" (an href),
    "svg" (inline markup, e.g. a sparkline; not sortable by content) or "image" (a relative path)."""

    key: str
    label: str
    kind: str = "number"
    digits: int = 4
    title: str = ""


def _asset(name: str) -> str:
    return (resources.files("sae.analysis") / ASSETS / name).read_text()


def format_number(value: Any, digits: int = 4) -> str:
    """Short human form of a number: ints as is, floats with `digits` significant digits, NaN/None as '–'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def sparkline_svg(values: Sequence[float], width: int = 96, height: int = 24, marker: float | None = None) -> str:
    """An inline SVG polyline of `values` (e.g. a 64-orientation tuning curve), min-max scaled.

    marker: an index (float allowed) to mark with a vertical line, e.g. the preferred orientation.
    """
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) for v in values):
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = width / max(1, len(values) - 1)
    points = " ".join(f"{i * step:.0f},{height - 1 - (v - low) / span * (height - 2):.0f}" for i, v in enumerate(values))
    mark = ""
    if marker is not None and math.isfinite(marker):
        x = marker * step
        mark = f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="#d33" stroke-width="1"/>'
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">{mark}'
            f'<polyline fill="none" stroke="#246" stroke-width="1.2" points="{points}"/></svg>')


def _cell(column: Column, value: Any) -> str:
    if column.kind == "svg":
        return f'<td class="svg">{value or ""}</td>'
    if column.kind == "image":
        if not value:
            return '<td class="image" data-value=""></td>'
        paths = value if isinstance(value, (list, tuple)) else [value]
        images = "".join(f'<a href="{html.escape(p)}"><img loading="lazy" src="{html.escape(p)}" alt=""></a>'
                         for p in paths)
        return f'<td class="image" data-value="{html.escape(paths[0])}">{images}</td>'
    if column.kind == "link":
        return f'<td><a href="{html.escape(str(value))}">open</a></td>' if value else "<td></td>"
    if column.kind == "number":
        number = float("nan") if value is None else float(value)
        return f'<td data-value="{number!r}">{html.escape(format_number(value, column.digits))}</td>'
    return f"<td>{html.escape(format_number(value))}</td>"


def _header(columns: Sequence[Column]) -> str:
    names = "".join(
        f'<th data-key="{c.key}" data-type="{"number" if c.kind == "number" else "text"}" '
        f'title="{html.escape(c.title or c.label)}">{html.escape(c.label)}</th>'
        for c in columns
    )
    filters = "".join(
        f'<th><input data-key="{c.key}" placeholder="{">0, a..b" if c.kind == "number" else "text"}"></th>'
        if c.kind in ("number", "text") else "<th></th>"
        for c in columns
    )
    return f'<thead><tr class="names">{names}</tr><tr class="filters">{filters}</tr></thead>'


def _summary(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Sections of key -> value pairs, side by side."""
    blocks = []
    for section, values in summary.items():
        rows = "".join(f'<tr><td class="key">{html.escape(str(k))}</td><td>{html.escape(format_number(v))}</td></tr>'
                       for k, v in values.items())
        blocks.append(f"<div><h2>{html.escape(section)}</h2><table>{rows}</table></div>")
    return f'<div class="summary">{"".join(blocks)}</div>'


def render_page(
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Mapping[str, Any]] | None = None,
    figures: Sequence[str] = (),
    links: Sequence[tuple[str, str]] = (),
    warnings: Sequence[str] = (),
    sort: str | None = None,
) -> str:
    """The HTML of one browser page. rows: dicts keyed by column key; figures: relative image paths shown
    under the summary; links: (label, href) for the navigation bar; sort: the default `key:dir`."""
    nav = " ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in links)
    notes = "".join(f'<div class="warning">{html.escape(w)}</div>' for w in warnings)
    figure_html = "".join(f'<a href="{html.escape(p)}"><img src="{html.escape(p)}" alt="{html.escape(p)}"></a>'
                          for p in figures)
    body_rows = "\n".join("<tr>" + "".join(_cell(c, row.get(c.key)) for c in columns) + "</tr>" for row in rows)
    default_sort = (f'<script>if (!location.hash) history.replaceState(null, "", "#sort={sort}");</script>'
                    if sort else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_asset("browser.css")}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<nav>{nav}</nav>
{notes}
{_summary(summary or {})}
<div class="figures">{figure_html}</div>
<h2>Units <span id="count"></span></h2>
<p>Click a header to sort; type in the boxes under it to filter (numbers: <code>&gt;0.01</code>,
<code>&lt;=5</code>, <code>0.1..0.5</code>; text: a substring).</p>
<table class="units">{_header(columns)}
<tbody>
{body_rows}
</tbody></table>
{default_sort}
<script>{_asset("table.js")}</script>
<script>{_asset("browser.js")}</script>
</body></html>
"""


def write_page(path: str | os.PathLike, page: str) -> Path:
    """Write a page atomically; returns its path."""
    path = Path(path)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def relative(path: str | os.PathLike, start: str | os.PathLike) -> str:
    """`path` relative to the folder `start`, with forward slashes (for src= attributes)."""
    return Path(os.path.relpath(path, start)).as_posix()
