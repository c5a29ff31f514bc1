"""A known-answer InceptionV1: lucent's architecture with weights constructed so mixed3b holds known features.

    net = load_inceptionv1(weights="planted")          # or model=planted / model.weights=planted
    truth = planted_truth("mixed3b")                   # kind, orientation, direction, pure channel per feature

Construction (every layer up to mixed3b; the rest of the network keeps its seeded random weights):

* conv2d0: 16 edge orientations (normal directions 11.25 degrees apart, mod 180) as derivative-of-Gaussian
  kernels, each with both signs (32 channels), and 8 colour-opponent blobs. Other channels zero.
* conv2d1 (1x1): |edge| per orientation (the two signs summed after ReLU and max-pool): polarity-free
  orientation energy; colours copied.
* conv2d2 (3x3, stride 4): energy summed along the edge and minus the mean over orientations (a sharper
  orientation tuning). 16 "line" channels (0-15) and 8 "colour" channels (16-23).
* mixed3a (stride 8, receptive field 59 px): 32 curve detectors in the 5x5 branch (channels 192-223), each an
  arc of orientation energy: samples of an arc of radius ``CURVE_RADIUS`` are splatted bilinearly over the 5x5
  grid and interpolated linearly across the 16 orientation channels, minus the tangent line's template (so
  curves beat lines) and a threshold; 16 line detectors in the 3x3 branch (64-79), 8 colour detectors and one
  texture (edge-density) detector in the 1x1 branch (0-8). Thresholds are set from responses to the preferred
  stimuli and from firing rates on scikit-image's sample photographs; each feature is then scaled so that its
  mean activation where it fires on those photographs is 1.
* mixed3b: the 1x1 branch is a non-negative mixing of those mixed3a channels with zero bias, so channels
  0-127 are exactly a linear superposition of the planted features: ``PURE_CURVES`` (10 orientations covering
  half the circle) get a channel each, the other 22 curves, the 16 lines, 8 colours and the texture detector
  share ``N_POLY`` polysemantic channels (each feature on 3, each channel holding 4-5 features). The 3x3, 5x5
  and pool branches (channels 128-479) keep their random weights, scaled by ``RANDOM_BRANCH_SCALE``.

Orientation convention (sae.analysis.curves): degrees counter-clockwise on screen, a curve at theta bulges
towards theta; a line's orientation is its normal, in [0, 180).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .layers import INPUT, ancestors, layer_channels
from .preprocess import preprocess

PLANTED = "planted"
N_EDGE = 16                      # edge/line orientations (normals mod 180), 11.25 degrees apart
N_CURVES = 32                    # curve orientations over 360 degrees, 11.25 degrees apart
PURE_CURVES = (0, 1, 3, 4, 6, 8, 9, 12, 13, 15)  # curve indices with a mixed3b channel of their own
N_POLY = 32                      # polysemantic mixed3b channels
FEATURES_PER_POLY = 3            # channels each superposed feature loads on
COLOURS = ((1, -1, 0), (-1, 1, 0), (-0.5, -0.5, 1), (0.5, 0.5, -1), (1, 0, -1), (-1, 0, 1), (0, 1, -1), (0, -1, 1))
CURVE_RADIUS = 28.0              # px: the arc each curve detector is built from
CURVE_HALF_LENGTH = 24.0         # px of arc on each side of the midpoint
CENTRE_SIGMA = 16.0              # px: arc samples are weighted by a Gaussian around the centre
LINE_INHIBITION = 0.5            # weight of the tangent line's template subtracted from each curve template
ANGLE_INHIBITION = 0.5           # and of the angles' (openings 60, 90, 120 degrees)
RANDOM_BRANCH_SCALE = 0.1        # mixed3b's random 3x3/5x5/pool branches, relative to lucent's init
SEED = 16
# mixed3a channels of the planted features (concat order: 1x1 0-63, 3x3 64-191, 5x5 192-223, pool 224-255)
MIXED3A_COLOUR, MIXED3A_TEXTURE, MIXED3A_LINE, MIXED3A_CURVE = 0, 8, 64, 192


def curve_orientations() -> np.ndarray:
    return np.arange(N_CURVES) * (360.0 / N_CURVES)


def edge_orientations() -> np.ndarray:
    return np.arange(N_EDGE) * (180.0 / N_EDGE)


# ---------------------------------------------------------------------------------------------- geometry
def _unit(deg: float | np.ndarray) -> tuple:
    """(dx, dy) on screen (y down) of the direction deg, counter-clockwise."""
    rad = np.deg2rad(deg)
    return np.cos(rad), -np.sin(rad)


def _splat(grid: np.ndarray, y: float, x: float, value: np.ndarray) -> None:
    """Add value (n_orient,) at fractional grid position (y, x) of grid (n_orient, K, K), bilinearly."""
    y0, x0 = math.floor(y), math.floor(x)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < grid.shape[1] and 0 <= xx < grid.shape[2] and wy * wx > 0:
                grid[:, yy, xx] += wy * wx * value


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


def _edge_kernel(normal: float, sigma_across: float = 1.2, sigma_along: float = 2.0) -> np.ndarray:
    """(7, 7) derivative of an elongated Gaussian across the edge normal; a 0 -> 255 step across it gives 1."""
    offsets = np.arange(-3, 4)
    dx, dy = np.meshgrid(offsets, offsets)  # [row = dy, column = dx]
    nx, ny = _unit(normal)
    across, along = dx * nx + dy * ny, -dx * ny + dy * nx
    kernel = across * np.exp(-across**2 / (2 * sigma_across**2) - along**2 / (2 * sigma_along**2))
    return kernel / (255.0 * kernel[across > 0].sum())


def _gaussian(size: int, sigma: float) -> np.ndarray:
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets[:, None] ** 2 + offsets[None] ** 2) / (2 * sigma**2))
    return g / g.sum()


def _tensor(a: np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def _set(net: nn.Module, name: str, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
    conv = getattr(net, f"{name}_pre_relu_conv")
    if tuple(weight.shape) != tuple(conv.weight.shape):
        raise AssertionError(f"{name}: weight {weight.shape} != {tuple(conv.weight.shape)}")
    conv.weight.data.copy_(_tensor(weight))
    conv.bias.data.copy_(_tensor(bias if bias is not None else np.zeros(weight.shape[0])))


def _early_layers(net: nn.Module) -> None:
    """conv2d0, conv2d1, conv2d2: orientation energy (16 channels) and colour (8 channels)."""
    w0 = np.zeros((64, 3, 7, 7))
    for i, normal in enumerate(edge_orientations()):
        kernel = _edge_kernel(normal) / 3  # the same on R, G, B: a grey-level edge
        w0[2 * i], w0[2 * i + 1] = kernel, -kernel
    blob = _gaussian(7, 1.5)
    for c, colour in enumerate(COLOURS):
        w0[2 * N_EDGE + c] = np.asarray(colour, dtype=float)[:, None, None] * blob / 255.0
    _set(net, "conv2d0", w0)
    w1 = np.zeros((64, 64, 1, 1))
    for i in range(N_EDGE):
        w1[i, 2 * i] = w1[i, 2 * i + 1] = 1.0  # |edge|: both signs, each rectified
    for c in range(len(COLOURS)):
        w1[N_EDGE + c, 2 * N_EDGE + c] = 1.0
    _set(net, "conv2d1", w1)
    # Each orientation's energy over its own peak (the pixel grid favours some orientations), minus the mean
    # over orientations: a sharper orientation tuning, the same for every orientation.
    peak = _line_peaks(net, "conv2d1_pre_relu_conv")
    w2 = np.zeros((192, 64, 3, 3))
    for i in range(N_EDGE):
        w2[i, :N_EDGE, 1, 1] = -EDGE_INHIBITION / N_EDGE / peak
        w2[i, i, 1, 1] += 1.0 / peak[i]
    for c in range(len(COLOURS)):
        w2[N_EDGE + c, N_EDGE + c, 1, 1] = 1.0
    _set(net, "conv2d2", w2)


EDGE_INHIBITION = 1.0


def _mixed3a_unscaled(net: nn.Module) -> None:
    """mixed3a's planted kernels with unit gain and no threshold (``_calibrate`` sets both)."""
    w1 = np.zeros((64, 192, 1, 1))
    for c in range(len(COLOURS)):
        w1[MIXED3A_COLOUR + c, N_EDGE + c] = 1.0
    w1[MIXED3A_TEXTURE, :N_EDGE] = 1.0 / N_EDGE
    _set(net, "mixed3a_1x1", w1)
    copy = np.zeros((96, 192, 1, 1))
    copy[np.arange(N_EDGE), np.arange(N_EDGE)] = 1.0
    _set(net, "mixed3a_3x3_bottleneck", copy)
    _set(net, "mixed3a_5x5_bottleneck", copy[:16])
    w3 = np.zeros((128, 96, 3, 3))
    for i, normal in enumerate(edge_orientations()):
        template = line_template(normal)
        w3[MIXED3A_LINE - 64 + i, :N_EDGE] = template - template.sum(0, keepdims=True) / N_EDGE  # other orientations inhibit
    _set(net, "mixed3a_3x3", w3)
    w5 = np.stack([curve_template(theta) for theta in curve_orientations()])
    _set(net, "mixed3a_5x5", w5)
    _set(net, "mixed3a_pool_reduce", np.zeros((32, 192, 1, 1)))


# ---------------------------------------------------------------------------------------------- calibration
CALIBRATION_SIZE = 95  # stimulus_size("mixed3b"): its centre is the receptive-field centre of position (5, 5)


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


def _responses(net: nn.Module, step: str, images: Tensor, everywhere: bool = False) -> Tensor:
    """(B, C) pre-activations of conv step ``step`` at the centre position of CALIBRATION_SIZE images;
    everywhere: (B * positions, C) at every position away from the border."""
    from .extractor import run_steps  # the extractor's own code path

    with torch.inference_mode():
        out = run_steps(net, ancestors(step), {INPUT: preprocess(images)})
    if everywhere:
        return out[:, :, 3:-3, 3:-3].permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    return out[:, :, out.shape[2] // 2, out.shape[3] // 2]


@cache
def _photographs(size: int = 224) -> Tensor:
    """(8, 3, size, size) uint8: scikit-image's bundled photographs (``data=sample``'s), squashed to size."""
    import skimage.data

    from sae.data.images import SAMPLE_PHOTOS

    images = []
    for name in SAMPLE_PHOTOS:
        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array
        array = np.repeat(array[..., None], 3, 2) if array.ndim == 2 else array[..., :3]
        image = torch.as_tensor(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()
        images.append(nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True))
    return torch.cat(images).round().clamp(0, 255).to(torch.uint8)


def _stroke_set(theta: float, radii: tuple[float, ...]) -> Tensor:
    """Strokes bulging towards theta at ``radii`` (inf: the straight line), widths 2 and 4, both polarities."""
    return torch.cat([render_stroke(theta, r, w, p) for r in radii for w in (2.0, 4.0) for p in (1, -1)])


def _symmetry_class(index: np.ndarray, per_quadrant: int) -> np.ndarray:
    """Orientation indices, ``per_quadrant`` of them per 90 degrees -> the index in 0..per_quadrant (0-45 degrees)
    that the pixel grid's symmetries (quarter turns, mirrors) map each to."""
    octant = index % (2 * per_quadrant)
    return np.minimum(octant, 2 * per_quadrant - octant)


def _line_peaks(net: nn.Module, step: str) -> np.ndarray:
    """(N_EDGE,) each orientation channel's largest response at ``step`` to its preferred straight line."""
    per_quadrant = N_EDGE // 4
    images = torch.cat([_stroke_set(normal, (math.inf,)) for normal in edge_orientations()[: per_quadrant + 1]])
    r = _responses(net, step, images).view(per_quadrant + 1, 4, -1).amax(1).double().numpy()
    representative = _symmetry_class(np.arange(N_EDGE), per_quadrant)
    return r[representative, representative]


def _scale(net: nn.Module, name: str, channels: np.ndarray, peak: np.ndarray, threshold: np.ndarray) -> None:
    """Channels of ``name``: subtract threshold, then scale so the preferred stimulus gives 1 (``_equalize`` then
    rescales them to their natural-image scale)."""
    conv = getattr(net, f"{name}_pre_relu_conv")
    channels = torch.as_tensor(channels, dtype=torch.long)
    gain = 1.0 / (peak - threshold)
    conv.bias.data[channels] = _tensor(-threshold * gain)
    conv.weight.data[channels] *= _tensor(gain)[:, None, None, None]


def _calibrate(net: nn.Module) -> None:
    """Thresholds and gains of mixed3a's planted detectors, from their responses to their preferred stimuli."""
    # One representative per symmetry class of the pixel grid (rotations by 90 degrees, mirrors): 0-45 degrees.
    per_quadrant = N_CURVES // 8
    images = torch.cat([_stroke_set(theta, (15.0, 20.0, 28.0, math.inf)) for theta in curve_orientations()[: per_quadrant + 1]])
    r = _responses(net, "mixed3a_5x5_pre_relu_conv", images).view(per_quadrant + 1, 16, -1)
    r = r[torch.arange(per_quadrant + 1), :, torch.arange(per_quadrant + 1)].double().numpy()
    representative = _symmetry_class(np.arange(N_CURVES), per_quadrant)
    curve_peak, line_peak = r[representative, :-4].max(1), r[representative, -4:].max(1)
    # Thresholds at the same firing rate on photographs for every orientation (and above the tangent line's
    # response): photographs hold more horizontal and vertical edges than oblique ones, which the arcs of some
    # orientations pick up, so one threshold relative to the preferred stimulus would leave some curves silent.
    photos = _photographs()
    clutter = _responses(net, "mixed3a_5x5_pre_relu_conv", photos, everywhere=True)[:, :N_CURVES]
    clutter = clutter.quantile(1 - PHOTO_FIRING, dim=0).double().numpy()
    threshold = np.maximum(LINE_LEAK * line_peak, clutter)  # half the tangent line's drive: curves beat lines 3x+
    _scale(net, "mixed3a_5x5", np.arange(N_CURVES), curve_peak, threshold)
    peak = _line_peaks(net, "mixed3a_3x3_pre_relu_conv")
    clutter = _responses(net, "mixed3a_3x3_pre_relu_conv", photos, everywhere=True)[:, :N_EDGE]
    clutter = clutter.quantile(1 - PHOTO_FIRING, dim=0).double().numpy()
    _scale(net, "mixed3a_3x3", np.arange(N_EDGE), peak, clutter)
    colour = torch.stack([(127.5 + 127.5 * _tensor(c) / max(abs(v) for v in c)).round() for c in COLOURS])  # saturated
    images = colour[:, :, None, None].expand(-1, 3, CALIBRATION_SIZE, CALIBRATION_SIZE).to(torch.uint8)
    peak = _responses(net, "mixed3a_1x1_pre_relu_conv", images).diagonal()[: len(COLOURS)].double().numpy()
    _scale(net, "mixed3a_1x1", np.arange(len(COLOURS)), peak, COLOUR_THRESHOLD * peak)
    noise = torch.Generator().manual_seed(SEED)
    blocks = (torch.rand(4, 1, CALIBRATION_SIZE // 3 + 1, CALIBRATION_SIZE // 3 + 1, generator=noise) > 0.5) * 255.0
    texture = nn.functional.interpolate(blocks, scale_factor=3)[..., :CALIBRATION_SIZE, :CALIBRATION_SIZE]
    peak = float(_responses(net, "mixed3a_1x1_pre_relu_conv", texture.expand(-1, 3, -1, -1).to(torch.uint8))[:, MIXED3A_TEXTURE].max())
    _scale(net, "mixed3a_1x1", np.array([MIXED3A_TEXTURE]), np.array([peak]), np.array([TEXTURE_THRESHOLD * peak]))
    _equalize(net, photos)


def _equalize(net: nn.Module, photos: Tensor) -> None:
    """Every planted mixed3a feature's mean activation where it fires on the photographs becomes 1: detectors of
    rare, low-contrast patterns (curves) then weigh as much in mixed3b's reconstruction error as colour."""
    features = _features()
    activations = _responses(net, "mixed3a", photos, everywhere=True)
    for feature in features:
        active = activations[:, feature.mixed3a_channel]
        mean = float(active[active > 0].mean()) if (active > 0).any() else 1.0
        branch, channel = _mixed3a_branch(feature.mixed3a_channel)
        conv = getattr(net, f"{branch}_pre_relu_conv")
        conv.weight.data[channel] /= mean
        conv.bias.data[channel] /= mean


def _mixed3a_branch(channel: int) -> tuple[str, int]:
    """mixed3a concat channel -> (branch name, channel within it)."""
    for branch, start, size in (("mixed3a_1x1", 0, 64), ("mixed3a_3x3", 64, 128), ("mixed3a_5x5", 192, 32),
                                ("mixed3a_pool_reduce", 224, 32)):
        if start <= channel < start + size:
            return branch, channel - start
    raise AssertionError(channel)


COLOUR_THRESHOLD, TEXTURE_THRESHOLD = 0.4, 0.4
LINE_LEAK = 0.5
PHOTO_FIRING = 0.02  # each curve and line detector fires on this fraction of the sample photographs' positions


# ---------------------------------------------------------------------------------------------- mixed3b
@dataclass(frozen=True)
class _Feature:
    kind: str
    orientation: float      # degrees; nan when not oriented
    mixed3a_channel: int


def _features() -> list[_Feature]:
    """Every planted feature, in the order of ``planted_truth``: curves, lines, colours, texture."""
    nan = float("nan")
    return ([_Feature("curve", float(t), MIXED3A_CURVE + k) for k, t in enumerate(curve_orientations())]
            + [_Feature("line", float(o), MIXED3A_LINE + i) for i, o in enumerate(edge_orientations())]
            + [_Feature("colour", nan, MIXED3A_COLOUR + c) for c in range(len(COLOURS))]
            + [_Feature("texture", nan, MIXED3A_TEXTURE)])


@cache
def _mixing() -> tuple[np.ndarray, tuple[int | None, ...]]:
    """(n_features, 128) non-negative unit rows: each feature's weights into mixed3b's 1x1 channels; and each
    feature's pure channel (None when it only lives in superposition)."""
    rng = np.random.default_rng(SEED)
    features = _features()
    order = rng.permutation(128)
    pure_channels, poly_channels = order[: len(PURE_CURVES)], order[len(PURE_CURVES) : len(PURE_CURVES) + N_POLY]
    mixing = np.zeros((len(features), 128))
    pure: list[int | None] = [None] * len(features)
    load = np.zeros(N_POLY)
    for f, feature in enumerate(features):
        k = f if feature.kind == "curve" else -1
        if k in PURE_CURVES:
            channel = int(pure_channels[PURE_CURVES.index(k)])
            mixing[f, channel], pure[f] = 1.0, channel
            continue
        # the least-loaded polysemantic channels (ties broken at random): every channel holds 4-5 features
        chosen = np.lexsort((rng.random(N_POLY), load))[:FEATURES_PER_POLY]
        load[chosen] += 1
        weights = rng.uniform(0.5, 1.0, FEATURES_PER_POLY)
        mixing[f, poly_channels[chosen]] = weights / np.linalg.norm(weights)
    return mixing, tuple(pure)


def _mixed3b(net: nn.Module) -> None:
    mixing, _ = _mixing()
    w = np.zeros((128, 256, 1, 1))
    for f, feature in enumerate(_features()):
        w[:, feature.mixed3a_channel, 0, 0] += mixing[f]
    _set(net, "mixed3b_1x1", w)  # zero bias: non-negative inputs and weights, so the ReLU passes it unchanged
    for name in ("mixed3b_3x3", "mixed3b_5x5", "mixed3b_pool_reduce"):
        conv = getattr(net, f"{name}_pre_relu_conv")
        conv.weight.data *= RANDOM_BRANCH_SCALE  # relu(s z) = s relu(z): the branch's output scales by s
        conv.bias.data *= RANDOM_BRANCH_SCALE


def plant_(net: nn.Module) -> nn.Module:
    """Overwrite ``net``'s (lucent InceptionV1) weights up to mixed3b with the planted construction, in place."""
    with torch.no_grad():
        _early_layers(net)
        _mixed3a_unscaled(net)
        _calibrate(net)
        _mixed3b(net)
    return net


# ---------------------------------------------------------------------------------------------- truth
@dataclass(frozen=True)
class PlantedTruth:
    """The planted features of one layer.

    kind: per feature "curve" | "line" | "colour" | "texture"; orientation_deg (n_features,) degrees
    (curves: the bulge direction in [0, 360); lines: the normal in [0, 180); nan when not oriented);
    direction (n_features, C) unit vectors in the layer's channel space (the layer's activation, on the
    planted channels, is the sum of each feature's activation times its direction); pure_channel: the
    channel that is this feature alone, or None when it lives only in superposition.
    """

    layer: str
    kind: list[str]
    orientation_deg: np.ndarray
    direction: Tensor
    pure_channel: list[int | None]

    def __len__(self) -> int:
        return len(self.kind)

    def to_json(self) -> str:
        return json.dumps({
            "layer": self.layer, "kind": list(self.kind),
            "orientation_deg": [None if math.isnan(o) else float(o) for o in self.orientation_deg],
            "direction": self.direction.tolist(), "pure_channel": list(self.pure_channel),
        })

    @classmethod
    def from_json(cls, text: str) -> PlantedTruth:
        data = json.loads(text)
        return cls(
            layer=data["layer"], kind=list(data["kind"]),
            orientation_deg=np.array([math.nan if o is None else o for o in data["orientation_deg"]], dtype=np.float64),
            direction=torch.tensor(data["direction"], dtype=torch.float32),
            pure_channel=[None if c is None else int(c) for c in data["pure_channel"]],
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path


PLANTED_LAYERS = ("conv2d2", "mixed3a", "mixed3b")


def planted_truth(layer: str) -> PlantedTruth:
    """The ground truth of ``planted`` weights at conv2d2, mixed3a or mixed3b."""
    if layer not in PLANTED_LAYERS:
        raise ValueError(f"The planted network has known features at {', '.join(PLANTED_LAYERS)}; not at {layer!r}.")
    features = _features()
    if layer == "conv2d2":
        features = ([_Feature("line", float(o), i) for i, o in enumerate(edge_orientations())]
                    + [_Feature("colour", float("nan"), N_EDGE + c) for c in range(len(COLOURS))])
    direction = torch.zeros(len(features), layer_channels(layer))
    if layer == "mixed3b":
        mixing, pure = _mixing()
        direction[:, :128] = _tensor(mixing)
    else:
        pure = tuple(f.mixed3a_channel for f in features)
        direction[torch.arange(len(features)), torch.tensor(pure)] = 1.0
    return PlantedTruth(layer, [f.kind for f in features], np.array([f.orientation for f in features]),
                        direction, list(pure))
