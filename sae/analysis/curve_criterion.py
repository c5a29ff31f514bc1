"""When is a unit a curve detector? The criterion applied to radial tuning (`sae.analysis.curves`).

Cammarata et al. 2020 ("Curve Detectors", Distill) call a unit a curve detector when it responds to
curves of one orientation, over a range of neighbouring orientations, radii and positions, more than to
straight lines; Gorton 2024 asks the same of SAE features. A criterion that only looks at the shape of a
maximum over many stimuli is easy to pass by chance: a sparse unit (an SAE feature that fires on 0.1% of
positions, or a random direction thresholded to fire as rarely) that crosses its threshold on ONE
stimulus has a one-bin spike, a huge peak/mean and no line response. So every test below asks for
evidence that a chance unit does not give, and each is scaled so that a real detector passes it:

Let t(theta) be a unit's curve tuning (max over radius, rendering and polarity), rectified at 0 (a unit
"fires" only when positive), peak = max t and step = the orientation grid's spacing. A unit passes when:

1. ``responds``: peak > ``min_peak`` (default 0).
2. ``relative_peak``: peak >= ``min_relative_peak`` (default 0.25) x the unit's natural scale (the mean
   of its top-5 held-out image maxima, `natural_scale`): the curve drives it as the images that drive it
   most do, not a hair above its threshold. A unit silent on natural images (scale 0) fails: it detects
   nothing in them. Skipped when no scale is given (hand-built units).
3. ``single_peak``: the orientations where t >= ``single_peak_level`` (2/3) x peak form ONE arc of the
   circle: a line or edge unit has two equal lobes 180 degrees apart. A curve detector may answer the
   opposite curve at large radii, where an arc and its mirror image are nearly the same straight stroke,
   so a second lobe below 2/3 of the peak is allowed (`curve_vs_line` rejects the line units).
4. ``half_width``: max(``min_half_width`` (default 10), step) <= HWHM <= ``max_half_width`` (default
   45) degrees. Real curve detectors respond over ~20-45 degrees (they tile the circle every ~36
   degrees, 10 in mixed3b); a one-bin spike has HWHM step / 2 on any grid, so it never passes.
5. ``peak_to_mean``: peak / mean(t) >= ``min_peak_to_mean`` (default 2.5; a von Mises bump of 45
   degrees HWHM has 3.4, a flat tuning 1).
6. ``curve_vs_line``: peak / max(line tuning) >= ``min_curve_vs_line`` (1.25) and ``curve_vs_angle``:
   peak / max(angle tuning) >= ``min_curve_vs_angle`` (1.1), with as many line and angle stimuli as
   curves, each line the least-squares fit of one arc: a unit that likes straight lines as much fails.
7. ``split``: the two renderings (thin at the field's centre; thick, displaced by half a stride)
   each alone reach >= ``min_split_fraction`` (0.5) of the peak and prefer orientations within
   ``max_split_shift`` (22.5) degrees of each other: the tuning is a property of the unit, not of one
   stimulus (a split-half reliability test). Skipped when the stimuli have one rendering.

The thresholds' false-positive rates (random-weights neurons, random directions at SAE densities) are
measured by ``bench/curve_nulls.py``; the numbers are in bench/README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # curves re-exports this module, so it is imported lazily the other way round
    from sae.analysis.curves import Tuning

CHECKS = ("responds", "relative_peak", "single_peak", "half_width", "peak_to_mean", "curve_vs_line",
          "curve_vs_angle", "split")


@dataclass(frozen=True)
class CurveReport:
    """Per unit (n_units,): is_curve, preferred_orientation (degrees; NaN for a unit silent to every curve),
    half_width (degrees, HWHM), peak_sharpness (peak / mean), curve_vs_line, curve_vs_angle, single_peak,
    peak, relative_peak (peak / natural scale; NaN without one), split_fraction and split_shift (the weaker
    rendering's peak / peak, and degrees between the renderings' preferred orientations; NaN with one
    rendering); checks {name: (n_units,) bool} (see CHECKS); and the thresholds used (``criterion``)."""

    is_curve: Tensor
    preferred_orientation: Tensor
    half_width: Tensor
    peak_sharpness: Tensor
    curve_vs_line: Tensor
    curve_vs_angle: Tensor
    single_peak: Tensor
    peak: Tensor
    relative_peak: Tensor | None = None
    split_fraction: Tensor | None = None
    split_shift: Tensor | None = None
    checks: dict[str, Tensor] = field(default_factory=dict)
    criterion: dict[str, float] = field(default_factory=dict)

    @property
    def n_curve(self) -> int:
        return int(self.is_curve.sum())

    def failures(self) -> dict[str, int]:
        """How many units fail each check (a unit may fail several)."""
        return {name: int((~passed).sum()) for name, passed in self.checks.items()}


def natural_scale(image_max: Tensor, k: int = 5) -> Tensor:
    """(N, U) per-image maxima on held-out images -> (U,) the mean of each unit's top-k (its top dataset
    examples' activation). Negative maxima count as 0 (the unit does not fire)."""
    k = max(1, min(int(k), image_max.shape[0]))
    return image_max.float().clamp_min(0).topk(k, dim=0).values.mean(0)


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


def _preferred(t: Tensor, orientations: Tensor) -> Tensor:
    """Peak orientation of (U, n) tuning, refined by a parabola through the peak and its two neighbours;
    NaN for a unit that never fires."""
    n = t.shape[1]
    peak, peak_index = t.max(1)
    left = t.gather(1, ((peak_index - 1) % n)[:, None])[:, 0]
    right = t.gather(1, ((peak_index + 1) % n)[:, None])[:, 0]
    curvature = left - 2 * peak + right
    offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp(max=-1e-12), torch.zeros_like(peak))
    preferred = torch.remainder(orientations[peak_index] + offset.clamp(-0.5, 0.5) * (360.0 / n), 360.0)
    return torch.where(peak > 0, preferred, math.nan)


def angular_distance(a, b):
    """|a - b| around the circle, degrees in [0, 180] (tensors or arrays)."""
    return ((a - b + 180.0) % 360.0 - 180.0).abs() if isinstance(a, Tensor) else np.abs((a - b + 180.0) % 360.0 - 180.0)


def _ratio(a: Tensor, b: Tensor) -> Tensor:
    """a / b with b <= 0 giving inf (a > 0) or NaN (nothing to compare)."""
    return torch.where(b > 0, a / b.clamp_min(1e-30), torch.where(a > 0, math.inf, math.nan))


def _split(tuning: Tuning, peak: Tensor, preferred: Tensor) -> tuple[Tensor, Tensor]:
    """(weakest rendering's peak / peak, largest angle between a rendering's preference and the unit's)."""
    if tuning.curve_by_rendering is None:
        nan = torch.full_like(peak, math.nan)
        return nan, nan
    parts = tuning.curve_by_rendering.clamp_min(0)  # (U, R, n)
    fraction = _ratio(parts.max(2).values.min(1).values, peak)
    shifts = torch.stack([angular_distance(_preferred(parts[:, r], tuning.orientations), preferred)
                          for r in range(parts.shape[1])], 1)
    return fraction, torch.nan_to_num(shifts, nan=180.0).max(1).values


def curve_detectors(
    tuning: Tuning,
    natural_scale: Tensor | None = None,
    max_half_width: float = 45.0,
    min_half_width: float = 10.0,
    min_peak_to_mean: float = 2.5,
    min_curve_vs_line: float = 1.25,
    min_curve_vs_angle: float = 1.1,
    min_relative_peak: float = 0.25,
    min_split_fraction: float = 0.5,
    max_split_shift: float = 22.5,
    single_peak_level: float = 2 / 3,
    min_peak: float = 0.0,
) -> CurveReport:
    """Apply the module docstring's criterion to every unit of ``tuning``; natural_scale (n_units,)."""
    t = tuning.curve.clamp_min(0)
    peak, peak_index = t.max(1)
    step = 360.0 / t.shape[1]
    above = t >= peak[:, None] * single_peak_level
    rising = (above & ~above.roll(1, dims=1)).sum(1)  # contiguous arcs of the superlevel set
    single_peak = (rising == 1) | above.all(1)
    half_width = _half_width(t, peak_index, step)
    preferred = _preferred(t, tuning.orientations)
    sharpness = _ratio(peak, t.mean(1))
    vs_line = _ratio(peak, tuning.line.clamp_min(0).max(1).values)
    vs_angle = _ratio(peak, tuning.angle.clamp_min(0).max(1).values)
    relative = None if natural_scale is None else _ratio(peak, natural_scale.float().clamp_min(0))
    if relative is not None:
        relative = torch.where(natural_scale > 0, relative, math.nan)  # silent on natural images: fails
    split_fraction, split_shift = _split(tuning, peak, preferred)
    checks = {
        "responds": peak > min_peak,
        "relative_peak": torch.ones_like(single_peak) if relative is None else relative >= min_relative_peak,
        "single_peak": single_peak,
        "half_width": (half_width >= max(min_half_width, step)) & (half_width <= max_half_width),
        "peak_to_mean": sharpness >= min_peak_to_mean,
        "curve_vs_line": vs_line >= min_curve_vs_line,
        "curve_vs_angle": vs_angle >= min_curve_vs_angle,
        "split": torch.ones_like(single_peak) if tuning.curve_by_rendering is None
        else (split_fraction >= min_split_fraction) & (split_shift <= max_split_shift),
    }
    is_curve = torch.stack(list(checks.values())).all(0)
    criterion = {
        "max_half_width": max_half_width, "min_half_width": max(min_half_width, step),
        "min_peak_to_mean": min_peak_to_mean, "min_curve_vs_line": min_curve_vs_line,
        "min_curve_vs_angle": min_curve_vs_angle, "min_relative_peak": min_relative_peak,
        "min_split_fraction": min_split_fraction, "max_split_shift": max_split_shift, "single_peak_level": single_peak_level,
        "min_peak": min_peak,
        "natural_scale": natural_scale is not None, "split": tuning.curve_by_rendering is not None,
    }
    return CurveReport(is_curve, preferred, half_width, sharpness, vs_line, vs_angle, single_peak, peak, relative,
                       split_fraction, split_shift, checks, criterion)


def orientation_gap(orientations_deg) -> float:
    """The largest gap (degrees) between consecutive orientations around the circle; 360 for zero or one.
    NaNs (units without a preferred orientation) are ignored."""
    values = np.asarray(orientations_deg, dtype=np.float64).ravel()
    values = np.sort(np.remainder(values[~np.isnan(values)], 360.0))
    if values.size <= 1:
        return 360.0
    gaps = np.diff(np.concatenate([values, values[:1] + 360.0]))
    return float(gaps.max())
