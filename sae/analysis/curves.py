"""Curve stimuli and tuning (Cammarata et al. 2020, "Curve Detectors", Distill; as used by Gorton 2024).

Stimuli
-------
``curve_stimuli`` draws, anti-aliased on a flat background, three kinds of shape through one centre
point, each at ``orientations`` evenly spaced orientations and in the SAME number of conditions per
kind (a maximum over more stimuli is larger by chance alone, so the curve-vs-control ratios compare
like with like):

* "curve": an arc of a circle of radius ``r`` and length ``length`` whose midpoint is the centre and
  whose convex side faces the orientation (at most a semicircle, so a small radius still has one
  clear direction). Conditions: radius x polarity x rendering.
* "line": for each curve radius, the arc's least-squares straight fit: a segment of the same length
  parallel to the arc's tangent at the centre, moved towards the concave side by the arc's mean depth
  r (1 - sin(h) / h) (h the half-angle). The control for orientation-selective units that ignore
  curvature; one line per curve condition.
* "angle": two straight arms meeting at the centre, the corner pointing the same way, at
  len(radii) openings (one per curve radius); the control for units that want a corner.

A "rendering" is a stroke width and a displacement of the whole shape: the default draws every
shape thin at the receptive-field centre and thick displaced by ``jitter`` px in x and y (half the
layer's stride in the evaluation: the farthest a shape can sit from the nearest grid unit's centre).
The criterion asks that both renderings give the same tuning (`sae.analysis.curve_criterion`).

Orientation convention: degrees in [0, 360), counter-clockwise as seen on screen, 0 = the curve bulges
to the right (+x), 90 = it bulges upwards (-y in image rows).

Responses are read at the one grid position whose receptive field is centred on the stimuli
(``stimulus_size`` picks an image size whose centre is exactly such a centre). ``not_applicable``
says when a layer's receptive field is too small to hold a curve at all. The criterion itself is in
`sae.analysis.curve_criterion` (re-exported here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from sae.model import ReceptiveField, layer_shape, receptive_field

log = logging.getLogger("sae.analysis")

KNOWN_CURVE_NEURONS: dict[str, list[int]] = {"mixed3b": [379, 385, 342, 388, 340, 330, 349, 406, 376, 360]}
KINDS = ("curve", "line", "angle")


@dataclass(frozen=True)
class CurveStimuli:
    """n grey stimuli (stored as RGB) and what each one shows.

    images (n, 3, size, size) uint8 (the three channels are one expanded view, so it costs n*size^2
    bytes); orientation (n,) float degrees in [0, 360); orientation_index (n,) long into
    ``orientations``; radius (n,) px (curves: the arc's; lines: the radius of the arc they fit; nan for
    angles); width (n,) px; rendering (n,) long (which width/displacement); polarity (n,) int (+1 dark
    ink on white, -1 white ink on black); opening (n,) degrees (nan except angles); kind (n,) numpy str
    array of "curve" | "line" | "angle"; center (y, x) of the undisplaced shapes in pixel coordinates.
    """

    images: Tensor
    orientation: Tensor
    orientation_index: Tensor
    radius: Tensor
    width: Tensor
    polarity: Tensor
    opening: Tensor
    kind: np.ndarray
    orientations: Tensor
    center: tuple[float, float]
    rendering: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


def stimulus_size(layer: str, min_size: int = 0) -> int:
    """The smallest image side >= max(receptive field, min_size) whose centre is a position's RF centre."""
    rf = receptive_field(layer)
    size = max(rf.size, int(min_size), 1)
    while True:
        steps = ((size - 1) / 2 - rf.offset) / rf.stride
        if steps >= 0 and steps == int(steps) and int(steps) < layer_shape(layer, size)[1]:
            return size
        size += 1


def receptive_field_center(layer: str, size: int) -> tuple[float, float]:
    """(y, x) of the RF centre of the grid position nearest the middle of a size x size image."""
    rf = receptive_field(layer)
    _, rows, _ = layer_shape(layer, size)
    i = min(max(round(((size - 1) / 2 - rf.offset) / rf.stride), 0), rows - 1)
    return (rf.offset + i * rf.stride,) * 2


MIN_SAGITTA_PX = 2.0


def not_applicable(layer: str) -> str | None:
    """Why curve detectors cannot be asked of ``layer``, or None when they can.

    The stimuli fill the receptive field (side S = stimulus_size(layer)): arcs of length S/2. The middle
    radius 0.3 S bows r (1 - cos(L / 2r)) ~ 0.1 S away from its tangent line; below MIN_SAGITTA_PX (2 px)
    an anti-aliased 1-2 px stroke of that arc is a line with a blur, and no unit can tell the two apart
    (conv2d0: 7 px, conv2d1: 15 px fields)."""
    size = stimulus_size(layer)
    r, length = 0.3 * size, size / 2
    sagitta = r * (1 - math.cos(min(length / (2 * r), math.pi / 2)))
    if sagitta >= MIN_SAGITTA_PX:
        return None
    return (f"the receptive field of {layer} ({receptive_field(layer).size} px) is too small to hold a curve: a "
            f"stimulus arc bows {sagitta:.1f} px from a straight line (need {MIN_SAGITTA_PX:g}); curves are "
            "first asked of conv2d2")


# ------------------------------------------------------------------------------------------ rendering
def _unit(theta: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dy) of the direction theta (radians, counter-clockwise on screen; image y points down)."""
    return torch.cos(theta), -torch.sin(theta)


def _segment_distance(px: Tensor, py: Tensor, ax: Tensor, ay: Tensor, bx: Tensor, by: Tensor) -> Tensor:
    """Distance from pixels (1, S, S) to segments a-b given as (n, 1, 1) tensors -> (n, S, S)."""
    vx, vy = bx - ax, by - ay
    s = (((px - ax) * vx + (py - ay) * vy) / (vx * vx + vy * vy).clamp_min(1e-12)).clamp(0, 1)
    return torch.hypot(px - ax - s * vx, py - ay - s * vy)


def _arc_distance(px, py, cy, cx, theta, radius, length) -> Tensor:
    """Distance to arcs of ``radius`` and ``length`` with midpoint (cy, cx), bulging towards theta."""
    ux, uy = _unit(theta)
    ox, oy = cx - radius * ux, cy - radius * uy  # the circle's centre
    half = (length / (2 * radius)).clamp(max=math.pi / 2)
    vx, vy = px - ox, py - oy
    delta = torch.remainder(torch.atan2(-vy, vx) - theta + math.pi, 2 * math.pi) - math.pi
    on_arc = (torch.hypot(vx, vy) - radius).abs()
    ends = []
    for sign in (1, -1):
        ex, ey = _unit(theta + sign * half)
        ends.append(torch.hypot(px - ox - radius * ex, py - oy - radius * ey))
    return torch.where(delta.abs() <= half, on_arc, torch.minimum(*ends))


def _ink(distance: Tensor, width: float) -> Tensor:
    """Box-filtered coverage of a stroke of ``width`` px from the distance to its centre line, in [0, 1]."""
    return (width / 2 + 0.5 - distance).clamp(0, 1)


def _pixel_grid(size: int) -> tuple[Tensor, Tensor]:
    coords = torch.arange(size, dtype=torch.float32)
    return coords.view(1, 1, size), coords.view(1, size, 1)  # px, py


def curve_ink(size: int, theta_deg: float, radius: float, width: float, length: float,
              center: tuple[float, float] | None = None) -> Tensor:
    """(size, size) float ink coverage in [0, 1] of one curve; e.g. to draw a curve-shaped kernel."""
    cy, cx = center if center is not None else ((size - 1) / 2,) * 2
    px, py = _pixel_grid(size)
    t = torch.tensor([[[math.radians(theta_deg)]]], dtype=torch.float32)
    r = torch.tensor([[[float(radius)]]], dtype=torch.float32)
    return _ink(_arc_distance(px, py, cy, cx, t, r, float(length)), width)[0].float()


def _shape_distances(size: int, grid: Tensor, radii, length: float, openings, center: tuple[float, float]) -> list:
    """[(distance to the shape (n_orient, S, S), kind, radius, opening)] for every curve radius, its fitted
    line, and every angle opening, at the orientations ``grid`` (degrees), centred on ``center`` (y, x)."""
    cy, cx = center
    theta = torch.deg2rad(grid).view(-1, 1, 1)
    px, py = _pixel_grid(size)
    ux, uy = _unit(theta)  # towards the bulge
    tx, ty = _unit(theta + math.pi / 2)  # along the tangent
    half = length / 2
    shapes = []
    for r in radii:
        shapes.append((_arc_distance(px, py, cy, cx, theta, torch.full_like(theta, r), length), "curve", r, math.nan))
    for r in radii:  # each arc's least-squares straight fit: same length, moved back by the arc's mean depth
        h = min(length / (2 * r), math.pi / 2)
        depth = r * (1 - math.sin(h) / h)
        mx, my = cx - depth * ux, cy - depth * uy
        shapes.append((_segment_distance(px, py, mx - half * tx, my - half * ty, mx + half * tx, my + half * ty),
                       "line", r, math.nan))
    for opening in openings:
        arms = []
        for sign in (1, -1):
            ax, ay = _unit(theta + math.pi + sign * math.radians(opening) / 2)
            arms.append(_segment_distance(px, py, cx, cy, cx + half * ax, cy + half * ay))
        shapes.append((torch.minimum(*arms), "angle", math.nan, float(opening)))
    return shapes


def _renderings(size: int, widths, jitter: float) -> list[tuple[float, float]]:
    """[(width, displacement px in y and x)]: the k-th width is displaced by k * jitter."""
    widths = [float(w) for w in (widths if widths is not None else [max(1.0, size / 48), max(2.0, size / 24)])]
    return [(w, k * float(jitter)) for k, w in enumerate(widths)]


def curve_stimuli(
    size: int,
    orientations: int = 64,
    radii: Sequence[float] | None = None,
    widths: Sequence[float] | None = None,
    polarities: Sequence[int] = (1, -1),
    center: tuple[float, float] | None = None,
    length: float | None = None,
    openings: Sequence[float] | None = None,
    jitter: float = 0.0,
) -> CurveStimuli:
    """Curves, fitted lines and angles at ``orientations`` orientations, centred on ``center`` (y, x).

    Defaults scale with ``size`` (pick it with ``stimulus_size(layer)`` so the shapes fill the unit's
    receptive field): length = size / 2, radii = size * (0.08, 0.15, 0.3, 0.6) px, widths =
    (size / 48, size / 24) px but at least (1, 2), one angle opening per radius, evenly from 60 to 120
    degrees. The k-th width is drawn displaced by k * ``jitter`` px in y and x. center defaults to the
    image centre.
    """
    if orientations < 8:
        raise ValueError(f"orientations={orientations}: need at least 8 to locate a tuning peak (64 is standard).")
    if any(p not in (1, -1) for p in polarities) or not polarities:
        raise ValueError(f"polarities={tuple(polarities)}: use 1 (dark on white) and/or -1 (white on black).")
    length = float(length if length is not None else size / 2)
    radii = tuple(float(r) for r in (radii if radii is not None else [size * f for f in (0.08, 0.15, 0.3, 0.6)]))
    openings = tuple(openings if openings is not None else np.linspace(60.0, 120.0, len(radii)).tolist())
    renderings = _renderings(size, widths, jitter)
    if min(radii) <= 0 or min(w for w, _ in renderings) <= 0 or length <= 0:
        raise ValueError(f"radii {radii}, widths {widths} and length {length} must be positive (pixels).")
    cy, cx = center if center is not None else ((size - 1) / 2,) * 2
    grid = torch.arange(orientations, dtype=torch.float32) * (360.0 / orientations)
    images, columns = [], {k: [] for k in ("index", "radius", "width", "polarity", "opening", "rendering", "kind")}
    for rendering, (width, shift) in enumerate(renderings):
        for distance, kind, radius, opening in _shape_distances(size, grid, radii, length, openings,
                                                               (cy + shift, cx + shift)):
            ink = _ink(distance, width)
            for polarity in polarities:
                grey = 255.0 * (1 - ink) if polarity == 1 else 255.0 * ink
                images.append(grey.round().to(torch.uint8))
                for key, value in (("radius", radius), ("width", width), ("polarity", polarity),
                                   ("opening", opening), ("rendering", rendering)):
                    columns[key].append(torch.full((orientations,), value, dtype=torch.float32))
                columns["index"].append(torch.arange(orientations))
                columns["kind"] += [kind] * orientations
    index = torch.cat(columns["index"])
    return CurveStimuli(
        images=torch.cat(images).unsqueeze(1).expand(-1, 3, -1, -1),
        orientation=grid[index],
        orientation_index=index,
        radius=torch.cat(columns["radius"]),
        width=torch.cat(columns["width"]),
        polarity=torch.cat(columns["polarity"]).to(torch.int8),
        opening=torch.cat(columns["opening"]),
        kind=np.array(columns["kind"]),
        orientations=grid,
        center=(float(cy), float(cx)),
        rendering=torch.cat(columns["rendering"]).long(),
    )


# ------------------------------------------------------------------------------------------ responses
def _centre_position(field: ReceptiveField, center: tuple[float, float], grid: tuple[int, int]) -> tuple[int, int]:
    """The grid position (i, j) whose RF centre is nearest ``center`` (y, x); warns if it is off-centre."""
    position = []
    for coordinate, cells in zip(center, grid):
        k = min(max(round((coordinate - field.offset) / field.stride), 0), cells - 1)
        if abs(field.offset + k * field.stride - coordinate) > 0.5:
            log.warning(
                "The stimuli are centred at %.1f px but the nearest receptive-field centre is at %.1f px; responses "
                "are off-centre. Fix: curve_stimuli(stimulus_size(layer)) or center=receptive_field_center(layer, size).",
                coordinate, field.offset + k * field.stride,
            )
        position.append(k)
    return position[0], position[1]


def _device_of(module: object) -> torch.device:
    if isinstance(module, nn.Module):
        parameter = next(module.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def sae_responses(sae: nn.Module, neuron_responses: Tensor, input_scale: float = 1.0, units=None) -> Tensor:
    """(n, d_in) neuron responses -> (n, n_units) features ``sae.encode(x * input_scale)``, float32 on the CPU."""
    device = _device_of(sae)
    with torch.inference_mode():
        f = sae.encode(neuron_responses.to(device, torch.float32) * input_scale)
    f = f if units is None else f[:, torch.as_tensor(units, device=f.device)]
    return f.float().cpu()


def unit_responses(
    extractor: Callable[[Tensor], Tensor],
    sae: nn.Module | None,
    stimuli: CurveStimuli,
    units: Sequence[int] | Tensor | None = None,
    batch_size: int = 64,
    input_scale: float = 1.0,
    field: ReceptiveField | None = None,
) -> Tensor:
    """(n_stimuli, n_units) float32 CPU responses at the grid position centred on the stimuli.

    extractor: any callable uint8 (B, 3, S, S) -> (B, C, h, w), e.g. ``InceptionExtractor``; its
    receptive field comes from ``extractor.layer`` unless ``field`` is given (for units built by
    hand). With ``sae=None`` the units are the C channels; with an SAE they are its features
    ``sae.encode(x * input_scale)`` (equal to ``sae_responses(sae, unit_responses(extractor, None, ...))``,
    which shares one forward pass between neurons and features). ``units`` selects columns.
    """
    if field is None:
        layer = getattr(extractor, "layer", None)
        if layer is None:
            raise ValueError("unit_responses needs the receptive field: pass an extractor with .layer, or field=.")
        field = receptive_field(layer)
    device = _device_of(extractor)
    columns = []
    position = None
    with torch.inference_mode():
        for start in range(0, len(stimuli), batch_size):
            activations = extractor(stimuli.images[start : start + batch_size].to(device))
            if position is None:
                position = _centre_position(field, stimuli.center, tuple(activations.shape[-2:]))
            columns.append(activations[:, :, position[0], position[1]].float().cpu())
    neurons = torch.cat(columns)
    if sae is not None:
        return sae_responses(sae, neurons, input_scale, units)
    return neurons if units is None else neurons[:, torch.as_tensor(units)]


# ------------------------------------------------------------------------------------------ tuning
@dataclass(frozen=True)
class Tuning:
    """Radial tuning curves: orientations (n_orient,) degrees; curve, line, angle (n_units, n_orient), each
    the max over the kind's conditions (radius, rendering, polarity; opening); curve_by_radius (n_units,
    n_radii, n_orient); curve_by_rendering (n_units, n_renderings, n_orient): the curve tuning of each
    rendering alone (None when the stimuli have one rendering)."""

    orientations: Tensor
    curve: Tensor
    line: Tensor
    angle: Tensor
    radii: Tensor
    curve_by_radius: Tensor
    curve_by_rendering: Tensor | None = None


def _max_by_orientation(responses: Tensor, index: Tensor, n_orient: int) -> Tensor:
    """(n, U) responses, (n,) orientation indices -> (U, n_orient) max per orientation."""
    out = responses.new_full((responses.shape[1], n_orient), -math.inf)
    return out.scatter_reduce_(1, index.view(1, -1).expand(responses.shape[1], -1), responses.T, "amax")


def _curve_tuning_by(responses: Tensor, stimuli: CurveStimuli, column: Tensor, is_curve: Tensor) -> tuple:
    """(values of ``column`` among the curves, (U, n_values, n_orient) curve tuning for each value)."""
    n_orient = len(stimuli.orientations)
    values = torch.unique(column[is_curve])
    stacked = torch.stack([
        _max_by_orientation(responses[is_curve & (column == v)], stimuli.orientation_index[is_curve & (column == v)],
                            n_orient)
        for v in values
    ], dim=1)
    return values, stacked


def radial_tuning(responses: Tensor, stimuli: CurveStimuli) -> Tuning:
    """(n_stimuli, n_units) responses -> each unit's tuning to orientation, per stimulus kind."""
    if responses.ndim != 2 or responses.shape[0] != len(stimuli):
        raise ValueError(f"Expected responses of shape ({len(stimuli)}, n_units), got {tuple(responses.shape)}.")
    responses = responses.float().cpu()
    n_orient = len(stimuli.orientations)
    by_kind = {}
    for kind in KINDS:
        mask = torch.from_numpy(stimuli.kind == kind)
        if not mask.any():
            raise ValueError(f"The stimuli have no {kind!r} shapes; make them with curve_stimuli.")
        by_kind[kind] = _max_by_orientation(responses[mask], stimuli.orientation_index[mask], n_orient)
    is_curve = torch.from_numpy(stimuli.kind == "curve")
    radii, by_radius = _curve_tuning_by(responses, stimuli, stimuli.radius, is_curve)
    by_rendering = None
    if stimuli.rendering is not None and len(torch.unique(stimuli.rendering)) > 1:
        by_rendering = _curve_tuning_by(responses, stimuli, stimuli.rendering, is_curve)[1]
    return Tuning(stimuli.orientations.clone(), by_kind["curve"], by_kind["line"], by_kind["angle"], radii,
                  by_radius, by_rendering)


from sae.analysis.curve_criterion import CurveReport, curve_detectors, orientation_gap  # noqa: E402  (re-exported)

__all__ = ["KNOWN_CURVE_NEURONS", "KINDS", "CurveReport", "CurveStimuli", "Tuning", "curve_detectors", "curve_ink",
           "curve_stimuli", "not_applicable", "orientation_gap", "radial_tuning", "receptive_field_center",
           "sae_responses", "stimulus_size", "unit_responses"]
