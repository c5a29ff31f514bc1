"""The two seed papers' questions, asked of every unit of a trained SAE and of the layer's neurons:

* curve detectors (Cammarata et al. 2020, as used by Gorton 2024): radial tuning to synthetic curves, the
  criterion of `sae.analysis.curves`, preferred orientations around the circle and the largest gap left;
* the interpretability index (Klindt et al. 2023) of SAE features, neurons, cosine k-means directions and
  random directions, under each configured perceptual distance.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.analysis import curves, examples
from sae.analysis.interpretability import (
    build_distance, interpretability_index, interpretability_index_from_distances, pairwise_distances,
)
from sae.analysis.sections import HeldOut, Section, finite_list, save_figure, scan, to_rows, write_json
from sae.model import WeightsUnavailableError
from sae.nn import SparseAutoencoder
from sae.nn.io import atomic_write_bytes

log = logging.getLogger("sae.evaluate")

CURVE_COLUMNS = ("is_curve", "preferred_orientation", "half_width", "peak_sharpness", "curve_vs_line",
                 "curve_vs_angle", "peak")


# -- 3. curve detectors ---------------------------------------------------------------------------------
def curve_section(extractor, sae: SparseAutoencoder, out: Path, cfg: Any) -> Section:
    """Tuning of every neuron and SAE feature to curves, lines and angles centred on the centre unit's field."""
    from sae.analysis import curve_plots

    layer = extractor.layer
    stimuli = curves.curve_stimuli(curves.stimulus_size(layer), orientations=int(cfg.orientations))
    neuron_responses = curves.unit_responses(extractor, None, stimuli, batch_size=int(cfg.batch_size))
    responses = {"neurons": neuron_responses, "features": curves.sae_responses(sae, neuron_responses)}
    tunings = {kind: curves.radial_tuning(r, stimuli) for kind, r in responses.items()}
    reports = {kind: curves.curve_detectors(t, **dict(cfg.criterion or {})) for kind, t in tunings.items()}
    curve_orientation = {kind: r.preferred_orientation[r.is_curve].numpy() for kind, r in reports.items()}
    known = curves.KNOWN_CURVE_NEURONS.get(layer, [])
    metrics = {
        "n_stimuli": len(stimuli), "orientations": int(cfg.orientations),
        "criterion": reports["features"].criterion,
        "n_units": {kind: int(r.is_curve.numel()) for kind, r in reports.items()},
        "n_curve_features": reports["features"].n_curve, "n_curve_neurons": reports["neurons"].n_curve,
        "gap_neurons_deg": curves.orientation_gap(curve_orientation["neurons"]),
        "gap_neurons_and_features_deg": curves.orientation_gap(
            np.concatenate([curve_orientation["neurons"], curve_orientation["features"]])),
        "gap_features_deg": curves.orientation_gap(curve_orientation["features"]),
    }
    if known:
        metrics["known_curve_neurons"] = {
            str(n): {"is_curve": bool(reports["neurons"].is_curve[n]),
                     "preferred_orientation": float(reports["neurons"].preferred_orientation[n])} for n in known}
        metrics["gap_known_neurons_deg"] = curves.orientation_gap(reports["neurons"].preferred_orientation[known].numpy())
    section = Section(metrics)
    known_orientations = {n: float(reports["neurons"].preferred_orientation[n]) for n in known}
    wheel = curve_plots.orientation_wheel(curve_orientation["neurons"], curve_orientation["features"],
                                          known=known_orientations or None)
    section.files.append(save_figure(wheel, out / "curves_orientations.png"))
    for kind, tuning in tunings.items():
        units = _strongest_curves(reports[kind], int(cfg.n_plot), known if kind == "neurons" else [])
        if units:
            labels = [f"{kind[:-1]} {u}" for u in units]
            figure = curve_plots.tuning_figure(tuning, units, labels)
            section.files.append(save_figure(figure, out / f"curves_tuning_{kind}.png"))
    section.files.append(_write_curve_table(reports, out / "curves.csv"))
    for kind, report in reports.items():
        section.units[kind] = {"tuning": tunings[kind].curve.numpy(),
                               **{c: getattr(report, c).numpy() for c in CURVE_COLUMNS}}
    return section


def _strongest_curves(report, n: int, first: list[int]) -> list[int]:
    """Up to n units to plot: `first` (e.g. the known curve neurons), then curve units by peak response."""
    detected = torch.nonzero(report.is_curve).flatten()
    order = detected[report.peak[detected].argsort(descending=True)].tolist()
    return list(dict.fromkeys([*first, *order]))[:n]


def _write_curve_table(reports: dict, path: Path) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["kind", "unit", *CURVE_COLUMNS])
    for kind, report in reports.items():
        columns = [getattr(report, c).tolist() for c in CURVE_COLUMNS]
        for unit, values in enumerate(zip(*columns)):
            writer.writerow([kind[:-1], unit, *[int(v) if isinstance(v, bool) else f"{v:.6g}" for v in values]])
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path.name


# -- 4. interpretability index --------------------------------------------------------------------------
def _direction_scans(held: HeldOut, cfg: Any) -> dict[str, examples.ActivationScan]:
    """Klindt et al.'s baselines: cosine k-means centroids of the normalised activations, and random
    directions; a direction's activation is the cosine of each position's activation with it."""
    from sae.analysis.directions import cosine_kmeans, direction_activations, random_directions

    d_in = held.acts.shape[1]
    k = int(cfg.kmeans_k or d_in)
    sample = to_rows(held.acts)
    if cfg.kmeans_sample and sample.shape[0] > int(cfg.kmeans_sample):
        rows = torch.randperm(sample.shape[0], generator=torch.Generator().manual_seed(int(cfg.seed)))
        sample = sample[rows[: int(cfg.kmeans_sample)]]
    normalise = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    centroids = cosine_kmeans(normalise(sample), k, iters=int(cfg.kmeans_iters), seed=int(cfg.seed))
    random = random_directions(int(cfg.random_k or d_in), d_in, seed=int(cfg.seed))
    return {name: scan(held, lambda x, dirs=dirs: direction_activations(normalise(x), dirs))
            for name, dirs in (("kmeans", centroids), ("random", random))}


def interpretability_section(held: HeldOut, scans: dict[str, examples.ActivationScan], out: Path, cfg: Any) -> Section:
    """II of every unit of every kind (features, neurons, kmeans, random) under every configured distance.

    Units that never fire on the held-out images (maximum <= 0 everywhere) have no top images: NaN, and
    counted apart. cfg.inputs: "images" (whole held-out images, as in the paper) or "crops" (the receptive
    field of the unit's strongest position).
    """

    scans = {**scans, **_direction_scans(held, cfg)}
    k = int(cfg.k)
    values: dict[str, dict[str, np.ndarray]] = {}
    unavailable: dict[str, str] = {}
    for name in cfg.distances:
        try:
            distance = build_distance(name, **({"device": cfg.device} if name == "lpips" and cfg.device else {}))
        except WeightsUnavailableError as e:  # LPIPS offline: say so loudly, keep the other distances
            log.error("II with %s is NOT computed: %s", name, e)
            unavailable[name] = str(e)
            continue
        # Whole images: every unit family draws its top k from the same N held-out images, so the (N, N)
        # distance matrix is computed once per distance and indexed per unit.
        matrix = pairwise_distances(held.images, distance) if cfg.inputs == "images" else None
        values[name] = {kind: _unit_ii(distance, matrix, held, unit_scan, k, cfg, kind in ("features", "neurons"))
                        for kind, unit_scan in scans.items()}
    section = Section({name: _summary(per_kind) for name, per_kind in values.items()})
    section.metrics.update({name: {"available": False, "reason": reason} for name, reason in unavailable.items()})
    section.metrics["inputs"], section.metrics["k"] = str(cfg.inputs), k
    if not values:
        return section
    write_json(out / "interpretability.json", {
        "inputs": str(cfg.inputs), "k": k, "unavailable": unavailable, "summary": {n: _summary(p) for n, p in values.items()},
        "values": {n: {kind: finite_list(v) for kind, v in p.items()} for n, p in values.items()},
    })
    section.files += ["interpretability.json", save_figure(ii_figure(values), out / "interpretability.png")]
    for kind in ("features", "neurons"):
        section.units[kind] = {f"ii_{name}": per_kind[kind] for name, per_kind in values.items()}
    return section


def _unit_ii(distance, matrix, held: HeldOut, unit_scan: examples.ActivationScan, k: int, cfg: Any,
             must_fire: bool) -> np.ndarray:
    """II of every unit of one scan; must_fire: units that fire (> 0) on fewer than k images get NaN (they have
    no k top images; a direction's projection ranks images whatever its sign)."""
    top = unit_scan.top(k=k)
    alive = top.values[:, -1] > 0 if must_fire else torch.ones(len(top.units), dtype=torch.bool)
    result = np.full(len(top.units), np.nan)
    if not bool(alive.any()):
        return result
    if cfg.inputs == "images":
        ii = interpretability_index_from_distances(matrix, top.image_index[alive])
    elif cfg.inputs == "crops":
        chunks = []
        for index in torch.nonzero(alive).flatten().split(256):
            sub = examples.TopExamples([top.units[i] for i in index], top.values[index], top.image_index[index],
                                       top.row[index], top.col[index])
            chunks.append(interpretability_index(examples.crops(held.images, held.layer, sub, int(cfg.crop_size)),
                                                 distance))
        ii = torch.cat(chunks)
    else:
        raise ValueError(f"eval.interpretability.inputs={cfg.inputs!r}: use 'images' or 'crops'.")
    result[alive.numpy()] = ii.numpy()
    return result


def _summary(per_kind: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {kind: {"median": float(np.nanmedian(v)) if np.isfinite(v).any() else None,
                   "mean": float(np.nanmean(v)) if np.isfinite(v).any() else None,
                   "n": int(np.isfinite(v).sum()), "n_never_fire": int((~np.isfinite(v)).sum())}
            for kind, v in per_kind.items()}


def ii_figure(values: dict[str, dict[str, np.ndarray]]):
    """One violin plot per distance: II of each unit kind, medians marked and written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(values), 3.6))
    FigureCanvasAgg(figure)
    for axis, (name, per_kind) in zip(figure.subplots(1, len(values), squeeze=False)[0], values.items()):
        kinds = [kind for kind, v in per_kind.items() if np.isfinite(v).any()]
        data = [v[np.isfinite(v)] for kind, v in per_kind.items() if kind in kinds]
        if data:
            axis.violinplot(data, showmedians=True)
            for x, v in enumerate(data, start=1):
                axis.annotate(f"{np.median(v):.3g}", (x, np.median(v)), textcoords="offset points", xytext=(8, 0),
                              fontsize=8, va="center")
        axis.set_xticks(range(1, len(kinds) + 1), [f"{kind}\n(n={len(v)})" for kind, v in zip(kinds, data)],
                        fontsize=8)
        axis.set_title(f"II, distance: {name}", fontsize=10)
        axis.set_ylabel("II = -mean pairwise distance (higher: more alike)", fontsize=8)
    figure.tight_layout()
    return figure
