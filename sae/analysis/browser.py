"""The feature browser: `eval/index.html` (SAE features), `eval/neurons.html` (neurons), and one page per unit.

Every alive feature and every neuron gets a page with what is cheap for all (the activation histogram, top
examples with the activation overlaid, examples across the activation range, decoder neighbours, and the
tuning curve and II when those sections ran); feature visualizations, the expensive part, are rendered for a
selection spread over the density range. The index draws its rows from `features.js` / `neurons.js` a page at a
time (index.js), so it opens at once with thousands of units, from disk, with no server.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.analysis import examples, units as unit_data
from sae.analysis.report import _asset, format_number, write_page
from sae.analysis.sections import Section, _write_png
from sae.analysis.unit_pages import page_name, render_unit_page
from sae.console import Progress
from sae.nn.io import atomic_write_bytes

log = logging.getLogger("sae.evaluate")

CURVE_KEYS = ("is_curve", "preferred_orientation", "peak_sharpness", "curve_vs_line")
CHUNK = 128  # units whose crops are built at once: (128, k, 3, S, S) floats


@dataclass
class Browsed:
    """What `browse` made for one unit kind: per unit, its image paths (relative to the kind's folder) and its
    neighbours and histogram; `visualized`: the units with a feature visualization."""

    units: list[int]
    files: dict[int, dict[str, str]] = field(default_factory=dict)
    extras: dict[int, dict[str, Any]] = field(default_factory=dict)
    visualized: list[int] = field(default_factory=list)


def pick_visualized(frequency: torch.Tensor, cfg: Any) -> list[int]:
    """The features that get a visualization: cfg.features = spread (over log density), frequent, random or a list."""
    how = cfg.features if isinstance(cfg.features, str) else list(cfg.features)
    if how == "spread":
        return unit_data.select_spread(frequency, int(cfg.n_features))
    return examples.select_features(frequency, how, int(cfg.n_features), seed=int(cfg.seed))


def browse(extractor, sae, held, scans: Mapping[str, examples.ActivationScan], out: Path, cfg: Any
           ) -> tuple[Section, dict[str, Browsed]]:
    """Feature visualizations of a selection, and every alive feature's and every neuron's images and data."""
    from sae.analysis.featureviz import feature_directions, neuron_directions
    from sae.analysis.sections import render

    frequency = scans["features"].frequency
    features = pick_visualized(frequency, cfg)
    neurons = examples.select_neurons(sae.d_in, cfg.neurons if isinstance(cfg.neurons, int) else list(cfg.neurons),
                                      seed=int(cfg.seed))
    if cfg.get("known_curve_neurons", False):
        from sae.analysis.curves import KNOWN_CURVE_NEURONS

        neurons = list(dict.fromkeys([*KNOWN_CURVE_NEURONS.get(held.layer, []), *neurons]))
    directions = torch.cat([feature_directions(sae, features), neuron_directions(sae.d_in, neurons)])
    log.info("browser: rendering %d feature visualizations (%s steps)", len(directions), cfg.viz_steps or "default")
    viz = render(extractor, directions, cfg)
    alive = torch.nonzero(frequency > 0).flatten().tolist()
    device = sae.W_dec.device
    browsed = {
        "features": _unit_images(held, lambda x: sae.encode(x.to(device)), scans["features"], alive,
                                 out / "features", "f", cfg, "features"),
        "neurons": _unit_images(held, None, scans["neurons"], list(range(sae.d_in)), out / "neurons", "n", cfg,
                                "neurons"),
    }
    for kind, chosen, images in (("features", features, None if viz is None else viz[: len(features)]),
                                 ("neurons", neurons, None if viz is None else viz[len(features):])):
        prefix = "f" if kind == "features" else "n"
        for unit, image in zip(chosen, images if images is not None else []):
            browsed[kind].files.setdefault(unit, {})["viz"] = _write_png(
                _to_pil(image), out / kind / f"{prefix}{unit}_viz.png")
            browsed[kind].visualized.append(unit)
    _neighbours(sae, browsed)
    metrics = {"features": features, "neurons": neurons, "visualized": viz is not None,
               "pages": {kind: len(b.units) for kind, b in browsed.items()}}
    return Section(metrics), browsed


def _to_pil(tile: torch.Tensor):
    from PIL import Image

    return Image.fromarray((tile.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _unit_images(held, encode, scan, units: list[int], folder: Path, prefix: str, cfg: Any, kind: str) -> Browsed:
    """Top examples (overlaid and plain) and quantile examples of every unit, as PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    result = Browsed(units)
    if not units:
        return result
    k = int(cfg.examples)
    started = time.perf_counter()
    details = unit_data.unit_details(held, encode, scan, units, k=k)
    log.info("browser: %s scanned for histograms and overlays in %.1f s", kind, time.perf_counter() - started)
    progress = Progress(f"browser: {kind} pages' images", len(units), logger=log)
    size, small = int(cfg.crop_size), int(cfg.get("quantile_crop_size", 64))
    for start in range(0, len(units), CHUNK):
        rows = slice(start, start + CHUNK)
        top = _sub(details.top, rows)
        tiles = examples.crops(held.images, held.layer, top, size=size)
        over = _bytes(unit_data.overlay(tiles, details.maps[rows], held.layer, details.radius, top.values[:, 0]))
        tiles = _bytes(tiles)
        captions = examples.tile_captions(top)
        quant = _sub(details.quantiles, rows)
        qtiles = _bytes(examples.crops(held.images, held.layer, quant, size=small))
        per = qtiles.shape[1] // len(details.quantile_labels)
        qcaptions = examples.tile_captions(quant)
        for i, unit in enumerate(units[rows]):
            name = f"{prefix}{unit}"
            files = {
                "top": _write_jpeg(examples.image_grid(over[i:i + 1], tile_captions=captions[i:i + 1]),
                                  folder / f"{name}_top.jpg"),
                "crops": _write_jpeg(examples.image_grid(tiles[i:i + 1]), folder / f"{name}_crops.jpg"),
                "quantiles": _write_jpeg(examples.image_grid(
                    qtiles[i].reshape(-1, per, *qtiles.shape[2:]), list(details.quantile_labels),
                    [qcaptions[i][q * per:(q + 1) * per] for q in range(len(details.quantile_labels))]),
                    folder / f"{name}_quantiles.jpg"),
            }
            result.files[unit] = files
            row = start + i
            result.extras[unit] = {"histogram": unit_data.histogram_svg(
                details.hist[row].numpy(), float(details.hist_max[row]), int(details.n_zero[row]))}
        progress.update(min(start + CHUNK, len(units)))
    return result


def _bytes(tiles: torch.Tensor) -> torch.Tensor:
    """Float tiles in [0, 1] -> uint8, once per chunk (image_grid then only copies)."""
    return (tiles.clamp(0, 1) * 255).round().to(torch.uint8)


def _write_jpeg(image, path: Path) -> str:
    """A photograph-like picture as JPEG: thousands per evaluation, so fast to encode and small on disk. Not
    fsynced like the exports: a browser picture lost in a crash is rewritten by evaluating again."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    path.write_bytes(buffer.getvalue())
    return path.name


def _sub(top: examples.TopExamples, rows: slice) -> examples.TopExamples:
    return examples.TopExamples(top.units[rows], top.values[rows], top.image_index[rows], top.row[rows], top.col[rows])


def _neighbours(sae, browsed: dict[str, Browsed], m: int = 8) -> None:
    feats = unit_data.feature_neighbours(sae.W_dec, m)
    for unit in browsed["features"].units:
        extra = browsed["features"].extras.setdefault(unit, {})
        extra["nearest"] = list(zip(feats.nearest[unit].tolist(), feats.cosine[unit].tolist()))
        extra["loads"] = list(zip(feats.loads[unit].tolist(), feats.weight[unit].tolist()))
    neurons = unit_data.neuron_neighbours(sae.W_dec, m)
    for unit in browsed["neurons"].units:
        extra = browsed["neurons"].extras.setdefault(unit, {})
        extra["nearest"] = list(zip(neurons.nearest[unit].tolist(), neurons.cosine[unit].tolist()))


# -- the pages --------------------------------------------------------------------------------------------
def merge_units(sections: Mapping[str, Section], kind: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for section in sections.values():
        merged.update(section.units.get(kind, {}))
    return merged


def _number(value: Any) -> float | None:
    value = float(value)
    return round(value, 6) if np.isfinite(value) else None


def unit_records(kind: str, arrays: Mapping[str, Any], browsed: Browsed | None, n_units: int) -> list[dict]:
    """One JSON-able row per unit for the index: numbers, curve flags, a 32-point tuning sparkline, images."""
    prefix = "features/" if kind == "features" else "neurons/"
    arrays = {key: values if key == "tuning" else np.asarray(values) for key, values in arrays.items()}
    records = []
    has_page = set(browsed.units) if browsed else set()
    for u in range(n_units):
        row: dict[str, Any] = {"id": u}
        for key, values in arrays.items():
            if key == "tuning":
                curve = np.asarray(values[u], dtype=np.float64)
                step = max(1, len(curve) // 32)
                row["tuning"] = [round(float(v), 4) for v in curve[::step]] if np.isfinite(curve).all() else None
            elif key == "is_curve":
                row[key] = "yes" if bool(values[u]) else "no"
            else:
                row[key] = _number(values[u])
        files = (browsed.files.get(u, {}) if browsed else {})
        row.update({name: prefix + path for name, path in files.items()})
        row["page"] = prefix + page_name(kind, u) if u in has_page else ""
        row["visualized"] = "yes" if "viz" in files else "no"
        records.append(row)
    return records


def index_columns(kind: str, arrays: Mapping[str, Any]) -> list[dict]:
    label = "feature" if kind == "features" else "neuron"
    columns = [{"key": "id", "label": label, "type": "link"},
               {"key": "viz", "label": "visualization", "type": "image"},
               {"key": "top", "label": "top examples (activation overlaid)", "type": "examples"},
               {"key": "density", "label": "density", "type": "number",
                "title": "fraction of held-out positions where the unit fires"}]
    columns += [{"key": k, "label": k.replace("ii_", "II "), "type": "number",
                 "title": "interpretability index (Klindt et al. 2023); pixel and mean_colour are controls"}
                for k in sorted(arrays) if k.startswith("ii_")]
    if "is_curve" in arrays:
        columns += [{"key": "is_curve", "label": "curve?", "type": "text", "title": "passes the curve-detector criterion"},
                    {"key": "preferred_orientation", "label": "orient.", "type": "number", "digits": 3},
                    {"key": "peak_sharpness", "label": "peak/mean", "type": "number", "digits": 3},
                    {"key": "curve_vs_line", "label": "curve/line", "type": "number", "digits": 3},
                    {"key": "tuning", "label": "tuning", "type": "spark", "title": "response to curves, 0-360 deg"}]
    columns.append({"key": "visualized", "label": "viz?", "type": "text", "title": "has a feature visualization"})
    return columns


def summary_tables(metrics: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """metrics.json -> one flat table per section, and the notes (reasons something is unavailable) apart."""
    tables: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for section, values in metrics.items():
        if isinstance(values, Mapping) and section not in ("run", "browser", "evaluated"):
            flat: dict[str, Any] = {}
            _flatten(values, "", flat, notes, section)
            tables[section] = flat
    return tables, notes


def _flatten(values: Mapping[str, Any], prefix: str, into: dict[str, Any], notes: list[str], section: str) -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key in ("values", "criterion", "known_curve_neurons"):
            continue  # long per-unit lists or detail: in the json files, not the summary
        if key in ("mean", "n", "n_never_fire") and prefix.count(".") == 2:
            continue
        if key == "reason":
            notes.append(f"{section} {prefix.rstrip('.')}: {value}".replace("  ", " "))
        elif key == "available" and value:
            continue
        elif isinstance(value, Mapping):
            _flatten(value, name + ".", into, notes, section)
        elif not isinstance(value, (list, tuple)):
            into[name] = value


def _provenance(metrics: Mapping[str, Any], record: Mapping[str, Any]) -> str:
    run = metrics.get("run", {})
    parts = [("run", run.get("source")), ("step", run.get("global_step")), ("InceptionV1 weights", run.get("model_weights")),
             ("images", f"{run.get('held_out_images')} held-out, {run.get('image_size')} px"),
             ("from", record.get("images", {}).get("source")), ("evaluated", record.get("time"))]
    return " · ".join(f"{k} <b>{html.escape(str(v))}</b>" for k, v in parts if v is not None)


def render_index(kind: str, title: str, metrics: Mapping[str, Any], figures: list[str], warnings: list[str],
                 data_file: str, record: Mapping[str, Any]) -> str:
    tables, notes = summary_tables(metrics)
    other = ("neurons", "neurons.html") if kind == "features" else ("features", "index.html")
    links = [other, ("metrics.json", "metrics.json"), ("evaluation.json", "evaluation.json")]
    nav = " ".join(f'<a href="{h}">{html.escape(t)}</a>' for t, h in links)
    warn = "".join(f'<div class="warning">{html.escape(w)}</div>' for w in warnings)
    blocks = "".join(
        f"<div><h2>{html.escape(s)}</h2><table>"
        + "".join(f'<tr><td class="key">{html.escape(k)}</td><td>{html.escape(format_number(v))}</td></tr>'
                  for k, v in vals.items()) + "</table></div>" for s, vals in tables.items() if vals)
    note_html = f'<ul class="notes">{"".join(f"<li>{html.escape(n)}</li>" for n in notes)}</ul>' if notes else ""
    figs = "".join(f'<figure><a href="{p}"><img src="{p}" alt="{p}"></a><figcaption>{p}</figcaption></figure>'
                   for p in figures)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}: {kind}</title>
<style>{_asset("index.css")}</style></head>
<body>
<h1>{html.escape(title)}: {kind}</h1>
<nav>{nav}</nav>
<div class="provenance">{_provenance(metrics, record)}</div>
{warn}
<details class="summary" open><summary>Summary metrics and plots (click a plot for full size)</summary>
<div class="tables">{blocks}</div>{note_html}<div class="figures">{figs}</div></details>
<h2>Units <span id="count"></span></h2>
<div class="controls"><input id="search" type="search" placeholder="id: 12 or 3,17,42 or 100-200">
<span>Click a header to sort; filter under it (<code>&gt;0.01</code>, <code>0.1..0.5</code>, text); click a unit for
its page.</span><span id="pager"></span></div>
<table class="units"><thead><tr class="names"></tr><tr class="filters"></tr></thead><tbody></tbody></table>
<div id="lightbox"><img alt=""></div>
<script src="{data_file}"></script>
<script>{_asset("table.js")}</script>
<script>{_asset("index.js")}</script>
</body></html>
"""


def write_pages(out: Path, title: str, metrics: Mapping[str, Any], sections: Mapping[str, Section],
                browsed: Mapping[str, Browsed], warnings: list[str]) -> list[str]:
    """Write index.html + features.js, neurons.html + neurons.js and each unit's page; returns the index names."""
    figures = [name for part in sections.values() for name in part.files  # what the sections drew, in order
               if name.endswith(".png") and (out / name).is_file()]
    record = json.loads((out / "evaluation.json").read_text()) if (out / "evaluation.json").is_file() else {}
    written = []
    for kind, page, data_file in (("features", "index.html", "features.js"), ("neurons", "neurons.html", "neurons.js")):
        arrays = merge_units(sections, kind)
        n_units = len(next(iter(arrays.values()))) if arrays else 0
        records = unit_records(kind, arrays, browsed.get(kind), n_units)
        payload = {"columns": index_columns(kind, arrays), "rows": records, "sort": "density", "dir": "desc"}
        if any(r["visualized"] == "yes" for r in records):  # first view: the visualized units, spread over density
            payload["filters"] = {"visualized": "yes"}
        atomic_write_bytes(out / data_file, ("window.UNITS = " + json.dumps(payload, separators=(",", ":"))
                                              + ";\n").encode())
        write_page(out / page, render_index(kind, title, metrics, figures, warnings, data_file, record))
        written += [page, data_file]
        if browsed.get(kind) is not None:
            _write_unit_pages(out, kind, title, records, arrays, browsed[kind], warnings)
    return written


def _write_unit_pages(out: Path, kind: str, title: str, records: list[dict], arrays: Mapping[str, Any],
                      browsed: Browsed, warnings: list[str]) -> None:
    prefix = "features/" if kind == "features" else "neurons/"
    units = sorted(browsed.units)
    progress = Progress(f"browser: {kind} pages", len(units), logger=log)
    for i, unit in enumerate(units):
        record = {k: (v[len(prefix):] if isinstance(v, str) and v.startswith(prefix) else v)
                  for k, v in records[unit].items() if k not in ("tuning", "page", "visualized")}
        extra = browsed.extras.get(unit, {})
        svgs = {"histogram": extra.get("histogram", "")}
        if "tuning" in arrays:
            marker = record.get("preferred_orientation") if record.get("is_curve") == "yes" else None
            svgs["tuning"] = unit_data.curve_svg(np.asarray(arrays["tuning"][unit]), marker)
        neighbours = {"nearest": extra.get("nearest", []), "loads": extra.get("loads", [])}
        prev_next = (units[i - 1] if i > 0 else None, units[i + 1] if i + 1 < len(units) else None)
        write_page(out / prefix / page_name(kind, unit),
                   render_unit_page(kind, record, title, neighbours, prev_next, svgs, warnings))
        progress.update(i + 1)


def wandb_feature_table(out: Path, max_rows: int = 256):
    """The features of `out/features.js` as a wandb.Table a W&B workspace can sort and filter: id, density, II,
    curve flags, and the visualization and top examples as images. Visualized features first, then others
    spread over the density range, up to `max_rows` (each row's images are uploaded). None if no browser."""
    path = out / "features.js"
    if not path.is_file():
        return None
    import wandb

    data = json.loads(path.read_text().split("=", 1)[1].rstrip().rstrip(";"))
    rows = [r for r in data["rows"] if r.get("page")]
    chosen = [r for r in rows if r.get("viz")]
    rest = sorted((r for r in rows if not r.get("viz")), key=lambda r: r.get("density") or 0.0)
    if rest and len(chosen) < max_rows:
        picks = np.linspace(0, len(rest) - 1, min(len(rest), max_rows - len(chosen))).round().astype(int)
        chosen += [rest[i] for i in sorted(set(picks.tolist()))]
    numbers = [c["key"] for c in data["columns"] if c["type"] in ("number", "text") and c["key"] != "visualized"]
    table = wandb.Table(columns=["feature", *numbers, "visualization", "examples"])
    for r in chosen:
        images = [wandb.Image(str(out / r[k])) if r.get(k) else None for k in ("viz", "top")]
        table.add_data(r["id"], *[r.get(k) for k in numbers], *images)
    return table

