"""The two seed papers' questions, asked of every unit of a trained SAE and of the layer's neurons:

* curve detectors (Cammarata et al. 2020, as used by Gorton 2024): radial tuning to synthetic curves, the
  criterion of `sae.analysis.curves`, preferred orientations around the circle and the largest gap left;
* the interpretability index (Klindt et al. 2023) of SAE features, neurons, cosine k-means directions and
  random directions, under each configured perceptual distance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.analysis import examples
from sae.analysis.interpretability import (
    build_distance, interpretability_index, interpretability_index_from_distances, pairwise_distances,
)
from sae.analysis.sections import HeldOut, Section, finite_list, save_figure, scan, to_rows, write_json
from sae.model import WeightsUnavailableError
from sae.nn import SparseAutoencoder

log = logging.getLogger("sae.evaluate")


# -- 3. curve detectors ---------------------------------------------------------------------------------
def curve_section(extractor, sae: SparseAutoencoder, out: Path, cfg: Any, held: HeldOut,
                  scans: dict[str, examples.ActivationScan] | None = None, weights: str = "unknown",
                  run_dir: Path | None = None) -> Section:
    """Curve detectors among the neurons and SAE features, each count beside its null (`sae.analysis.curve_study`)."""
    from sae.analysis.curve_study import curve_section as section

    return section(extractor, sae, out, cfg, held, scans, weights, run_dir)


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
