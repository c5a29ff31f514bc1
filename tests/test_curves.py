"""Curve detectors: stimuli, responses at the centred position, radial tuning and the criterion, on units
with a known answer (convolutions drawn by hand) and on the real lucent InceptionV1 (random weights)."""

from __future__ import annotations

import logging

import pytest
import torch

from sae.analysis.curve_plots import orientation_wheel, tuning_figure
from sae.analysis.curves import (
    KNOWN_CURVE_NEURONS, curve_detectors, curve_ink, curve_stimuli, orientation_gap, radial_tuning,
    receptive_field_center, stimulus_size, unit_responses,
)
from sae.model import InceptionExtractor, layer_shape, receptive_field
from sae.nn import build_sae
from tests.helpers import K, DrawnUnits, drawn_field, edge_kernel, kernel_coords, line_kernel

FIELD = drawn_field()  # a valid K x K convolution


@pytest.fixture(scope="module")
def stimuli():
    return curve_stimuli(K, jitter=0.5)  # half the stride of a stride-1 convolution, as the evaluation does


@pytest.fixture(scope="module")
def drawn_report(stimuli):
    kernels = [curve_ink(K, 100.0, 0.3 * K, 2.0, K / 2), curve_ink(K, 275.0, 0.15 * K, 2.0, K / 2),
               edge_kernel(30.0), line_kernel(60.0)]
    tuning = radial_tuning(unit_responses(DrawnUnits(kernels), None, stimuli, field=FIELD), stimuli)
    return tuning, curve_detectors(tuning)


def test_curve_stimuli__kinds_orientations_and_uint8_images(stimuli):
    n_orient = 64
    curves, lines, angles = (int((stimuli.kind == k).sum()) for k in ("curve", "line", "angle"))
    # As many stimuli per kind (4 radii / fitted lines / openings x 2 renderings x 2 polarities): a max over
    # more stimuli would be larger by chance alone.
    assert curves == lines == angles == n_orient * 4 * 2 * 2
    assert set(stimuli.rendering.tolist()) == {0, 1}
    assert stimuli.images.shape == (len(stimuli), 3, K, K) and stimuli.images.dtype == torch.uint8
    assert torch.allclose(stimuli.orientations, torch.arange(n_orient) * 360.0 / n_orient)
    assert float(stimuli.orientation.min()) == 0 and float(stimuli.orientation.max()) < 360
    assert stimuli.center == ((K - 1) / 2, (K - 1) / 2)
    dark = stimuli.images[torch.from_numpy(stimuli.kind == "curve") & (stimuli.polarity == 1)]
    assert int(dark[:, :, 0, 0].min()) == 255 and int(dark.flatten(1).min(1).values.max()) == 0  # ink on white
    centre = int((K - 1) / 2)
    centred = torch.from_numpy(stimuli.kind != "line") & (stimuli.rendering == 0)
    assert (stimuli.images[centred, 0, centre, centre] != stimuli.images[centred, 0, 0, 0]).all()  # through the centre


@pytest.mark.parametrize("theta, direction", [(0.0, (0, -1)), (90.0, (1, 0)), (180.0, (0, 1)), (270.0, (-1, 0))])
def test_curve_stimuli__a_curve_bulges_towards_its_orientation(theta, direction):
    # The arc's midpoint is at the centre and its ends trail away from the bulge, so its ink lies
    # behind the centre: left of it for 0 degrees (bulging right), below it for 90 (bulging up).
    ink = curve_ink(K, theta, 0.3 * K, 2.0, K / 2)
    y, x = kernel_coords()
    centroid = torch.stack([(ink * y).sum(), (ink * x).sum()]) / ink.sum()  # (y, x) relative to the centre
    sign = torch.where(centroid.abs() > 1, centroid.sign(), torch.zeros(2))  # under 1 px: symmetric
    assert tuple(sign.tolist()) == direction


def test_curve_detectors__a_curve_kernel_peaks_at_its_orientation_and_passes(drawn_report):
    tuning, report = drawn_report
    step = 360.0 / len(tuning.orientations)
    for unit, expected in ((0, 100.0), (1, 275.0)):
        error = abs((float(report.preferred_orientation[unit]) - expected + 180) % 360 - 180)
        assert error <= step, (unit, float(report.preferred_orientation[unit]))
        assert bool(report.is_curve[unit]) and bool(report.single_peak[unit])
        assert float(report.curve_vs_line[unit]) >= 1.25 and float(report.half_width[unit]) <= 45
    assert report.n_curve == 2


def test_curve_detectors__edge_and_line_units_fail(drawn_report):
    tuning, report = drawn_report
    assert not bool(report.is_curve[2]) and not bool(report.is_curve[3])
    assert float(report.curve_vs_line[3]) < 1.0  # the line unit prefers its line to any curve
    assert not bool(report.single_peak[3])  # a line looks the same at theta and theta + 180


def test_curve_detectors__flat_and_silent_tunings_are_not_curves(drawn_report):
    tuning, _ = drawn_report
    curve = torch.stack([torch.ones(64), -torch.ones(64)])  # flat; silent (never above zero)
    flat = type(tuning)(tuning.orientations, curve, torch.full((2, 64), 0.1), torch.full((2, 64), 0.1),
                        tuning.radii, curve[:, None].expand(-1, len(tuning.radii), -1))
    report = curve_detectors(flat)
    assert float(report.half_width[0]) == 180.0 and float(report.peak_sharpness[0]) == 1.0
    assert torch.isnan(report.preferred_orientation[1])  # no preferred orientation without a response
    assert not report.is_curve.any()


def test_radial_tuning__is_the_max_over_radius_width_and_polarity(stimuli):
    responses = torch.arange(len(stimuli), dtype=torch.float32)[:, None].repeat(1, 2)
    tuning = radial_tuning(responses, stimuli)
    curve = torch.from_numpy(stimuli.kind == "curve")
    last_curve_per_orientation = responses[curve][-64:, 0]  # the last radius/width/polarity block
    assert torch.equal(tuning.curve[0], last_curve_per_orientation)
    assert tuning.curve_by_radius.shape == (2, 4, 64) and tuning.line.shape == tuning.angle.shape == (2, 64)
    assert tuning.curve_by_rendering.shape == (2, 2, 64)


def test_orientation_gap__hand_made_sets():
    assert orientation_gap([]) == 360.0
    assert orientation_gap([42.0]) == 360.0
    assert orientation_gap([0, 90, 180, 270]) == 90.0
    assert orientation_gap([350.0, 10.0]) == pytest.approx(340.0)
    assert orientation_gap([-10.0, 370.0]) == pytest.approx(340.0)  # wrapped into [0, 360)
    assert orientation_gap(torch.arange(64) * 360 / 64) == pytest.approx(5.625)
    assert orientation_gap([0.0, float("nan"), 180.0]) == 180.0  # silent units have no orientation


@pytest.mark.parametrize("layer", ["conv2d0", "conv2d2", "mixed3b"])
def test_stimulus_size__the_image_centre_is_a_receptive_field_centre(layer):
    size = stimulus_size(layer)
    rf = receptive_field(layer)
    assert size >= rf.size
    assert receptive_field_center(layer, size) == ((size - 1) / 2, (size - 1) / 2)
    i = ((size - 1) / 2 - rf.offset) / rf.stride
    assert i == int(i) and int(i) < layer_shape(layer, size)[1]


@pytest.mark.parametrize("layer", ["conv2d0", "mixed3b"])
def test_unit_responses__inception_neurons_and_sae_features(layer, caplog):
    extractor = InceptionExtractor(layer, pretrained=False)
    size = stimulus_size(layer, min_size=32)
    stimuli = curve_stimuli(size, orientations=8, radii=(size / 4,), widths=(2.0,), openings=(90.0,))
    with caplog.at_level(logging.WARNING, logger="sae.analysis"):
        neurons = unit_responses(extractor, None, stimuli, batch_size=16)
    assert "off-centre" not in caplog.text
    assert neurons.shape == (len(stimuli), extractor.d_in) and neurons.dtype == torch.float32
    with torch.inference_mode():
        full = extractor(stimuli.images[:3])
    i = int(((size - 1) / 2 - receptive_field(layer).offset) / receptive_field(layer).stride)
    assert torch.allclose(neurons[:3], full[:, :, i, i])
    sae = build_sae("relu", extractor.d_in, expansion=2)
    features = unit_responses(extractor, sae, stimuli, units=[0, 5, 7], input_scale=0.5)
    with torch.inference_mode():
        assert torch.allclose(features, sae.encode(neurons * 0.5)[:, [0, 5, 7]], atol=1e-5)
    tuning = radial_tuning(neurons, stimuli)
    assert curve_detectors(tuning).is_curve.shape == (extractor.d_in,)


def test_unit_responses__warns_when_the_stimuli_are_off_centre(caplog):
    extractor = InceptionExtractor("conv2d0", pretrained=False)
    stimuli = curve_stimuli(32, orientations=8, radii=(8.0,), widths=(2.0,), openings=(90.0,), center=(16.0, 16.0))
    with caplog.at_level(logging.WARNING, logger="sae.analysis"):
        unit_responses(extractor, None, stimuli)
    assert "off-centre" in caplog.text and "stimulus_size" in caplog.text


def test_unit_responses__a_bare_callable_needs_a_field(stimuli):
    with pytest.raises(ValueError, match="field="):
        unit_responses(lambda images: images.float(), None, stimuli)


def test_plots__wheel_marks_known_neurons_and_tuning_figure_draws(drawn_report, tmp_path):
    tuning, report = drawn_report
    known = dict(zip(KNOWN_CURVE_NEURONS["mixed3b"], torch.linspace(0, 324, 10).tolist()))
    known[360] = float("nan")  # a known neuron silent to every stimulus (random weights) is left off
    wheel = orientation_wheel([10.0, 100.0], report.preferred_orientation[report.is_curve], known=known)
    assert "neurons 270°" in wheel.axes[0].get_title()
    wheel.savefig(tmp_path / "wheel.png")
    figure = tuning_figure(tuning, [0, 2, 3], ["curve 100°", "edge", "line"])
    figure.savefig(tmp_path / "tuning.png")
    assert (tmp_path / "wheel.png").stat().st_size > 0 and (tmp_path / "tuning.png").stat().st_size > 0
