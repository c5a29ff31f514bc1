"""Spliced-in fidelity on the real (random-weights) lucent InceptionV1: KL, top-1 agreement, KL gap recovered."""

from __future__ import annotations

import math

import pytest
import torch

from sae.analysis.fidelity import (
    channel_mean, fidelity_unavailable_reason, fraction_recovered, kl_divergence, sae_substitute, spliced_fidelity,
)
from sae.model import InceptionExtractor
from sae.nn import build_sae


@pytest.fixture(scope="module")
def mixed4e():
    """Activations of mixed4e (a block layer) for 2 random 224-px images, and the extractor."""
    extractor = InceptionExtractor("mixed4e", pretrained=False)
    images = torch.randint(0, 256, (2, 3, 224, 224), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.inference_mode():
        return extractor, extractor(images)


def identity_sae(d: int):
    """A ReLU SAE with W_enc = W_dec = I: exact on non-negative (post-ReLU) activations."""
    sae = build_sae("relu", d, d_sae=d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_kl_divergence__is_zero_for_equal_logits_and_matches_the_formula():
    logits = torch.randn(4, 10)
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(4), atol=1e-6)
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # (1/2, 1/2) vs (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(kl_divergence(p, q)) == pytest.approx(expected, rel=1e-5)


def test_fraction_recovered__one_for_a_perfect_sae_zero_for_one_as_bad_as_ablation():
    assert fraction_recovered(2.0, 0.0) == 1.0
    assert fraction_recovered(2.0, 2.0) == 0.0
    assert fraction_recovered(2.0, 3.0) < 0, "worse than ablating the layer is negative"
    assert math.isnan(fraction_recovered(0.0, 0.1))


def test_spliced_fidelity__an_exact_sae_recovers_everything(mixed4e):
    extractor, acts = mixed4e
    result = spliced_fidelity(extractor.net, "mixed4e", acts, sae_substitute(identity_sae(acts.shape[1])), batch_size=2)
    assert result.n_images == 2
    assert result.kl_sae == pytest.approx(0.0, abs=1e-5)
    assert result.top1_sae == 1.0
    assert result.kl_zero > 0 and result.kl_mean > 0, "ablating the layer changes the class distribution"
    assert result.recovered_zero == pytest.approx(1.0, abs=1e-3)
    assert result.recovered_mean == pytest.approx(1.0, abs=1e-3)


def test_spliced_fidelity__zero_ablation_as_the_substitute_recovers_nothing(mixed4e):
    extractor, acts = mixed4e
    result = spliced_fidelity(extractor.net, "mixed4e", acts, torch.zeros_like)
    assert result.kl_sae == pytest.approx(result.kl_zero, rel=1e-5)
    assert result.recovered_zero == pytest.approx(0.0, abs=1e-5)
    assert result.top1_sae == result.top1_zero


def test_sae_substitute__undoes_the_training_input_scale(mixed4e):
    _, acts = mixed4e
    sae = identity_sae(acts.shape[1])
    assert torch.allclose(sae_substitute(sae, input_scale=7.5)(acts[:1]), acts[:1], atol=1e-4)


def test_channel_mean__averages_over_images_and_positions():
    acts = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.allclose(channel_mean(acts), acts.permute(1, 0, 2, 3).reshape(3, -1).mean(dim=1))


def test_fidelity_unavailable_reason__names_block_layers_and_image_size():
    assert fidelity_unavailable_reason("mixed3b", 224) is None
    assert "inside a block" in fidelity_unavailable_reason("mixed3b_3x3", 224)
    assert fidelity_unavailable_reason("conv2d2", 224) is None, "conv2d2 is a block output"
    assert "224" in fidelity_unavailable_reason("mixed3b", 160)
