"""The interpretability index: identical top images score the maximum (0), unrelated noise lower, for every
distance; the by-index path equals the direct one; LPIPS matches the lpips package and fails clearly offline."""

from __future__ import annotations

import socket

import pytest
import torch

from sae.analysis.interpretability import (
    LPIPSDistance, LPIPSWeightsUnavailableError, MeanColourDistance, PixelL2, backbone_cache_path, build_distance,
    interpretability_index, interpretability_index_by_index, interpretability_index_from_distances, pairwise_distances, top_images, top_indices,
    unit_interpretability,
)
from sae.model import WeightsUnavailableError

S = 64  # px


def _noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (*shape, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def random_lpips():
    return LPIPSDistance(pretrained=False)


@pytest.fixture(scope="module", params=["pixel", "mean_colour", "lpips"])
def distance(request, random_lpips):
    return random_lpips if request.param == "lpips" else build_distance(request.param)


def test_ii__identical_images_are_maximal_and_noise_is_lower(distance):
    identical = _noise(1, 1).expand(3, 5, -1, -1, -1)  # each unit's 5 top images are one image
    unrelated = _noise(3, 5, seed=1)
    ii_identical, ii_unrelated = interpretability_index(identical, distance), interpretability_index(unrelated, distance)
    assert ii_identical.shape == ii_unrelated.shape == (3,)
    assert torch.allclose(ii_identical, torch.zeros(3), atol=1e-6)
    assert (ii_unrelated < -1e-4).all()


def test_ii__a_unit_of_similar_images_beats_one_of_unrelated_images(distance):
    base = _noise(1, seed=2).float()
    similar = (base + torch.randn(5, 3, S, S, generator=torch.Generator().manual_seed(3)) * 10).clamp(0, 255) / 255
    unrelated = _noise(5, seed=4).float() / 255
    ii = interpretability_index(torch.stack([similar, unrelated]), distance)
    assert ii[0] > ii[1]


def test_ii__uint8_and_unit_float_images_agree():
    images = _noise(2, 5, seed=5)
    assert torch.allclose(interpretability_index(images, PixelL2()), interpretability_index(images.float() / 255, PixelL2()))


def test_pairwise_distances__equal_the_distance_of_each_pair(distance):
    bank = _noise(9, seed=6)
    matrix = pairwise_distances(bank, distance, batch_size=4, block=4)  # several blocks, both triangles
    i, j = torch.triu_indices(9, 9, offset=1)
    direct = distance(bank[i], bank[j])
    assert matrix.shape == (9, 9) and torch.equal(matrix, matrix.T) and torch.equal(matrix.diag(), torch.zeros(9))
    assert torch.allclose(matrix[i, j], direct, rtol=5e-3, atol=1e-5)  # LPIPS keeps embeddings in half precision


def test_ii__from_distances_equals_the_materialised_top_images(distance):
    bank = _noise(12, seed=6)
    activations = torch.randn(12, 7, generator=torch.Generator().manual_seed(7))
    top = top_indices(activations, k=5)
    assert top.shape == (7, 5) and torch.equal(top[:, 0], activations.argmax(0))
    direct = interpretability_index(top_images(activations, bank, k=5), distance)
    from_matrix = interpretability_index_from_distances(pairwise_distances(bank, distance), top)
    assert torch.allclose(from_matrix, direct, rtol=5e-3, atol=1e-5)
    assert torch.allclose(interpretability_index_by_index(bank, top[2:], distance), direct[2:], rtol=5e-3, atol=1e-5)


def test_unit_interpretability__dead_units_get_nan_and_the_rest_match():
    bank = _noise(10, seed=8)
    activations = torch.rand(10, 3, generator=torch.Generator().manual_seed(9))
    activations[:, 1] = 0.0  # a dead unit: no top images to speak of
    activations[:6, 2] = -1.0  # a unit with only 4 positive images
    activations[6:, 2] = 1.0
    distances = pairwise_distances(bank, PixelL2())
    ii = unit_interpretability(activations, distances, k=5)
    assert torch.isnan(ii[1]) and torch.isnan(ii[2]) and not torch.isnan(ii[0])
    assert torch.allclose(ii[0], interpretability_index(top_images(activations, bank)[:1], PixelL2())[0])
    assert not torch.isnan(unit_interpretability(activations, distances, min_activation=None)).any()
    with pytest.raises(ValueError, match="pairwise_distances"):
        unit_interpretability(activations, distances[:5, :5])


def test_distances__hand_computed_values():
    black, white = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    half = torch.cat([torch.zeros(1, 3, 4, 2), torch.ones(1, 3, 4, 2)], dim=3)
    assert torch.allclose(PixelL2()(black, white), torch.ones(1))
    assert torch.allclose(MeanColourDistance()(black, white), torch.tensor([3**0.5]))
    assert torch.allclose(MeanColourDistance()(half, torch.full_like(half, 0.5)), torch.zeros(1))  # same mean colour
    assert torch.allclose(PixelL2()(half, torch.full_like(half, 0.5)), torch.tensor([0.5]))


def test_lpips__matches_the_lpips_package_and_upsamples_small_crops(random_lpips):
    a, b = torch.rand(4, 3, S, S), torch.rand(4, 3, S, S)
    with torch.inference_mode():
        reference = random_lpips.model(a, b, normalize=True).flatten()
    assert torch.allclose(random_lpips(a, b), reference, atol=1e-5)
    crops = torch.rand(2, 3, 19, 19)  # a conv2d2 receptive field: too small for AlexNet as is
    assert random_lpips(crops, crops.flip(0)).shape == (2,)


def test_lpips__a_random_backbone_is_always_the_same_network():
    a, b = torch.rand(2, 3, S, S), torch.rand(2, 3, S, S)
    torch.manual_seed(123)  # whatever the global generator holds
    first = LPIPSDistance(pretrained=False)(a, b)
    assert torch.equal(first, LPIPSDistance(pretrained=False)(a, b))


def test_build_distance__unknown_names_say_what_exists():
    with pytest.raises(ValueError, match="'lpips'.*'pixel'.*'mean_colour'"):
        build_distance("ssim")
    with pytest.raises(ValueError, match="alex"):
        LPIPSDistance(net="resnet", pretrained=False)


def test_lpips__offline_error_names_url_cache_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, so the download is attempted
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # let torch.hub re-read TORCH_HOME; restored after

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    # Offline on every machine: a CI runner with network must not fetch 233 MB of AlexNet here.
    monkeypatch.setattr(socket, "create_connection", unreachable)
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(LPIPSWeightsUnavailableError) as caught:
        LPIPSDistance(net="alex")
    message = str(caught.value)
    cache = backbone_cache_path("alex")
    assert cache.startswith(str(tmp_path)) and cache.endswith("alexnet-owt-7be5be79.pth")
    for expected in ("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", cache, "TORCH_HOME",
                     "'pixel'", "'mean_colour'"):
        assert expected in message
    assert isinstance(caught.value, WeightsUnavailableError)  # evaluate.py prints it as one line
    assert socket.getdefaulttimeout() == timeout_before


def test_lpips__loads_cached_backbone_weights_into_every_stage(tmp_path, monkeypatch):
    from torchvision.models import alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.manual_seed(0)
    features = alexnet(weights=None).features
    cache = backbone_cache_path("alex")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    # The real file also holds the classifier, which LPIPS ignores; the features alone keep this test small.
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, cache)
    distance = LPIPSDistance(net="alex")
    stages = dict(distance.model.net.named_modules())
    for key, value in features.state_dict().items():
        index, param = key.split(".", 1)
        owner = next(m for name, m in stages.items() if name.endswith(f".{index}") and name.count(".") == 1)
        assert torch.equal(owner.get_parameter(param), value), key
    a, b = torch.rand(2, 3, S, S), torch.rand(2, 3, S, S)
    with torch.inference_mode():
        assert torch.allclose(distance(a, b), distance.model(a, b, normalize=True).flatten(), atol=1e-5)
