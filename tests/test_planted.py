"""The known-answer InceptionV1 (model.weights=planted): its planted features are where planted_truth says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.analysis.curves import curve_stimuli, radial_tuning, stimulus_size, unit_responses
from sae.model import InceptionExtractor, load_inceptionv1
from sae.model.planted import N_CURVES, PURE_CURVES, PlantedTruth, planted_truth

BIN = 360.0 / 64


@pytest.fixture(scope="module")
def net():
    return load_inceptionv1(weights="planted")


@pytest.fixture(scope="module")
def mixed3b_tuning(net):
    """Tuning of every planted feature (its activation: its own mixed3a channel, which mixed3b carries along its
    direction) and of every mixed3b channel, on mixed3b-sized stimuli."""
    size = stimulus_size("mixed3b")
    stimuli = curve_stimuli(size, radii=[size * 0.15, size * 0.3], widths=[2.0], polarities=(1,), openings=(90.0,))
    features = unit_responses(InceptionExtractor("mixed3a", net=net), None, stimuli, units=planted_truth("mixed3a").pure_channel)
    channels = unit_responses(InceptionExtractor("mixed3b", net=net), None, stimuli)
    return planted_truth("mixed3b"), radial_tuning(features, stimuli), radial_tuning(channels, stimuli)


def _angle_error(a, b) -> np.ndarray:
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


def _preferred(tuning) -> np.ndarray:
    """Peak orientation of each unit's curve tuning, refined by a parabola through the peak and its neighbours."""
    t = tuning.curve.clamp_min(0).numpy()
    n = t.shape[1]
    peak = t.argmax(1)
    left, mid, right = (t[np.arange(len(t)), (peak + d) % n] for d in (-1, 0, 1))
    curvature = left - 2 * mid + right
    offset = np.where(curvature < 0, 0.5 * (left - right) / np.minimum(curvature, -1e-12), 0.0)
    return (peak + np.clip(offset, -0.5, 0.5)) * (360.0 / n)


def test_planted_curves__tuning_peaks_within_one_bin_of_the_planted_orientation(mixed3b_tuning):
    truth, features, channels = mixed3b_tuning
    curves = [i for i, kind in enumerate(truth.kind) if kind == "curve"]
    assert len(curves) == N_CURVES
    errors = _angle_error(_preferred(features)[curves], truth.orientation_deg[curves])
    assert errors.max() <= BIN, dict(zip(truth.orientation_deg[curves], errors.round(1)))
    # curves beat their tangent lines and 90-degree angles
    peak = features.curve.max(1).values[curves]
    assert (peak > 1.5 * features.line.max(1).values[curves]).all()
    assert (peak > 1.5 * features.angle.max(1).values[curves]).all()
    # a pure channel alone carries its curve: its own tuning peaks at the planted orientation
    pure = [i for i in curves if truth.pure_channel[i] is not None]
    own = _preferred(channels)[[truth.pure_channel[i] for i in pure]]
    assert _angle_error(own, truth.orientation_deg[pure]).max() <= BIN


def test_planted_truth__pure_channels_hold_one_feature_and_the_rest_are_polysemantic():
    truth = planted_truth("mixed3b")
    assert truth.direction.shape == (len(truth), 480)
    torch.testing.assert_close(truth.direction.norm(dim=1), torch.ones(len(truth)))
    assert (truth.direction >= 0).all()
    pure = [c for c in truth.pure_channel if c is not None]
    assert len(pure) == len(PURE_CURVES) == len(set(pure))
    assert {truth.kind[i] for i, c in enumerate(truth.pure_channel) if c is not None} == {"curve"}
    pure_orientations = sorted(truth.orientation_deg[[i for i, c in enumerate(truth.pure_channel) if c is not None]])
    assert max(np.diff(pure_orientations).max(), 360 - pure_orientations[-1] + pure_orientations[0]) >= 180  # a gap
    loads = (truth.direction > 0).sum(0)
    for i, channel in enumerate(truth.pure_channel):
        if channel is not None:
            assert truth.direction[i, channel] == 1 and loads[channel] == 1
        else:
            assert (loads[truth.direction[i] > 0] >= 2).all()  # every channel it uses also carries another feature
    kinds = set(truth.kind)
    assert {"curve", "line", "colour"} <= kinds


def test_planted_net__mixed3b_is_the_planted_features_times_their_directions(net):
    size = stimulus_size("mixed3b")
    stimuli = curve_stimuli(size, orientations=8, radii=[size * 0.3], widths=[2.0], polarities=(1,), openings=(90.0,))
    images = torch.cat([stimuli.images, torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)])
    with torch.inference_mode():
        mixed3a = InceptionExtractor("mixed3a", net=net)(images)
        mixed3b = InceptionExtractor("mixed3b", net=net)(images)
    a, b = planted_truth("mixed3a"), planted_truth("mixed3b")
    assert a.kind == b.kind and np.array_equal(a.orientation_deg, b.orientation_deg, equal_nan=True)
    activations = mixed3a[:, a.pure_channel]  # (B, n_features, h, w): each feature's own mixed3a channel
    planted = torch.einsum("bfhw,fc->bchw", activations, b.direction)
    planted_channels = b.direction.abs().sum(0) > 0
    torch.testing.assert_close(mixed3b[:, planted_channels], planted[:, planted_channels], atol=1e-5, rtol=1e-4)


def test_planted_net__is_deterministic_and_recorded_as_planted(net):
    again = load_inceptionv1(weights="planted")
    for (name, p), q in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert InceptionExtractor("mixed3b", net=again).weights_source == "planted"


@pytest.mark.parametrize("layer", ["conv2d2", "mixed3a", "mixed3b"])
def test_planted_truth__json_round_trip(layer):
    truth = planted_truth(layer)
    back = PlantedTruth.from_json(truth.to_json())
    assert back.layer == layer and back.kind == truth.kind and back.pure_channel == truth.pure_channel
    assert np.array_equal(back.orientation_deg, truth.orientation_deg, equal_nan=True)
    torch.testing.assert_close(back.direction, truth.direction)


def test_planted_truth__other_layers_are_refused():
    with pytest.raises(ValueError, match="mixed3b"):
        planted_truth("mixed4a")


def test_planted_conv2d2__line_channels_prefer_lines_at_their_planted_normal(net):
    size = 2 * stimulus_size("conv2d2") + 1
    stimuli = curve_stimuli(size, radii=[size * 0.3], widths=[2.0], polarities=(1,), openings=(90.0,))
    truth = planted_truth("conv2d2")
    lines = [i for i, kind in enumerate(truth.kind) if kind == "line"]
    responses = unit_responses(InceptionExtractor("conv2d2", net=net), None, stimuli,
                               units=[truth.pure_channel[i] for i in lines])
    tuning = radial_tuning(responses, stimuli).line.numpy()  # a line at theta has its normal at theta
    preferred = tuning.argmax(1) * (360.0 / tuning.shape[1]) % 180.0
    errors = np.abs((preferred - truth.orientation_deg[lines] + 90.0) % 180.0 - 90.0)
    assert errors.max() <= BIN, errors
