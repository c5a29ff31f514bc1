"""The interpretability-index comparison of Klindt et al. 2023, shared by InceptionV1 layers and recorded responses.

Every unit family sees the same N scored stimuli: a family's activations are an (N, U) matrix (one value per
stimulus: the unit's response at its own position, or a recorded response), so each unit's top k stimuli are
indices into one image bank and one (N, N) distance matrix per distance serves every family.

    fit, score = split_fit_score(n, fit_fraction=0.5, seed=0)        # directions never see the scored stimuli
    families = fit_families(x[fit], ["kmeans", "pca", "ica", "nmf", "random"], cfg)
    acts = {"neurons": x[score], **{name: f.encode(x[score]) for name, f in families.items()}}
    values, unavailable = score_families(acts, {"neurons"}, stimuli[score], cfg)

Each family is reported beside its null, the random directions: a family whose median II is not above the
random directions' median is flagged (``above_random: false``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae.checks import BadConfigError
from sae.analysis.directions import FAMILIES, Directions, fit_family
from sae.analysis.interpretability import build_distance, pairwise_distances, unit_interpretability
from sae.model import WeightsUnavailableError

log = logging.getLogger("sae.evaluate")
NULL = "random"


def split_fit_score(n: int, fit_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded split of n stimuli into (fit, score) index tensors; fit_fraction 0 scores and fits on all
    (in-sample: the old protocol, an advantage for the fitted families)."""
    if fit_fraction <= 0:
        everything = torch.arange(n)
        return everything, everything
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_fit = int(round(n * fit_fraction))
    if not 1 <= n_fit < n:
        raise BadConfigError(f"eval.interpretability.fit_fraction={fit_fraction} leaves no stimuli to fit on or to "
                         f"score among {n}; use a value in (0, 1).")
    return perm[:n_fit].sort().values, perm[n_fit:].sort().values


def fit_families(x: Tensor, names: list[str], cfg: Any, sample: int | None = None) -> dict[str, Directions]:
    """Fit each named family on the rows x (R, d) (a seeded subsample of `sample` rows; null: all).

    cfg: kmeans_k, components (PCA/ICA/NMF) and random_k (null: d), kmeans_init, kmeans_iters, iters, seed."""
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise BadConfigError(f"eval.interpretability.families has unknown {unknown}; choose from {list(FAMILIES)}.")
    seed, d = int(cfg.get("seed", 0)), x.shape[1]
    if sample and x.shape[0] > int(sample):
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: int(sample)]]
    counts = {"kmeans": cfg.get("kmeans_k"), "random": cfg.get("random_k")}
    families = {}
    for name in names:
        k = int(counts.get(name, cfg.get("components")) or d)
        iters = int(cfg.get("kmeans_iters", 50) if name == "kmeans" else cfg.get("iters", 200))
        began = time.perf_counter()
        families[name] = fit_family(name, x, k, seed=seed, iters=iters, kmeans_init=str(cfg.get("kmeans_init", "identity")))
        families[name].info.update(fit_rows=int(x.shape[0]), fit_seconds=round(time.perf_counter() - began, 2))
        log.info("fitted %d %s directions on %d vectors in %.1f s", families[name].vectors.shape[0], name, x.shape[0],
                 families[name].info["fit_seconds"])
    return families


def score_families(acts: dict[str, Tensor], must_fire: set[str], images: Tensor, cfg: Any
                   ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """II of every unit of every family under every distance in cfg.distances.

    acts: family -> (N, U) activations over the N `images` (N, 3, S, S). Families in must_fire (neurons, SAE
    features) give NaN to units whose k-th best activation is <= 0: they have no k top stimuli. Returns
    ({distance: {family: (U,) II}}, {distance: why it is unavailable})."""
    k = int(cfg.get("k", 5))
    values: dict[str, dict[str, np.ndarray]] = {}
    unavailable: dict[str, str] = {}
    for name in cfg.distances:
        try:
            distance = build_distance(name, **({"device": cfg.device} if name == "lpips" and cfg.get("device") else {}))
        except WeightsUnavailableError as e:  # LPIPS offline: say so loudly, keep the other distances
            log.error("II with %s is NOT computed: %s", name, e)
            unavailable[name] = str(e)
            continue
        matrix = pairwise_distances(images, distance)
        values[name] = {kind: unit_interpretability(a.float().cpu(), matrix, k, 0.0 if kind in must_fire else None).numpy()
                        for kind, a in acts.items()}
    return values, unavailable


def summary(per_kind: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Median, mean, counts per family, and whether its median is above the random directions' (the null)."""
    out = {kind: {"median": float(np.nanmedian(v)) if np.isfinite(v).any() else None,
                  "mean": float(np.nanmean(v)) if np.isfinite(v).any() else None,
                  "n": int(np.isfinite(v).sum()), "n_never_fire": int((~np.isfinite(v)).sum())}
           for kind, v in per_kind.items()}
    null = out.get(NULL, {}).get("median")
    for kind, row in out.items():
        if kind != NULL and null is not None and row["median"] is not None:
            row["above_random"] = bool(row["median"] > null)
    return out


def recovery(families: dict[str, Tensor], truth: Tensor) -> dict[str, dict[str, float]]:
    """For each family's (U, d) directions: per known direction (K, d), the best |cosine| of any unit; summarised
    as its mean and the fraction above 0.9."""
    truth = truth / truth.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = {}
    for name, vectors in families.items():
        vectors = vectors.float() / vectors.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        best = (truth @ vectors.T).abs().max(dim=1).values
        out[name] = {"mean_best_cosine": float(best.mean()), "fraction_above_0.9": float((best > 0.9).float().mean())}
    return out


def write_results(out: Path, values: dict, unavailable: dict, protocol: dict, extra: dict | None = None) -> list[str]:
    """eval/interpretability.json (summaries, per-unit values, the protocol) and interpretability.png."""
    from sae.analysis.sections import finite_list, save_figure, write_json

    write_json(out / "interpretability.json", {
        **protocol, "unavailable": unavailable, "summary": {n: summary(p) for n, p in values.items()},
        "values": {n: {kind: finite_list(v) for kind, v in p.items()} for n, p in values.items()}, **(extra or {}),
    })
    return ["interpretability.json", save_figure(ii_figure(values), out / "interpretability.png")]


def ii_figure(values: dict[str, dict[str, np.ndarray]]):
    """One violin plot per distance: II of each unit kind, medians marked and written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.2, 0.75 * max((len(p) for p in values.values()), default=4)) * len(values), 3.6))
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
