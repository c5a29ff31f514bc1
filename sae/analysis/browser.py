"""The feature browser's two pages, `index.html` (SAE features) and `neurons.html` (the neuron baseline),
assembled from the evaluation's sections (see `sae.analysis.report` for the page itself)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sae.analysis.report import Column, render_page, sparkline_svg, write_page
from sae.analysis.sections import Section

FIGURES = ("density.png", "curves_orientations.png", "interpretability.png", "curves_tuning_features.png",
           "curves_tuning_neurons.png")


def summary_tables(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """metrics.json -> the page's summary: one flat table per section (nested values flattened a.b.c)."""
    tables: dict[str, dict[str, Any]] = {}
    for section, values in metrics.items():
        if isinstance(values, Mapping):
            flat: dict[str, Any] = {}
            _flatten(values, "", flat)
            tables[section] = flat
    return tables


def _flatten(values: Mapping[str, Any], prefix: str, into: dict[str, Any]) -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key in ("values", "criterion", "known_curve_neurons"):
            continue  # long per-unit lists or detail: in the json files, not the summary
        if key in ("mean", "n", "n_never_fire") and prefix.count(".") == 2:
            continue  # II summaries: the median is the headline (all of it is in interpretability.json)
        if isinstance(value, Mapping):
            _flatten(value, name + ".", into)
        elif not isinstance(value, (list, tuple)):
            into[name] = value


def _columns(units: Mapping[str, Any], label: str, with_images: bool) -> list[Column]:
    columns = [Column("index", label, digits=6), Column("density", "density", title="fraction of held-out positions "
                                                                                     "where the unit fires")]
    columns += [Column(key, key.replace("ii_", "II "), title="interpretability index (Klindt et al. 2023)")
                for key in sorted(units) if key.startswith("ii_")]
    if "is_curve" in units:
        columns += [Column("is_curve", "curve?", kind="text", title="passes the curve-detector criterion"),
                    Column("preferred_orientation", "orient.", digits=3, title="preferred curve orientation, degrees"),
                    Column("peak_sharpness", "peak/mean", digits=3), Column("curve_vs_line", "curve/line", digits=3),
                    Column("tuning", "tuning", kind="svg", title="response to curves at each orientation (0-360)")]
    if with_images:
        columns += [Column("viz", "visualization", kind="image"), Column("examples", "dataset examples", kind="image")]
    return columns


def unit_rows(units: Mapping[str, Any], n_units: int, images: Mapping[int, Mapping[str, str]]) -> list[dict]:
    """One dict per unit from per-unit arrays (each of length n_units) and the browsed units' image paths."""
    rows = []
    for u in range(n_units):
        row: dict[str, Any] = {"index": u}
        for key, values in units.items():
            if key == "tuning":
                continue
            value = np.asarray(values)[u]
            row[key] = ("yes" if value else "no") if key == "is_curve" else float(value)
        if "tuning" in units:
            curve = np.asarray(units["tuning"])[u]
            n = curve.shape[0]
            marker = row.get("preferred_orientation", float("nan")) * n / 360.0
            row["tuning"] = sparkline_svg(curve, marker=marker if row.get("is_curve") == "yes" else None)
        row.update(images.get(u, {}))
        rows.append(row)
    return rows


def merge_units(sections: Mapping[str, Section], kind: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for section in sections.values():
        merged.update(section.units.get(kind, {}))
    return merged


def write_pages(out: Path, title: str, metrics: Mapping[str, Any], sections: Mapping[str, Section],
                browsed: Mapping[str, Mapping[int, Mapping[str, str]]], warnings: list[str]) -> list[str]:
    """Write index.html (features) and neurons.html (neurons); returns their names."""
    figures = [name for name in FIGURES if (out / name).is_file()]
    summary = summary_tables(metrics)
    links = [("features", "index.html"), ("neurons", "neurons.html"), ("metrics.json", "metrics.json")]
    if (out / "curves.csv").is_file():
        links.append(("curves.csv", "curves.csv"))
    pages = []
    for kind, page, label in (("features", "index.html", "feature"), ("neurons", "neurons.html", "neuron")):
        units = merge_units(sections, kind)
        n_units = len(next(iter(units.values()))) if units else 0
        html = render_page(
            f"{title}: {kind}", _columns(units, label, with_images=True), unit_rows(units, n_units, browsed.get(kind, {})),
            summary=summary, figures=figures, links=links, warnings=warnings, sort="density:desc",
        )
        write_page(out / page, html)
        pages.append(page)
    return pages
