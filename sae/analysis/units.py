"""What the browser shows of every unit (SAE feature or neuron), computed from the evaluation's held-out data.

Cheap enough for all units: one more pass over the held-out activations gives each unit's activation
histogram and, around each of its top-k examples, the activation map that the browser draws over the crop.
The rest comes from the evaluation's scan (examples at several activation quantiles) and the decoder
(nearest features by cosine, the neurons a feature loads on). Feature visualizations, the expensive part,
stay with a selection (`select_spread`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sae.analysis import examples
from sae.model import receptive_field

HIST_BINS = 24


@dataclass
class UnitDetails:
    """Per-unit arrays for `units` (n unit indices, all scanned by `scan`).

    hist (n, HIST_BINS) long: counts of positive activations in equal bins from 0 to hist_max (n,);
    top: the top-k examples; maps (n, k, W, W) float: the unit's activation on the (2r+1)^2 positions around
    each example's position (zero outside the grid), r = `radius`; quantiles: examples at several activation
    quantiles, (n, Q * m) with quantile_labels (Q,) naming the rank range each block of m comes from."""

    units: list[int]
    hist: Tensor
    hist_max: Tensor
    n_zero: Tensor
    top: examples.TopExamples
    maps: Tensor
    radius: int
    quantiles: examples.TopExamples
    quantile_labels: list[str]


def window_radius(layer: str, grid: tuple[int, int]) -> int:
    """Positions whose centres fall inside one receptive-field crop: about size / (2 stride) either side."""
    field = receptive_field(layer)
    return max(1, min(math.ceil(field.size / (2 * field.stride)), max(grid)))


def unit_details(held, encode: Callable[[Tensor], Tensor] | None, scan: examples.ActivationScan, units: list[int],
                 k: int = 9, quantiles: int = 4, per_quantile: int = 4) -> UnitDetails:
    """One pass over `held` (sections.HeldOut): histograms and top-k activation maps of `units`.

    encode: (R, d_in) rows -> (R, U) activations of all of the scan's units (None: the rows are the units)."""
    from sae.analysis.sections import to_rows

    h, w = held.grid
    r = window_radius(held.layer, (h, w))
    top = scan.top(units, k)
    column = {u: c for c, u in enumerate(scan.units)}
    cols = torch.tensor([column[u] for u in units], dtype=torch.long)
    hist_max = scan.image_max[:, cols].amax(0).clamp_min(1e-12)
    n, k = top.values.shape
    hist = torch.zeros(n * HIST_BINS, dtype=torch.long)
    fired = torch.zeros(n, dtype=torch.long)
    side = 2 * r + 1
    maps = torch.zeros(n, k, side, side)
    offsets = torch.arange(-r, r + 1)
    unit_of = torch.full((len(scan.units),), -1, dtype=torch.long)
    unit_of[cols] = torch.arange(n)
    first = 0
    with torch.inference_mode():
        for chunk in held.image_chunks():
            acts = to_rows(chunk)
            acts = acts if encode is None else encode(acts)
            acts = acts.float().cpu()
            rows, where = torch.nonzero(acts > 0, as_tuple=True)
            mine = unit_of[where]
            keep = mine >= 0
            values = acts[rows[keep], where[keep]]
            bins = (values / hist_max[mine[keep]] * HIST_BINS).long().clamp(0, HIST_BINS - 1)
            hist.index_add_(0, mine[keep] * HIST_BINS + bins, torch.ones_like(bins))
            fired.index_add_(0, mine[keep], torch.ones_like(bins))
            count = chunk.shape[0]
            grid = acts.reshape(count, h, w, -1)
            u_idx, slot = torch.nonzero((top.image_index >= first) & (top.image_index < first + count), as_tuple=True)
            if len(u_idx):
                local = top.image_index[u_idx, slot] - first
                ii = top.row[u_idx, slot][:, None, None] + offsets[None, :, None]
                jj = top.col[u_idx, slot][:, None, None] + offsets[None, None, :]
                inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
                window = grid[local[:, None, None], ii.clamp(0, h - 1), jj.clamp(0, w - 1), cols[u_idx][:, None, None]]
                maps[u_idx, slot] = torch.where(inside, window, torch.zeros(()))
            first += count
    hist = hist.reshape(n, HIST_BINS)
    n_zero = torch.full((n,), scan.n_vectors, dtype=torch.long) - fired
    picked, labels = quantile_examples(scan, cols, units, quantiles, per_quantile)
    return UnitDetails(units, hist, hist_max, n_zero, top, maps, r, picked, labels)


def quantile_examples(scan: examples.ActivationScan, cols: Tensor, units: list[int], quantiles: int,
                      per_quantile: int) -> tuple[examples.TopExamples, list[str]]:
    """`per_quantile` images from each of `quantiles` equal rank ranges of the images where a unit fires
    (the top range first), so a page shows what weak activations look like too, not only the maxima."""
    image_max = scan.image_max[:, cols].T  # (n, N)
    values, order = image_max.sort(dim=1, descending=True)
    n_pos = (values > 0).sum(1).clamp_min(1)
    edges = torch.linspace(0, 1, quantiles + 1)
    fractions = torch.cat([torch.linspace(edges[q], edges[q + 1], per_quantile + 2)[1:-1] for q in range(quantiles)])
    ranks = (fractions[None, :] * n_pos[:, None]).long().clamp(max=image_max.shape[1] - 1)
    ranks = torch.minimum(ranks, (n_pos - 1)[:, None])
    image_index = order.gather(1, ranks)
    flat = scan.argmax[:, cols].T.gather(1, image_index)
    _, w = scan.grid
    labels = [f"top {int(edges[1] * 100)}%" if q == 0 else f"{int(edges[q] * 100)}-{int(edges[q + 1] * 100)}%"
              for q in range(quantiles)]  # rank ranges among the images where the unit fires, strongest first
    return examples.TopExamples(units, values.gather(1, ranks), image_index, flat // w, flat % w), labels


def heat_colours(n: int = 256) -> Tensor:
    """(n, 3) in [0, 1]: a dark-red-to-yellow ramp (like matplotlib's 'hot'), readable over photographs."""
    t = torch.linspace(0, 1, n)
    return torch.stack([(t * 2.5).clamp(0, 1), (t * 2.5 - 1).clamp(0, 1), (t * 3 - 2).clamp(0, 1) * 0.6], 1)


def overlay(tiles: Tensor, maps: Tensor, layer: str, radius: int, scale: Tensor, alpha: float = 0.6) -> Tensor:
    """Receptive-field crops (n, k, 3, S, S) in [0, 1] with each position's activation drawn over its pixels.

    maps (n, k, 2r+1, 2r+1): activations around the crop's centre position; scale (n,): the value drawn at
    full strength (the unit's top activation). A position's value covers the stride x stride pixels around its
    receptive field's centre, bilinearly interpolated; where the unit is silent the photograph shows as is."""
    field = receptive_field(layer)
    n, k, _, size, _ = tiles.shape
    side = 2 * radius + 1
    heat = (maps / scale.clamp_min(1e-12)[:, None, None, None]).clamp(0, 1).reshape(n * k, 1, side, side)
    heat = F.interpolate(heat, scale_factor=field.stride, mode="bilinear", align_corners=False)
    begin = radius * field.stride - field.size / 2 + field.stride / 2  # crop's first pixel in the upsampled window
    heat = heat[..., round(begin):round(begin) + field.size, round(begin):round(begin) + field.size]
    heat = F.interpolate(heat, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    colours = heat_colours()[(heat[:, 0] * 255).round().long()].permute(0, 3, 1, 2)  # (n*k, 3, S, S)
    a = alpha * heat
    out = tiles.reshape(n * k, 3, size, size) * (1 - a) + colours * a
    return out.reshape(n, k, 3, size, size)


def select_spread(frequency: Tensor, n: int) -> list[int]:
    """`n` alive features spread evenly over log10 density (rarest to densest), not the n densest: the densest
    features of an SAE are its least specific ones."""
    alive = torch.nonzero(frequency > 0).flatten()
    if len(alive) <= n:
        return alive.tolist()
    order = alive[frequency[alive].log10().argsort(stable=True)]
    picks = torch.linspace(0, len(order) - 1, n).round().long()
    return sorted(order[picks].tolist())


@dataclass
class Neighbours:
    """nearest (n, m) indices and cosine (n, m): for features, the other features whose decoder rows are most
    similar; loads (n, m) indices and weight (n, m): the neurons (decoder row's entries) of largest |weight|."""

    nearest: Tensor
    cosine: Tensor
    loads: Tensor
    weight: Tensor


def feature_neighbours(W_dec: Tensor, m: int = 8, chunk: int = 4096) -> Neighbours:
    """W_dec (d_sae, d_in): each feature's m nearest features by decoder cosine and its m largest loadings."""
    unit = F.normalize(W_dec.detach().float().cpu(), dim=1)
    m_feat = min(m, unit.shape[0] - 1)
    nearest, cosine = [], []
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start:start + chunk] @ unit.T
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -math.inf
        c, i = sims.topk(m_feat, dim=1)
        nearest.append(i)
        cosine.append(c)
    weight, loads = unit.abs().topk(min(m, unit.shape[1]), dim=1)
    return Neighbours(torch.cat(nearest), torch.cat(cosine), loads, unit.gather(1, loads))


def neuron_neighbours(W_dec: Tensor, m: int = 8) -> Neighbours:
    """For each neuron (a one-hot direction): the m features whose decoder direction points most along it
    (cosine = that row's normalized entry). Neurons are orthogonal, so they have no neuron neighbours."""
    unit = F.normalize(W_dec.detach().float().cpu(), dim=1).T  # (d_in, d_sae)
    cosine, nearest = unit.topk(min(m, unit.shape[1]), dim=1)
    empty = torch.zeros(unit.shape[0], 0, dtype=torch.long)
    return Neighbours(nearest, cosine, empty, empty.float())


def histogram_svg(counts: np.ndarray, top: float, n_zero: int, width: int = 360, height: int = 120) -> str:
    """An inline SVG bar chart of positive-activation counts (log count axis), x from 0 to `top`."""
    counts = np.asarray(counts, dtype=np.float64)
    logs = np.log10(counts + 1)
    high = max(logs.max(), 1e-9)
    bar = (width - 40) / len(counts)
    bars = "".join(
        f'<rect x="{36 + i * bar:.1f}" y="{height - 18 - v / high * (height - 28):.1f}" width="{bar - 1:.1f}" '
        f'height="{v / high * (height - 28):.1f}"><title>{int(c)} positions</title></rect>'
        for i, (v, c) in enumerate(zip(logs, counts)))
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{bars}'
            f'<text x="36" y="{height - 4}">0</text><text x="{width - 4}" y="{height - 4}" text-anchor="end">'
            f'{top:.3g}</text><text x="0" y="12">{int(counts.max())}</text><text x="0" y="{height - 18}">0</text>'
            f'<text x="{width - 4}" y="12" text-anchor="end">{n_zero} positions at 0 (not drawn)</text></svg>')


def curve_svg(values: np.ndarray, marker: float | None = None, width: int = 360, height: int = 120) -> str:
    """An inline SVG line of a tuning curve over orientations 0-360 degrees (marker: the preferred one)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        return ""
    low, high = values.min(), values.max()
    span = (high - low) or 1.0
    xs = 36 + np.arange(len(values)) * (width - 40) / max(1, len(values) - 1)
    ys = height - 18 - (values - low) / span * (height - 28)
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    mark = ""
    if marker is not None and math.isfinite(marker):
        x = 36 + marker / 360 * (width - 40)
        mark = f'<line class="mark" x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{height - 18}"/>'
    return (f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{mark}'
            f'<polyline points="{points}"/><text x="36" y="{height - 4}">0°</text><text x="{width - 4}" '
            f'y="{height - 4}" text-anchor="end">360°</text><text x="0" y="12">{high:.3g}</text>'
            f'<text x="0" y="{height - 18}">{low:.3g}</text></svg>')
