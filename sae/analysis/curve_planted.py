"""Scoring curve detectors against a planted network's truth (`model.weights=planted`).

The truth (`sae.model.planted.PlantedTruth`: per planted feature its kind, orientation_deg, direction
(n, C) in the layer's channel space and pure_channel) says where the curve detectors are. A planted curve
is recovered

* by the SAE when its best-matching decoder row has cosine > ``min_cos`` (0.9) with the planted direction,
  that feature passes the criterion, and its preferred orientation is within ``max_error`` (360/64
  degrees) of the planted one;
* by the neurons when it has a pure channel and that channel passes with the right orientation.

False positives are passing units matched to no planted curve (a feature whose decoder row is within
cos 0.9 of none; a neuron that is no planted curve's pure channel).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae.analysis.curve_criterion import CurveReport, angular_distance

log = logging.getLogger("sae.evaluate")

TRUTH_FILE = "planted_truth.json"


def load_truth(layer: str, run_dir: Path | None = None):
    """The run's planted truth: RUN/planted_truth.json if present, else sae.model.planted's for ``layer``;
    None (with a warning) when neither is available."""
    try:
        from sae.model import planted
    except ImportError as e:
        log.warning("model_weights is planted but sae.model.planted is not available (%s): no curves.planted.", e)
        return None
    path = Path(run_dir) / TRUTH_FILE if run_dir is not None else None
    if path is not None and path.is_file():
        try:  # from_json takes the file's text (or, in some versions, its path)
            return planted.PlantedTruth.from_json(path.read_text())
        except (TypeError, ValueError, OSError):
            return planted.PlantedTruth.from_json(path)
    return planted.planted_truth(layer)


def _curve_rows(truth) -> np.ndarray:
    return np.array([i for i, kind in enumerate(truth.kind) if kind == "curve"], dtype=np.int64)


def planted_recovery(truth, W_dec: Tensor, features: CurveReport, neurons: CurveReport, min_cos: float = 0.9,
                     max_error: float = 360.0 / 64) -> dict[str, Any]:
    """curves.planted: how many planted curves the SAE features and the pure neurons recover (module doc).

    W_dec (d_sae, C): the SAE's decoder rows in the layer's channel space."""
    rows = _curve_rows(truth)
    truth_orientation = np.asarray(truth.orientation_deg, dtype=np.float64)[rows]
    directions = torch.as_tensor(truth.direction, dtype=torch.float32)[torch.as_tensor(rows)]
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    decoder = W_dec.detach().float().cpu()
    decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = directions @ decoder.T  # (n_curves, d_sae)
    best_cos, best = cos.max(1)
    feature_pref = features.preferred_orientation[best].numpy()
    feature_error = angular_distance(feature_pref, truth_orientation)
    by_feature = (best_cos.numpy() > min_cos) & features.is_curve[best].numpy() & (feature_error <= max_error)
    pure = [truth.pure_channel[i] for i in rows]
    neuron_error = np.array([angular_distance(float(neurons.preferred_orientation[c]), o) if c is not None else np.nan
                             for c, o in zip(pure, truth_orientation)])
    by_neuron = np.array([c is not None and bool(neurons.is_curve[c]) for c in pure]) & (neuron_error <= max_error)
    uncovered = np.array([c is None for c in pure]) | ~by_neuron
    matched = (cos > min_cos).any(0)  # features within cos min_cos of some planted curve
    pure_channels = {c for c in pure if c is not None}
    false_neurons = [int(u) for u in torch.nonzero(neurons.is_curve).flatten() if int(u) not in pure_channels]
    return {
        "n_planted": int(len(rows)), "n_pure": int(sum(c is not None for c in pure)),
        "recovered_by_features": int(by_feature.sum()), "recovered_by_neurons": int(by_neuron.sum()),
        "n_not_covered_by_neurons": int(uncovered.sum()),
        "recovered_by_features_not_by_neurons": int((by_feature & uncovered).sum()),
        "recall_features_where_neurons_miss": float((by_feature & uncovered).sum() / max(uncovered.sum(), 1)),
        "false_positive_features": int((features.is_curve & ~matched).sum()),
        "false_positive_neurons": len(false_neurons),
        "criteria": {"min_cos": min_cos, "max_error_deg": max_error},
        "per_curve": {
            "orientation_deg": truth_orientation.tolist(), "pure_channel": pure,
            "best_feature": best.tolist(), "best_cos": best_cos.tolist(),
            "feature_error_deg": feature_error.tolist(), "neuron_error_deg": neuron_error.tolist(),
            "recovered_by_feature": by_feature.tolist(), "recovered_by_neuron": by_neuron.tolist(),
        },
    }


def wheel_overlay(planted: dict[str, Any]) -> dict[str, np.ndarray]:
    """For the orientation wheel: every planted curve orientation, those the pure neurons cover, those the
    SAE features recover."""
    per = planted["per_curve"]
    orientation = np.asarray(per["orientation_deg"], dtype=np.float64)
    return {"planted": orientation, "neurons": orientation[np.asarray(per["recovered_by_neuron"], dtype=bool)],
            "features": orientation[np.asarray(per["recovered_by_feature"], dtype=bool)]}
