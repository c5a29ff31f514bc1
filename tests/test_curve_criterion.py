"""The curve criterion's known answers and negative controls, its nulls, the planted-truth scoring and the
curve section's reporting (nulls beside every count, not-applicable layers), on hand-built units and the
real lucent InceptionV1 with random weights."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sae.analysis.curve_criterion import angular_distance, curve_detectors, natural_scale
from sae.analysis.curve_nulls import density_matched_directions, null_summary, poisson_tail
from sae.analysis.curve_planted import planted_recovery, wheel_overlay
from sae.analysis.curve_plots import wheel_verdict
from sae.analysis.curves import Tuning, curve_ink, curve_stimuli, not_applicable, radial_tuning, unit_responses
from sae.model import InceptionExtractor
from tests.helpers import K, DrawnUnits, drawn_field, line_kernel

FIELD = drawn_field()

N = 64
THETA = torch.arange(N) * 360.0 / N


def bump(center: float, hwhm: float, height: float = 1.0) -> torch.Tensor:
    """A von Mises-like tuning bump (N,) with the given half-width at half-maximum (degrees)."""
    kappa = math.log(2) / (1 - math.cos(math.radians(hwhm)))
    return height * torch.exp(kappa * (torch.cos(torch.deg2rad(THETA - center)) - 1))


def tuning_of(curve: torch.Tensor, line: torch.Tensor | None = None, renderings: torch.Tensor | None = None) -> Tuning:
    """A Tuning of U units from (U, N) curve tuning (both renderings alike unless given)."""
    line = torch.full_like(curve, 0.1) if line is None else line
    by_rendering = torch.stack([curve, curve], 1) if renderings is None else renderings
    return Tuning(THETA, curve, line, torch.full_like(curve, 0.1), torch.tensor([1.0]), curve[:, None], by_rendering)


@pytest.fixture(scope="module")
def stimuli():
    return curve_stimuli(K, jitter=0.5)


def test_curve_detectors__hand_drawn_curve_kernels_pass_at_their_orientation(stimuli):
    orientations = [0.0, 50.0, 95.0, 140.0, 185.0, 230.0, 275.0, 320.0]
    kernels = [curve_ink(K, o, r * K, 2.0, K / 2) for o in orientations for r in (0.15, 0.3)]
    tuning = radial_tuning(unit_responses(DrawnUnits(kernels), None, stimuli, field=FIELD), stimuli)
    report = curve_detectors(tuning, natural_scale=tuning.curve.max(1).values)
    expected = torch.tensor([o for o in orientations for _ in range(2)])
    assert report.is_curve.all(), report.failures()
    error = angular_distance(report.preferred_orientation, expected).view(-1, 2)
    assert (error[:, 1] <= 360 / 64).all()  # radius 12 px: within one grid step
    assert (error[:, 0] <= 2 * 360 / 64).all()  # a 6 px radius semicircle is a blob of a few pixels


def test_curve_detectors__random_kernels_and_line_kernels_mostly_fail(stimuli):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(32, 1, K, K, generator=generator)
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)[:, 0]  # blobs of ~5 px, like strokes
    kernels = list(smooth) + [line_kernel(o) for o in (0.0, 45.0, 90.0, 135.0)]
    tuning = radial_tuning(unit_responses(DrawnUnits(kernels), None, stimuli, field=FIELD), stimuli)
    report = curve_detectors(tuning, natural_scale=tuning.curve.max(1).values)
    assert int(report.is_curve[:32].sum()) <= 2
    assert not report.is_curve[32:].any() and (report.curve_vs_line[32:] < 1.25).all()


def test_curve_detectors__a_one_bin_spike_fails_on_any_orientation_grid():
    spike = torch.zeros(1, N)
    spike[0, 10] = 1.0
    report = curve_detectors(tuning_of(spike))
    assert not report.is_curve.any() and not report.checks["half_width"].any()
    coarse = spike[:, ::4]  # 16 orientations: the spike is as wide as a grid step
    tuning = Tuning(THETA[::4], coarse, torch.zeros_like(coarse), torch.zeros_like(coarse), torch.tensor([1.0]),
                    coarse[:, None], torch.stack([coarse, coarse], 1))
    assert not curve_detectors(tuning).is_curve.any()


def test_curve_detectors__a_spike_in_one_rendering_fails_the_split():
    good = bump(120.0, 25.0)[None]
    only_one = torch.stack([good, torch.zeros_like(good)], 1)  # the other rendering never drives it
    report = curve_detectors(tuning_of(good, renderings=only_one))
    assert not report.checks["split"].any() and not report.is_curve.any()
    shifted = torch.stack([good, bump(170.0, 25.0)[None]], 1)  # the jittered copy prefers another orientation
    assert not curve_detectors(tuning_of(good, renderings=shifted)).is_curve.any()


def test_curve_detectors__weak_relative_to_its_natural_scale_fails():
    curve = torch.stack([bump(30.0, 25.0), bump(200.0, 25.0)])
    report = curve_detectors(tuning_of(curve), natural_scale=torch.tensor([1.0, 10.0]))
    assert report.is_curve.tolist() == [True, False]
    assert not report.checks["relative_peak"][1]
    silent = curve_detectors(tuning_of(curve), natural_scale=torch.tensor([0.0, 1.0]))
    assert not silent.is_curve[0]  # never fires on natural images: detects nothing there


def test_curve_detectors__a_unit_liking_lines_as_much_fails():
    curve = torch.stack([bump(30.0, 25.0), bump(30.0, 25.0)])
    line = torch.stack([torch.full((N,), 0.3), bump(30.0, 25.0)])
    report = curve_detectors(tuning_of(curve, line=line))
    assert report.is_curve.tolist() == [True, False]


def test_curve_detectors__a_broad_or_two_lobed_tuning_fails():
    broad = bump(90.0, 70.0)
    two_lobes = bump(90.0, 20.0) + bump(270.0, 20.0)
    report = curve_detectors(tuning_of(torch.stack([broad, two_lobes])))
    assert not report.is_curve.any()
    assert not report.checks["half_width"][0] and not report.checks["single_peak"][1]


def test_natural_scale__mean_of_the_top_images():
    image_max = torch.tensor([[1.0, -1.0], [3.0, -2.0], [2.0, -0.5]])
    assert torch.allclose(natural_scale(image_max, k=2), torch.tensor([2.5, 0.0]))


def test_density_matched_directions__fire_at_the_requested_densities():
    acts = torch.randn(6, 8, 10, 10)
    densities = torch.tensor([0.5, 0.1, 0.01, 0.0])
    null = density_matched_directions(acts, densities, seed=1)
    assert len(null) == 3  # a dead unit has no density to match
    rows = acts.permute(0, 2, 3, 1).reshape(-1, 8)
    fired = (null.respond(rows) > 0).float().mean(0)
    assert torch.allclose(fired, densities[:3], atol=2 / rows.shape[0])
    assert torch.allclose(null.directions.norm(dim=1), torch.ones(3))


def test_null_summary__a_count_far_above_chance_is_above_null():
    assert poisson_tail(0, 3.0) == 1.0 and poisson_tail(1, 0.0) == 0.0
    assert poisson_tail(2, 1.0) == pytest.approx(1 - 2 * math.exp(-1))
    high = null_summary(40, 1000, 1, 1000)
    low = null_summary(3, 1000, 2, 1000)
    assert high["above_null"] and not low["above_null"]
    assert high["expected"] == pytest.approx(1.0) and low["rate"] == pytest.approx(0.002)


def test_null_directions__rarely_pass_on_random_weights_inception():
    torch.manual_seed(0)
    extractor = InceptionExtractor("mixed3a", pretrained=False)
    images = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    images = torch.nn.functional.interpolate(images.float(), size=128, mode="bilinear").to(torch.uint8)
    from sae.analysis.curve_study import Probe, direction_family, image_maxima

    with torch.inference_mode():
        acts = extractor(images)
    probe = Probe.build(extractor, orientations=16)
    family = direction_family(probe, acts, torch.tensor([0.01, 0.001]).repeat_interleave(100), seed=0)
    assert family.report.n_curve <= 1, family.report.failures()
    assert image_maxima(acts).shape == (6, extractor.d_in)


def test_not_applicable__layers_too_small_for_a_curve():
    assert "too small" in not_applicable("conv2d0") and "too small" in not_applicable("conv2d1")
    assert not_applicable("conv2d2") is None and not_applicable("mixed3b") is None


def _report(is_curve, preferred) -> SimpleNamespace:
    return SimpleNamespace(is_curve=torch.tensor(is_curve), preferred_orientation=torch.tensor(preferred))


def test_planted_recovery__counts_features_neurons_and_false_positives():
    channels = 6
    eye = torch.eye(channels)
    truth = SimpleNamespace(  # 3 planted curves (the first with a pure channel 0) and a line
        layer="mixed3b", kind=["curve", "curve", "curve", "line"], orientation_deg=np.array([0.0, 90.0, 180.0, np.nan]),
        direction=torch.stack([eye[0], (eye[1] + eye[2]) / 2**0.5, (eye[3] + eye[4]) / 2**0.5, eye[5]]),
        pure_channel=[0, None, None, None])
    W_dec = torch.stack([eye[0], (eye[1] + eye[2]) / 2**0.5, (eye[3] + 0.9 * eye[4]), eye[5], eye[2]])
    features = _report([True, True, True, False, True], [1.0, 93.0, 200.0, 0.0, 10.0])
    neurons = _report([True, True, False, True, False, True], [2.0] + [0.0] * 5)
    result = planted_recovery(truth, W_dec, features, neurons)
    assert result["n_planted"] == 3 and result["n_pure"] == 1
    assert result["recovered_by_neurons"] == 1
    assert result["recovered_by_features"] == 2  # 0 and 90; 180 is matched but 20 degrees off
    assert result["recovered_by_features_not_by_neurons"] == 1 and result["n_not_covered_by_neurons"] == 2
    assert result["false_positive_features"] == 1  # feature 4 matches no planted curve
    assert result["false_positive_neurons"] == 1  # channel 5 carries no planted curve (only the line)
    assert result["passing_mixed_neurons"] == 2  # channels 1 and 3 mix planted curves: not false positives
    overlay = wheel_overlay(result)
    assert overlay["planted"].tolist() == [0.0, 90.0, 180.0] and overlay["features"].tolist() == [0.0, 90.0]
    null = {"expected": 7.5, "above_null": False}
    heading = wheel_verdict(4, null, result).splitlines()
    assert heading == ["planted: features recover 1 of the 2 curves no pure neuron covers",
                       "4 curve features; 7.5 expected by chance: NOT above null"]


def test_curve_section__counts_stand_beside_their_nulls(tmp_path):
    from sae.analysis.curve_study import curve_section
    from sae.analysis.sections import HeldOut
    from sae.nn import build_sae

    torch.manual_seed(0)
    extractor = InceptionExtractor("conv2d2", pretrained=False)
    images = torch.nn.functional.interpolate((torch.rand(4, 3, 12, 12) * 255), size=64, mode="bilinear")
    images = images.to(torch.uint8)
    with torch.inference_mode():
        held = HeldOut(images, extractor(images), "conv2d2")
    sae = build_sae("relu", extractor.d_in, expansion=1)
    cfg = OmegaConf.create({"orientations": 16, "batch_size": 64, "n_plot": 2, "criterion": {}, "jitter": None,
                            "scale_k": 2, "nulls": {"directions": True, "random_weights": True, "alpha": 0.05,
                                                   "seed": 0}})
    section = curve_section(extractor, sae, tmp_path, cfg, held, weights="lucid")
    metrics = section.metrics
    assert metrics["applicable"] and set(metrics["null"]) >= {"features", "neurons", "random_weights_neurons",
                                                               "gap_features_deg", "gap_neurons_and_features_deg"}
    assert set(metrics["above_null"]) == {"features", "neurons", "random_weights_neurons"}
    assert all(("above null" in v) or ("NOT ABOVE NULL" in v) for v in metrics["verdict"].values())
    assert (tmp_path / "curves_orientations.png").is_file() and (tmp_path / "curves.csv").is_file()
    small = curve_section(InceptionExtractor("conv2d1", pretrained=False), sae, tmp_path, cfg, held)
    assert small.metrics == {"applicable": False, "reason": not_applicable("conv2d1")}


def test_numeric_leaves__nested_counts_and_null_flags_reach_wandb():
    from evaluate import numeric_leaves

    metrics = {"run": {"layer": "mixed3b"}, "curves": {
        "n_curve_features": 3, "null": {"features": {"n_curve": 1, "above_null": False}},
        "above_null": {"features": True}, "criterion": {"min_half_width": 10.0}, "verdict": {"features": "x"}}}
    flat = numeric_leaves(metrics)
    assert flat == {"curves/n_curve_features": 3, "curves/null/features/n_curve": 1,
                    "curves/null/features/above_null": 0, "curves/above_null/features": 1}
