"""One static page per unit (SAE feature or neuron): `eval/features/f12.html`, `eval/neurons/n379.html`.

A page shows, as far as the evaluation computed them: the feature visualization, the top dataset examples as
receptive-field crops with the activation drawn over them (and without), examples from lower activation
quantiles, the activation histogram, the tuning curve to synthetic curves, the interpretability index and its
controls, the nearest features by decoder cosine, and the neurons a feature loads on. It links to its
neighbours' pages and back to the index, and needs nothing but the files next to it.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from sae.analysis.report import format_number

KIND = {"features": ("feature", "f"), "neurons": ("neuron", "n")}
II_TITLE = ("Interpretability index (Klindt et al. 2023): minus the mean pairwise distance of the unit's top "
            "images. lpips is the paper's; pixel and mean_colour are its controls (a high II under them too means "
            "the images share colour, not meaning).")


def page_name(kind: str, unit: int) -> str:
    """The page's file name inside its kind's folder, e.g. f12.html."""
    return f"{KIND[kind][1]}{unit}.html"


def _link(kind: str, unit: int, here: str, text: str | None = None) -> str:
    folder = "features" if kind == "features" else "neurons"
    href = page_name(kind, unit) if folder == here else f"../{folder}/{page_name(kind, unit)}"
    return f'<a href="{href}">{html.escape(text or f"{KIND[kind][0]} {unit}")}</a>'


def _stats(record: Mapping[str, Any]) -> str:
    rows = [("density", record.get("density"), "fraction of held-out positions where the unit fires")]
    rows += [(k.replace("ii_", "II "), v, II_TITLE) for k, v in record.items() if k.startswith("ii_")]
    for key, label in (("is_curve", "curve detector"), ("preferred_orientation", "preferred orientation (deg)"),
                       ("peak_sharpness", "peak / mean"), ("curve_vs_line", "curve / line response")):
        if key in record:
            rows.append((label, record[key], ""))
    cells = "".join(f'<tr title="{html.escape(t)}"><td class="key">{html.escape(k)}</td>'
                    f"<td>{html.escape(format_number(v))}</td></tr>" for k, v, t in rows)
    return f'<table class="stats">{cells}</table>'


def _neighbour_list(title: str, kind: str, units: Sequence[int], values: Sequence[float], here: str,
                    value_label: str) -> str:
    if not len(units):
        return ""
    items = "".join(f"<li>{_link(kind, int(u), here)} <span class=\"num\">{value_label} {float(v):+.3f}</span></li>"
                    for u, v in zip(units, values))
    return f"<div class=\"neighbours\"><h3>{html.escape(title)}</h3><ol>{items}</ol></div>"


def _figure(title: str, body: str, note: str = "") -> str:
    if not body:
        return ""
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{body}{note_html}</section>"


def _image(src: str | None, alt: str, cls: str = "") -> str:
    if not src:
        return ""
    return f'<a href="{html.escape(src)}"><img class="{cls}" src="{html.escape(src)}" alt="{html.escape(alt)}"></a>'


def render_unit_page(kind: str, record: Mapping[str, Any], title: str, neighbours: Mapping[str, Any],
                     prev_next: tuple[int | None, int | None], svgs: Mapping[str, str], warnings: Sequence[str] = ()) -> str:
    """The HTML of one unit's page. record: the unit's index row (id, density, II, curve columns, image paths
    relative to the page's folder); neighbours: {"nearest": [(unit, cosine)], "loads": [(neuron, weight)],
    "nearest_kind": "features"}; svgs: {"histogram": svg, "tuning": svg}."""
    name, _ = KIND[kind]
    unit = int(record["id"])
    here = "features" if kind == "features" else "neurons"
    index = "index.html" if kind == "features" else "neurons.html"
    prev_link = _link(kind, prev_next[0], here, "← previous") if prev_next[0] is not None else ""
    next_link = _link(kind, prev_next[1], here, "next →") if prev_next[1] is not None else ""
    notes = "".join(f'<div class="warning">{html.escape(w)}</div>' for w in warnings)
    nearest = neighbours.get("nearest", [])
    loads = neighbours.get("loads", [])
    near_title = ("nearest features (decoder cosine)" if kind == "features"
                  else "features whose decoder points along this neuron (cosine)")
    side = (_stats(record)
            + _neighbour_list(near_title, "features", [u for u, _ in nearest], [v for _, v in nearest], here, "cos")
            + _neighbour_list("neurons it loads on (decoder weight, unit norm)", "neurons", [u for u, _ in loads],
                              [v for _, v in loads], here, "w"))
    viz = _figure("feature visualization", _image(record.get("viz"), f"{name} {unit} visualization", "viz"),
                  "" if record.get("viz") else "")
    if not record.get("viz"):
        viz = _figure("feature visualization", '<p class="note">not rendered for this unit (the evaluation renders a '
                      "selection spread over the density range; eval.browser.features=[...] picks others)</p>")
    top = _figure("top dataset examples", _image(record.get("top"), "top examples, activation overlaid", "strip")
                  + _image(record.get("crops"), "top examples", "strip"),
                  "Receptive-field crops around each image's strongest position, the activation under each; first "
                  "with the unit's activation at every position drawn over the pixels it covers, then plain.")
    quantiles = _figure("examples across the activation range", _image(record.get("quantiles"), "quantiles", "strip"),
                        "Rows: the images where the unit fires, ranked by its maximum in each, from the strongest "
                        "quarter to the weakest; four images evenly spaced in rank from each quarter.")
    plots = _figure("activation histogram", svgs.get("histogram", ""),
                    "Positive activations over every held-out position (log count).")
    plots += _figure("tuning curve to synthetic curves", svgs.get("tuning", ""),
                     "Response at each curve orientation; the red line marks the preferred one of a curve detector.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(f"{name} {unit} · {title}")}</title>
<style>{_asset("unit.css")}</style></head>
<body>
<nav><a href="../{index}">← all {here}</a> {prev_link} {next_link}
<form onsubmit="location.href='{KIND[kind][1]}'+this.q.value+'.html'; return false"><input name="q"
 placeholder="go to {name} #" size="10"></form></nav>
<h1>{html.escape(name)} {unit} <small>{html.escape(title)}</small></h1>
{notes}
<div class="layout"><aside>{viz}{side}</aside><main>{top}{quantiles}<div class="plots">{plots}</div></main></div>
</body></html>
"""


def _asset(name: str) -> str:
    return (resources.files("sae.analysis") / "report_assets" / name).read_text()
