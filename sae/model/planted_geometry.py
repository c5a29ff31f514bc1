"""Geometry of the planted network (sae.model.planted): orientations, strokes, and the kernels built from them.

Orientation convention (sae.analysis.curves): degrees counter-clockwise on screen, a curve at theta bulges
towards theta; a line's orientation is its normal, in [0, 180).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

N_EDGE = 16                      # edge/line orientations (normals mod 180), 11.25 degrees apart
# Curve orientations over 360 degrees, 22.5 degrees apart: at 11.25 degrees a detector's neighbour fires with it on
# half of its natural-image positions, and an SAE then learns that joint pattern rather than either direction.
N_CURVES = 16
CURVE_RADIUS = 28.0              # px: the arc each curve detector is built from
CURVE_HALF_LENGTH = 24.0         # px of arc on each side of the midpoint
CENTRE_SIGMA = 16.0              # px: arc samples are weighted by a Gaussian around the centre
LINE_INHIBITION = 0.5            # weight of the tangent line's template subtracted from each curve template
ANGLE_INHIBITION = 0.65          # and of the angles' (openings 60, 90, 120 degrees): a curve must beat a corner clearly
CALIBRATION_SIZE = 95  # stimulus_size("mixed3b"): its centre is the receptive-field centre of position (5, 5)


def curve_orientations() -> np.ndarray:
    return np.arange(N_CURVES) * (360.0 / N_CURVES)


def edge_orientations() -> np.ndarray:
    return np.arange(N_EDGE) * (180.0 / N_EDGE)


# ---------------------------------------------------------------------------------------------- geometry
def _unit(deg: float | np.ndarray) -> tuple:
    """(dx, dy) on screen (y down) of the direction deg, counter-clockwise."""
    rad = np.deg2rad(deg)
    return np.cos(rad), -np.sin(rad)


def _orientation_weights(normal_deg: float) -> np.ndarray:
    """(N_EDGE,) linear interpolation of an edge normal (mod 180) onto the orientation channels."""
    step = 180.0 / N_EDGE
    position = (normal_deg % 180.0) / step
    below = math.floor(position)
    weights = np.zeros(N_EDGE)
    weights[below % N_EDGE] += 1 - (position - below)
    weights[(below + 1) % N_EDGE] += position - below
    return weights


def _stroke_template(points: np.ndarray, normals: np.ndarray, size: int, stride: float,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """(N_EDGE, size, size): orientation energy expected along a stroke sampled at points (n, 2) px (x, y)
    relative to the kernel centre, with edge normals (n,) degrees; positions on a grid of ``stride`` px, each
    sample spread over the grid by a Gaussian of SPLAT_SIGMA cells (smoother in position than bilinear)."""
    cells = np.arange(size) - (size - 1) / 2
    weights = np.ones(len(points)) if weights is None else weights
    grid = np.zeros((N_EDGE, size, size))
    for (x, y), normal, weight in zip(points, normals, weights):
        gy = np.exp(-((cells - y / stride) ** 2) / (2 * SPLAT_SIGMA**2))
        gx = np.exp(-((cells - x / stride) ** 2) / (2 * SPLAT_SIGMA**2))
        spread = gy[:, None] * gx[None, :]
        grid += weight * _orientation_weights(normal)[:, None, None] * spread / spread.sum()
    return grid / weights.sum()


SPLAT_SIGMA = 0.5


def _arc(theta: float, radius: float, half_length: float, n: int = 81) -> tuple[np.ndarray, np.ndarray]:
    """Points (n, 2) and edge normals (n,) of an arc through 0 bulging towards theta (radius inf: the line)."""
    s = np.linspace(-half_length, half_length, n)
    if math.isinf(radius):
        tx, ty = _unit(theta + 90)
        return np.stack([s * tx, s * ty], 1), np.full(n, theta % 180)
    alpha = np.rad2deg(s / radius)
    ux, uy = _unit(theta)
    px, py = _unit(theta + alpha)
    return np.stack([radius * (px - ux), radius * (py - uy)], 1), (theta + alpha) % 180


def _angle(theta: float, opening: float, half_length: float, n: int = 81) -> tuple[np.ndarray, np.ndarray]:
    """Points and normals of two straight arms from 0, the corner pointing towards theta."""
    s = np.linspace(0, half_length, n // 2 + 1)
    points, normals = [], []
    for sign in (1, -1):
        direction = theta + 180 + sign * opening / 2
        dx, dy = _unit(direction)
        points.append(np.stack([s * dx, s * dy], 1))
        normals.append(np.full(len(s), (direction + 90) % 180))
    return np.concatenate(points), np.concatenate(normals)


def _centre_weights(points: np.ndarray) -> np.ndarray:
    """Samples near the kernel centre count more: there a curve is smooth and an angle has its corner."""
    return np.exp(-(points**2).sum(1) / (2 * CENTRE_SIGMA**2))


def curve_template(theta: float) -> np.ndarray:
    """(N_EDGE, 5, 5) mixed3a 5x5 kernel of the curve detector bulging towards theta (stride 8 grid): the arc's
    orientation energy minus that of the tangent line and of angles pointing the same way."""
    def template(points, normals):
        return _stroke_template(points, normals, size=5, stride=8.0, weights=_centre_weights(points))

    arc = template(*_arc(theta, CURVE_RADIUS, CURVE_HALF_LENGTH))
    line = template(*_arc(theta, math.inf, CURVE_HALF_LENGTH))
    angles = np.mean([template(*_angle(theta, opening, CURVE_HALF_LENGTH)) for opening in (60.0, 90.0, 120.0)], 0)
    return arc - LINE_INHIBITION * line - ANGLE_INHIBITION * angles


def line_template(normal: float) -> np.ndarray:
    """(N_EDGE, 3, 3) mixed3a 3x3 kernel of the straight-line detector with this normal (stride 8 grid)."""
    return _stroke_template(*_arc(normal, math.inf, 8.0, n=33), size=3, stride=8.0)


def edge_kernel(normal: float, sigma_across: float = 1.2, sigma_along: float = 2.0) -> np.ndarray:
    """(7, 7) derivative of an elongated Gaussian across the edge normal; a 0 -> 255 step across it gives 1."""
    offsets = np.arange(-3, 4)
    dx, dy = np.meshgrid(offsets, offsets)  # [row = dy, column = dx]
    nx, ny = _unit(normal)
    across, along = dx * nx + dy * ny, -dx * ny + dy * nx
    kernel = across * np.exp(-across**2 / (2 * sigma_across**2) - along**2 / (2 * sigma_along**2))
    return kernel / (255.0 * kernel[across > 0].sum())


def gaussian_blob(size: int, sigma: float) -> np.ndarray:
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets[:, None] ** 2 + offsets[None] ** 2) / (2 * sigma**2))
    return g / g.sum()


def render_stroke(theta: float, radius: float, width: float, polarity: int = 1, half_length: float = 24.0,
                  size: int = CALIBRATION_SIZE) -> Tensor:
    """(1, 3, size, size) uint8 grey image of an arc through the centre bulging towards theta (radius inf: the
    straight line), anti-aliased; polarity 1: dark ink on white, -1: white on black."""
    centre = (size - 1) / 2
    coords = torch.arange(size, dtype=torch.float64) - centre
    py, px = coords[:, None], coords[None, :]
    nx, ny = _unit(theta)
    if math.isinf(radius):
        along = (-px * ny + py * nx).clamp(-half_length, half_length)
        d = torch.hypot(px - along * -ny, py - along * nx)
    else:
        ox, oy = -radius * nx, -radius * ny  # the circle's centre
        angle = torch.rad2deg(torch.atan2(-(py - oy), px - ox))
        delta = torch.remainder(angle - theta + 180, 360) - 180
        half = min(math.degrees(half_length / radius), 90.0)
        ends = [torch.hypot(px - ox - radius * _unit(theta + s * half)[0], py - oy - radius * _unit(theta + s * half)[1])
                for s in (1, -1)]
        d = torch.where(delta.abs() <= half, (torch.hypot(px - ox, py - oy) - radius).abs(), torch.minimum(*ends))
    ink = (width / 2 + 0.5 - d).clamp(0, 1)
    grey = 255.0 * (1 - ink) if polarity == 1 else 255.0 * ink
    return grey.round().to(torch.uint8).expand(1, 3, size, size)
