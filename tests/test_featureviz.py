"""Feature visualization: lucent's parameterization on the truncated InceptionV1 (random weights, small images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.analysis.featureviz import (
    direction_objective,
    feature_directions,
    neuron_directions,
    optimize_directions,
    render_directions,
)
from sae.model import InceptionExtractor, load_inceptionv1
from sae.nn import build_sae


@pytest.fixture(scope="module")
def extractor():
    return InceptionExtractor("conv2d2", net=load_inceptionv1(pretrained=False))


def test_feature_directions__are_decoder_rows_and_neurons_one_hot():
    sae = build_sae("relu", 8, d_sae=16)
    torch.testing.assert_close(feature_directions(sae, [3, 0]), sae.W_dec.detach()[[3, 0]])
    assert neuron_directions(8, [2, 5]).tolist() == [[0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0]]
    with pytest.raises(ValueError, match="d_sae=16"):
        feature_directions(sae, [16])
    with pytest.raises(ValueError, match="d_in=8"):
        neuron_directions(8, [8])


def test_direction_objective__centre_position_or_sum_over_positions():
    acts = torch.zeros(2, 3, 5, 4)
    acts[0, 1, 2, 2] = 2.0  # image 0's centre (5 // 2, 4 // 2) on channel 1
    acts[1, 0, 0, 0] = 3.0  # image 1, off centre
    directions = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert direction_objective(acts, directions, "center").tolist() == [2.0, 0.0]
    assert direction_objective(acts, directions, "all").tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="center"):
        direction_objective(acts, directions, "corner")


@pytest.mark.parametrize("position", ["center", "all"])
def test_render__objective_increases_the_features_activation(extractor, position):
    torch.manual_seed(0)
    sae = build_sae("relu", extractor.d_in, d_sae=4 * extractor.d_in)
    directions = torch.cat([feature_directions(sae, [5]), neuron_directions(extractor.d_in, [7])])
    rendering = optimize_directions(extractor, directions, steps=16, image_size=40, position=position, lr=0.05)
    assert rendering.objective.shape == (16, 2)
    start, end = rendering.objective[:4].mean(0), rendering.objective[-4:].mean(0)
    # Deterministic (seeded): every direction's objective ends above where it started.
    assert bool((end > start).all()), (start, end)


def test_render__images_in_unit_range_seeded_and_training_rng_untouched(extractor):
    directions = neuron_directions(extractor.d_in, [1, 2, 3])
    torch.manual_seed(123)
    np.random.seed(123)
    expected_torch, expected_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    a = render_directions(extractor, directions, steps=3, image_size=32, seed=1)
    assert torch.equal(torch.rand(3), expected_torch) and np.array_equal(np.random.rand(3), expected_numpy)
    b = render_directions(extractor, directions, steps=3, image_size=32, seed=1)
    c = render_directions(extractor, directions, steps=3, image_size=32, seed=2)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_render__bad_directions_name_the_layer_width(extractor):
    with pytest.raises(ValueError, match=r"d_in=192.*conv2d2"):
        render_directions(extractor, torch.ones(2, 10), steps=1)
    with pytest.raises(ValueError, match="center"):
        render_directions(extractor, torch.ones(1, 192), steps=1, position="middle")
