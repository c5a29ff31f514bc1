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
* mixed3a (stride 8, receptive field 59 px): 16 curve detectors in the 5x5 branch (channels 192-207), each an
  arc of orientation energy: samples of an arc of radius ``CURVE_RADIUS`` are splatted bilinearly over the 5x5
  grid and interpolated linearly across the 16 orientation channels, minus the tangent line's template (so
  curves beat lines) and a threshold; 16 line detectors in the 3x3 branch (64-79), 8 colour detectors and one
  texture (edge-density) detector in the 1x1 branch (0-8). Thresholds are set from responses to the preferred
  stimuli and from firing rates on scikit-image's sample photographs; each feature is then scaled so that its
  mean activation where it fires on those photographs is 1.
* mixed3b: the 1x1 branch is a non-negative mixing of those mixed3a channels with zero bias, so channels
  0-127 are exactly a linear superposition of the planted features: ``PURE_CURVES`` (6 orientations within
  half the circle, with gaps) get a channel each, the other 10 curves, the 16 lines, 8 colours and the texture
  detector share ``N_POLY`` polysemantic channels (each feature on 3, each channel holding 3-4 features). The 3x3, 5x5
  and pool branches (channels 128-479) keep their random weights, scaled by ``RANDOM_BRANCH_SCALE``.

The strokes, templates and kernels are in ``planted_geometry``.
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
from .planted_geometry import (CALIBRATION_SIZE, N_CURVES, N_EDGE, curve_orientations, curve_template, edge_kernel,
                               edge_orientations, gaussian_blob, line_template, render_stroke)
from .preprocess import preprocess

PLANTED = "planted"
PURE_CURVES = (0, 1, 2, 4, 5, 7)  # curve indices with a mixed3b channel of their own (0-157.5 deg, with gaps)
N_POLY = 32                      # polysemantic mixed3b channels
FEATURES_PER_POLY = 3            # channels each superposed feature loads on
COLOURS = ((1, -1, 0), (-1, 1, 0), (-0.5, -0.5, 1), (0.5, 0.5, -1), (1, 0, -1), (-1, 0, 1), (0, 1, -1), (0, -1, 1))
RANDOM_BRANCH_SCALE = 0.1        # mixed3b's random 3x3/5x5/pool branches, relative to lucent's init
SEED = 16
# mixed3a channels of the planted features (concat order: 1x1 0-63, 3x3 64-191, 5x5 192-223, pool 224-255)
MIXED3A_COLOUR, MIXED3A_TEXTURE, MIXED3A_LINE, MIXED3A_CURVE = 0, 8, 64, 192


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
        kernel = edge_kernel(normal) / 3  # the same on R, G, B: a grey-level edge
        w0[2 * i], w0[2 * i + 1] = kernel, -kernel
    blob = gaussian_blob(7, 1.5)
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
    w5 = np.zeros((32, 16, 5, 5))
    w5[:N_CURVES] = np.stack([curve_template(theta) for theta in curve_orientations()])
    _set(net, "mixed3a_5x5", w5)
    _set(net, "mixed3a_pool_reduce", np.zeros((32, 192, 1, 1)))


# ---------------------------------------------------------------------------------------------- calibration


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
        # the least-loaded polysemantic channels (ties broken at random): every channel holds 3-4 features
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
