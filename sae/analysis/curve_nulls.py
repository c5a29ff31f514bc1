"""Null units for the curve-detector counts: what the criterion finds where there is nothing to find.

A count of curve detectors means something only beside the count the same analysis gives on units that
cannot be curve detectors but are as sparse as the ones counted (sparsity alone inflates a max-based
count: a unit that fires on one stimulus in a thousand has a one-bin "tuning"). Two nulls:

* sparsity-matched random directions: for each unit to match, a random unit direction u in the layer's
  channel space, made to fire as often as the unit does on the held-out positions by a threshold tau
  (the (1 - density) quantile of u.x there), so its activation is relu(u.x - tau);
* the same network with random weights (`evaluation` builds it when the run used real weights).

``above_null`` decides whether a count stands out from its null with a one-sided Poisson test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sae.analysis.curve_criterion import natural_scale


@dataclass(frozen=True)
class NullDirections:
    """directions (U, C) unit vectors; threshold (U,); scale (U,) natural scale (mean top-5 image maxima);
    density (U,) the firing density each was matched to."""

    directions: Tensor
    threshold: Tensor
    scale: Tensor
    density: Tensor

    def __len__(self) -> int:
        return self.directions.shape[0]

    def respond(self, x: Tensor) -> Tensor:
        """(n, C) channel responses -> (n, U) activations relu(x @ u - tau)."""
        return (x.float() @ self.directions.T - self.threshold).clamp_min(0)


def density_matched_directions(acts: Tensor, densities: Tensor, seed: int = 0, top_k: int = 5,
                               chunk: int = 256) -> NullDirections:
    """Random directions thresholded to fire at ``densities`` (U,) on held-out activations acts (N, C, h, w).

    Units that never fire (density 0) are left out: there is no density to match. Each direction's
    threshold is the (1 - density) quantile of its projections over all N h w positions."""
    densities = densities.float().flatten()
    densities = densities[densities > 0]
    n_images, channels = acts.shape[:2]
    rows = acts.permute(0, 2, 3, 1).reshape(-1, channels).float()
    generator = torch.Generator().manual_seed(int(seed))
    directions = torch.randn(len(densities), channels, generator=generator)
    directions = directions / directions.norm(dim=1, keepdim=True)
    thresholds, scales = [], []
    for start in range(0, len(densities), chunk):
        u, p = directions[start : start + chunk], densities[start : start + chunk]
        projection = rows @ u.T  # (R, c)
        ordered = projection.sort(dim=0).values
        index = ((1 - p) * rows.shape[0]).floor().long().clamp(0, rows.shape[0] - 1)
        tau = ordered.gather(0, index[None]).squeeze(0)  # about density * R positions lie above
        thresholds.append(tau)
        image_max = (projection - tau).clamp_min(0).view(n_images, -1, len(p)).amax(1)
        scales.append(natural_scale(image_max, top_k))
    return NullDirections(directions, torch.cat(thresholds), torch.cat(scales), densities)


def poisson_tail(count: int, mean: float) -> float:
    """P(X >= count) for X ~ Poisson(mean)."""
    if count <= 0:
        return 1.0
    if mean <= 0:
        return 0.0
    term, below = math.exp(-mean), 0.0
    for k in range(count):
        below += term
        term *= mean / (k + 1)
    return max(0.0, 1.0 - below)


def null_summary(n_curve: int, n_units: int, null_curve: int, n_null: int, alpha: float = 0.05) -> dict:
    """The null's count scaled to n_units, and whether n_curve is above it.

    The null rate is estimated as (null_curve + 1) / (n_null + 1) (never zero, so a few chance passes in a
    small null are not ruled out), and n_curve is above the null when P(X >= n_curve) < alpha for
    X ~ Poisson(n_units x that rate)."""
    rate = (null_curve + 1) / (n_null + 1)
    p = poisson_tail(int(n_curve), n_units * rate)
    return {"n_units": int(n_null), "n_curve": int(null_curve), "rate": null_curve / max(n_null, 1),
            "expected": n_units * null_curve / max(n_null, 1), "p_value": p, "above_null": bool(p < alpha)}
