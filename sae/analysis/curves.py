"""Curve detectors (Cammarata et al. 2020, "Curve Detectors", Distill; as used by Gorton 2024).

Stimuli
-------
``curve_stimuli`` draws, anti-aliased on a flat background, three kinds of shape through one centre
point, each at ``orientations`` evenly spaced orientations:

* "curve": an arc of a circle of radius ``r`` and length ``length`` whose midpoint is the centre and
  whose convex side faces the orientation (at most a semicircle, so a small radius still has one
  clear direction). Several radii, line widths and both polarities.
* "line": the straight segment tangent to that arc at the centre (the limit r -> infinity), the
  control for orientation-selective units that ignore curvature.
* "angle": two straight arms meeting at the centre, the corner pointing the same way, at several
  openings; the control for units that want a corner rather than a smooth bend.

Orientation convention: degrees in [0, 360), counter-clockwise as seen on screen, 0 = the curve bulges
to the right (+x), 90 = it bulges upwards (-y in image rows).

Responses are read at the one grid position whose receptive field is centred on the stimuli
(``stimulus_size`` picks an image size whose centre is exactly such a centre).

Criterion (``curve_detectors``)
-------------------------------
Let t(theta) be a unit's curve tuning (max over radius, width and polarity), rectified at 0 (a unit
"fires" only when positive), and peak = max t. A unit is a curve detector when all of:

1. peak > ``min_peak`` (default 0): it responds to some curve at all;
2. single peak: the orientations where t >= peak / 2 form ONE contiguous arc of the circle, so a
   line or edge unit (two lobes 180 degrees apart) fails;
3. half-width at half-maximum <= ``max_half_width`` (default 45 degrees): a sharp peak. Curve
   neurons tile the circle about every 36 degrees (10 in mixed3b), so a family member's half-width
   is of that order; 45 degrees admits them and rejects broadly tuned units;
4. peak-to-mean ratio peak / mean(t) >= ``min_peak_to_mean`` (default 2.5; a von Mises bump with a
   45 degree half-width has 3.4, a flat curve 1): the response is concentrated in the peak;
5. curve_vs_line = peak / max(line tuning) >= ``min_curve_vs_line`` (default 1.25) and
   curve_vs_angle = peak / max(angle tuning) >= ``min_curve_vs_angle`` (default 1.1): curves beat
   their straight and cornered controls by a margin (an edge or line unit prefers the line).
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
    ``orientations``; radius (n,) px (inf for lines, nan for angles); width (n,) px; polarity (n,) int
    (+1 dark ink on white, -1 white ink on black); opening (n,) degrees (nan except angles);
    kind (n,) numpy str array of "curve" | "line" | "angle"; center (y, x) in pixel coordinates.
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
    """[(distance to the shape (n_orient, S, S), kind, radius, opening)] for every curve radius, the line
    and every angle opening, at the orientations ``grid`` (degrees)."""
    cy, cx = center
    theta = torch.deg2rad(grid).view(-1, 1, 1)
    px, py = _pixel_grid(size)
    shapes = []
    for r in radii:
        shapes.append((_arc_distance(px, py, cy, cx, theta, torch.full_like(theta, r), length), "curve", r, math.nan))
    tx, ty = _unit(theta + math.pi / 2)
    half = length / 2
    shapes.append((_segment_distance(px, py, cx - half * tx, cy - half * ty, cx + half * tx, cy + half * ty),
                   "line", math.inf, math.nan))
    for opening in openings:
        arms = []
        for sign in (1, -1):
            ax, ay = _unit(theta + math.pi + sign * math.radians(opening) / 2)
            arms.append(_segment_distance(px, py, cx, cy, cx + half * ax, cy + half * ay))
        shapes.append((torch.minimum(*arms), "angle", math.nan, float(opening)))
    return shapes


def curve_stimuli(
    size: int,
    orientations: int = 64,
    radii: Sequence[float] | None = None,
    widths: Sequence[float] | None = None,
    polarities: Sequence[int] = (1, -1),
    center: tuple[float, float] | None = None,
    length: float | None = None,
    openings: Sequence[float] = (60.0, 90.0, 120.0),
) -> CurveStimuli:
    """Curves, lines and angles at ``orientations`` orientations, centred on ``center`` (y, x).

    Defaults scale with ``size`` (pick it with ``stimulus_size(layer)`` so the shapes fill the unit's
    receptive field): length = size / 2, radii = size * (0.08, 0.15, 0.3, 0.6) px, widths =
    (size / 48, size / 24) px but at least (1, 2). center defaults to the image centre.
    """
    if orientations < 8:
        raise ValueError(f"orientations={orientations}: need at least 8 to locate a tuning peak (64 is standard).")
    if any(p not in (1, -1) for p in polarities) or not polarities:
        raise ValueError(f"polarities={tuple(polarities)}: use 1 (dark on white) and/or -1 (white on black).")
    length = float(length if length is not None else size / 2)
    radii = tuple(float(r) for r in (radii if radii is not None else [size * f for f in (0.08, 0.15, 0.3, 0.6)]))
    widths = tuple(float(w) for w in (widths if widths is not None else [max(1.0, size / 48), max(2.0, size / 24)]))
    if min(radii) <= 0 or min(widths) <= 0 or length <= 0:
        raise ValueError(f"radii {radii}, widths {widths} and length {length} must be positive (pixels).")
    cy, cx = center if center is not None else ((size - 1) / 2,) * 2
    grid = torch.arange(orientations, dtype=torch.float32) * (360.0 / orientations)
    shapes = _shape_distances(size, grid, radii, length, openings, (cy, cx))
    images, columns = [], {k: [] for k in ("index", "radius", "width", "polarity", "opening", "kind")}
    for distance, kind, radius, opening in shapes:
        for width in widths:
            ink = _ink(distance, width)
            for polarity in polarities:
                grey = 255.0 * (1 - ink) if polarity == 1 else 255.0 * ink
                images.append(grey.round().to(torch.uint8))
                for key, value in (("radius", radius), ("width", width), ("polarity", polarity), ("opening", opening)):
                    columns[key].append(torch.full((orientations,), value, dtype=torch.float32))
                columns["index"].append(torch.arange(orientations))
                columns["kind"] += [kind] * orientations
    grey = torch.cat(images)
    index = torch.cat(columns["index"])
    return CurveStimuli(
        images=grey.unsqueeze(1).expand(-1, 3, -1, -1),
        orientation=grid.float()[index],
        orientation_index=index,
        radius=torch.cat(columns["radius"]),
        width=torch.cat(columns["width"]),
        polarity=torch.cat(columns["polarity"]).to(torch.int8),
        opening=torch.cat(columns["opening"]),
        kind=np.array(columns["kind"]),
        orientations=grid.float(),
        center=(float(cy), float(cx)),
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
    the max over radius, width, polarity (and opening); curve_by_radius (n_units, n_radii, n_orient)."""

    orientations: Tensor
    curve: Tensor
    line: Tensor
    angle: Tensor
    radii: Tensor
    curve_by_radius: Tensor


def _max_by_orientation(responses: Tensor, index: Tensor, n_orient: int) -> Tensor:
    """(n, U) responses, (n,) orientation indices -> (U, n_orient) max per orientation."""
    out = responses.new_full((responses.shape[1], n_orient), -math.inf)
    return out.scatter_reduce_(1, index.view(1, -1).expand(responses.shape[1], -1), responses.T, "amax")


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
    radii = torch.unique(stimuli.radius[is_curve])
    by_radius = torch.stack([
        _max_by_orientation(responses[is_curve & (stimuli.radius == r)],
                            stimuli.orientation_index[is_curve & (stimuli.radius == r)], n_orient)
        for r in radii
    ], dim=1)
    return Tuning(stimuli.orientations.clone(), by_kind["curve"], by_kind["line"], by_kind["angle"], radii, by_radius)


# ------------------------------------------------------------------------------------------ criterion
@dataclass(frozen=True)
class CurveReport:
    """Per unit (n_units,): is_curve, preferred_orientation (degrees; NaN for a unit silent to every curve),
    half_width (degrees, HWHM),
    peak_sharpness (peak-to-mean ratio), curve_vs_line, curve_vs_angle, single_peak, peak; and the
    thresholds used (``criterion``)."""

    is_curve: Tensor
    preferred_orientation: Tensor
    half_width: Tensor
    peak_sharpness: Tensor
    curve_vs_line: Tensor
    curve_vs_angle: Tensor
    single_peak: Tensor
    peak: Tensor
    criterion: dict[str, float] = field(default_factory=dict)

    @property
    def n_curve(self) -> int:
        return int(self.is_curve.sum())


def _half_width(t: Tensor, peak_index: Tensor, step: float) -> Tensor:
    """Half-width at half-maximum (degrees) around each row's peak of (U, n) non-negative tuning t."""
    n = t.shape[1]
    level = t.gather(1, peak_index[:, None]) / 2
    sides = []
    for direction in (1, -1):
        order = (peak_index[:, None] + direction * torch.arange(n)) % n
        walk = t.gather(1, order)  # walk[:, k]: k steps from the peak
        below = walk < level
        below[:, 0] = False
        first = torch.where(below.any(1), below.float().argmax(1), torch.full_like(peak_index, n))
        inside = walk.gather(1, (first - 1).clamp(max=n - 1)[:, None])[:, 0]
        outside = walk.gather(1, first.clamp(max=n - 1)[:, None])[:, 0]
        fraction = ((inside - level[:, 0]) / (inside - outside).clamp_min(1e-12)).clamp(0, 1)
        sides.append(torch.where(first < n, (first - 1 + fraction) * step, torch.full_like(fraction, 180.0)))
    return ((sides[0] + sides[1]) / 2).clamp(max=180.0)


def _preferred(t: Tensor, peak_index: Tensor, orientations: Tensor) -> Tensor:
    """Peak orientation refined by a parabola through the peak and its two circular neighbours."""
    n = t.shape[1]
    left = t.gather(1, ((peak_index - 1) % n)[:, None])[:, 0]
    mid = t.gather(1, peak_index[:, None])[:, 0]
    right = t.gather(1, ((peak_index + 1) % n)[:, None])[:, 0]
    curvature = left - 2 * mid + right
    offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp(max=-1e-12), torch.zeros_like(mid))
    return torch.remainder(orientations[peak_index] + offset.clamp(-0.5, 0.5) * (360.0 / n), 360.0)


def curve_detectors(
    tuning: Tuning,
    max_half_width: float = 45.0,
    min_peak_to_mean: float = 2.5,
    min_curve_vs_line: float = 1.25,
    min_curve_vs_angle: float = 1.1,
    min_peak: float = 0.0,
) -> CurveReport:
    """Apply the module docstring's criterion to every unit of ``tuning``."""
    t = tuning.curve.clamp_min(0)
    n_units, n = t.shape
    peak, peak_index = t.max(1)
    above = t >= peak[:, None] / 2
    # Contiguous arcs of the superlevel set = rising edges around the circle (an all-True set is one arc).
    rising = (above & ~above.roll(1, dims=1)).sum(1)
    single_peak = (rising == 1) | above.all(1)
    half_width = _half_width(t, peak_index, 360.0 / n)
    ratio = lambda a, b: torch.where(b > 0, a / b.clamp_min(1e-30), torch.where(a > 0, math.inf, math.nan))  # noqa: E731
    sharpness = ratio(peak, t.mean(1))
    vs_line = ratio(peak, tuning.line.clamp_min(0).max(1).values)
    vs_angle = ratio(peak, tuning.angle.clamp_min(0).max(1).values)
    is_curve = (
        (peak > min_peak) & single_peak & (half_width <= max_half_width) & (sharpness >= min_peak_to_mean)
        & (vs_line >= min_curve_vs_line) & (vs_angle >= min_curve_vs_angle)
    )
    criterion = {
        "max_half_width": max_half_width, "min_peak_to_mean": min_peak_to_mean,
        "min_curve_vs_line": min_curve_vs_line, "min_curve_vs_angle": min_curve_vs_angle, "min_peak": min_peak,
    }
    preferred = torch.where(peak > 0, _preferred(t, peak_index, tuning.orientations), math.nan)  # silent: none
    return CurveReport(is_curve, preferred, half_width, sharpness, vs_line, vs_angle, single_peak, peak, criterion)


def orientation_gap(orientations_deg) -> float:
    """The largest gap (degrees) between consecutive orientations around the circle; 360 for zero or one.
    NaNs (units without a preferred orientation) are ignored."""
    values = np.asarray(orientations_deg, dtype=np.float64).ravel()
    values = np.sort(np.remainder(values[~np.isnan(values)], 360.0))
    if values.size <= 1:
        return 360.0
    gaps = np.diff(np.concatenate([values, values[:1] + 360.0]))
    return float(gaps.max())
