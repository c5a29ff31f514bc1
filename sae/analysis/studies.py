"""The two seed papers' questions, asked of every unit of a trained SAE and of the layer's neurons:

* curve detectors (Cammarata et al. 2020, as used by Gorton 2024): radial tuning to synthetic curves, the
  criterion of `sae.analysis.curves`, preferred orientations around the circle and the largest gap left;
* the interpretability index (Klindt et al. 2023) of SAE features, neurons and the directions of cosine k-means,
  PCA, ICA, NMF and random directions (fitted on other images), under each configured perceptual distance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae.analysis import examples
from sae.analysis.interpretability import (
    build_distance, interpretability_index, interpretability_index_from_distances,
)
from sae.analysis.sections import HeldOut, Section, scan, to_rows
from sae.checks import BadConfigError
from sae.model import WeightsUnavailableError
from sae.nn import SparseAutoencoder

log = logging.getLogger("sae.evaluate")


# -- 3. curve detectors ---------------------------------------------------------------------------------
# -- 4. interpretability index --------------------------------------------------------------------------
def interpretability_section(held: HeldOut, scans: dict[str, examples.ActivationScan], out: Path, cfg: Any,
                             sae: SparseAutoencoder | None = None) -> Section:
    """II (Klindt et al. 2023) of every SAE feature, neuron and direction of each family in cfg.families, under
    every configured distance, on held-out images the directions were not fitted on.

    cfg.fit_fraction of the images (seeded) is the training split: the families (`sae.analysis.directions`) are
    fitted on all positions of those images; the other images are scored. cfg.position: "centre" (default:
    each unit's activation at the grid's centre position ranks the images; needs `sae`) or "max" (its maximum
    over positions). cfg.inputs: "crops" (the receptive field of that position) or "images" (whole images).
    Units that never fire (k-th best <= 0) get NaN and are counted apart.
    """
    from sae.analysis import ii_protocol

    position, inputs = str(cfg.get("position", "centre")), str(cfg.inputs)
    if position not in ("centre", "max") or inputs not in ("crops", "images"):
        raise BadConfigError(f"eval.interpretability: position={position!r} inputs={inputs!r}; use position centre|max "
                         "and inputs crops|images.")
    fit, score = ii_protocol.split_fit_score(held.images.shape[0], float(cfg.get("fit_fraction", 0.5)), int(cfg.seed))
    families = ii_protocol.fit_families(to_rows(held.acts[fit]), list(cfg.get("families", ["kmeans", "random"])), cfg,
                                        sample=cfg.get("fit_sample"))
    if len(score) < int(cfg.k):
        raise BadConfigError(f"eval.interpretability scores {len(score)} images (the held-out images not in the fitting "
                         f"split, fit_fraction={cfg.get('fit_fraction', 0.5)}), fewer than k={cfg.k}: evaluate on more "
                         "images (data.val_images, eval.max_images) or lower eval.interpretability.k.")
    scored = HeldOut(held.images[score], held.acts[score], held.layer)
    if position == "centre":
        if sae is None:
            raise ValueError("eval.interpretability.position=centre needs the SAE to encode the centre positions.")
        values, unavailable = _centre_ii(scored, sae, families, cfg)
    else:
        values, unavailable = _max_ii(scored, {kind: _rows(s, score) for kind, s in scans.items()}, families, cfg)
    protocol = {"position": position, "inputs": inputs, "k": int(cfg.k), "fit_fraction": float(cfg.get("fit_fraction", 0.5)),
                "fit_images": int(len(fit)), "scored_images": int(len(score)),
                "in_sample": bool(float(cfg.get("fit_fraction", 0.5)) <= 0), "families": {n: f.info for n, f in families.items()}}
    section = Section({name: ii_protocol.summary(per_kind) for name, per_kind in values.items()})
    section.metrics.update({name: {"available": False, "reason": reason} for name, reason in unavailable.items()})
    section.metrics.update(position=position, inputs=inputs, k=int(cfg.k), scored_images=int(len(score)))
    if not values:
        return section
    section.files += ii_protocol.write_results(out, values, unavailable, protocol)
    for kind in ("features", "neurons"):
        section.units[kind] = {f"ii_{name}": per_kind[kind] for name, per_kind in values.items()}
    return section


def _centre_ii(scored: HeldOut, sae: SparseAutoencoder, families: dict, cfg: Any):
    """Each unit's top k scored images by its activation at the centre position, as centre crops or whole images."""
    from sae.analysis import ii_protocol
    from sae.model import crop_box

    h, w = scored.grid
    i, j = (h - 1) // 2, (w - 1) // 2  # on an even grid, the position whose field is centred nearest the image centre
    x = scored.acts[:, :, i, j]  # (N, C)
    device = sae.W_dec.device
    with torch.inference_mode():
        features = torch.cat([sae.encode(c.to(device)).float().cpu() for c in x.split(ROWS)])
    acts = {"features": features, "neurons": x, **{name: f.encode(x) for name, f in families.items()}}
    images = scored.images
    if str(cfg.inputs) == "crops":
        top, left, bottom, right = crop_box(scored.layer, i, j, tuple(images.shape[-2:]))
        images = images[:, :, top:bottom, left:right]
    return ii_protocol.score_families(acts, {"features", "neurons"}, images, cfg)


def _max_ii(scored: HeldOut, scans: dict[str, examples.ActivationScan], families: dict, cfg: Any):
    """The previous protocol: each unit's top k images by its maximum over positions (whole images, or the
    crop of that position). Directions' scans come from the scored images."""
    from sae.analysis.interpretability import pairwise_distances

    scans = {**scans, **{name: scan(scored, f.encode) for name, f in families.items()}}
    values: dict[str, dict[str, np.ndarray]] = {}
    unavailable: dict[str, str] = {}
    for name in cfg.distances:
        try:
            distance = build_distance(name, **({"device": cfg.device} if name == "lpips" and cfg.device else {}))
        except WeightsUnavailableError as e:  # LPIPS offline: say so loudly, keep the other distances
            log.error("II with %s is NOT computed: %s", name, e)
            unavailable[name] = str(e)
            continue
        matrix = pairwise_distances(scored.images, distance) if cfg.inputs == "images" else None
        values[name] = {kind: _unit_ii(distance, matrix, scored, unit_scan, int(cfg.k), cfg, kind in ("features", "neurons"))
                        for kind, unit_scan in scans.items()}
    return values, unavailable


ROWS = 8192  # centre vectors encoded at once


def _rows(unit_scan: examples.ActivationScan, images: Tensor) -> examples.ActivationScan:
    """The scan restricted to some images (its rows), e.g. the scored split."""
    return examples.ActivationScan(unit_scan.units, unit_scan.image_max[images], unit_scan.argmax[images],
                                   unit_scan.fire_count, unit_scan.n_vectors, unit_scan.grid)


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
    else:
        chunks = []
        for index in torch.nonzero(alive).flatten().split(256):
            sub = examples.TopExamples([top.units[i] for i in index], top.values[index], top.image_index[index],
                                       top.row[index], top.col[index])
            chunks.append(interpretability_index(examples.crops(held.images, held.layer, sub, int(cfg.crop_size)),
                                                 distance))
        ii = torch.cat(chunks)
    result[alive.numpy()] = ii.numpy()
    return result


def ii_figure(values: dict[str, dict[str, np.ndarray]]):
    """One violin plot per distance (see `sae.analysis.ii_protocol.ii_figure`)."""
    from sae.analysis.ii_protocol import ii_figure as figure

    return figure(values)
