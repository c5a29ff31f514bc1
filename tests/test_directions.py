"""Direction baselines: cosine k-means recovers planted directions; random directions are unit-norm and seeded."""

from __future__ import annotations

import pytest
import torch

from sae.analysis.directions import cosine_kmeans, direction_activations, random_directions


def _planted(n: int = 3000, d: int = 24, k: int = 6, noise: float = 0.15, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(k, d, generator=generator), dim=1)
    labels = torch.randint(k, (n,), generator=generator)
    norms = torch.rand(n, 1, generator=generator) * 10 + 0.1  # cosine k-means must ignore the norms
    x = (directions[labels] + noise * torch.randn(n, d, generator=generator) / d**0.5) * norms
    return x, directions


def test_cosine_kmeans__recovers_planted_directions():
    x, planted = _planted()
    centroids = cosine_kmeans(x, k=6)
    assert centroids.shape == (6, 24)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(6), atol=1e-5)
    similarity = centroids @ planted.T
    assert (similarity.max(dim=0).values > 0.99).all()  # every planted direction found ...
    assert len(set(similarity.argmax(dim=1).tolist())) == 6  # ... by a different centroid


def test_cosine_kmeans__is_seeded_and_ignores_zero_rows():
    x, _ = _planted(seed=1)
    x = torch.cat([x, torch.zeros(50, 24)])
    assert torch.equal(cosine_kmeans(x, 6, seed=3), cosine_kmeans(x, 6, seed=3))
    assert torch.isfinite(cosine_kmeans(x, 6)).all()


def test_cosine_kmeans__more_clusters_than_groups_leaves_none_empty():
    x, _ = _planted(n=400, k=2, noise=0.0)  # two distinct directions, asked for five clusters
    centroids = cosine_kmeans(x, k=5)
    assert centroids.shape == (5, 24) and torch.isfinite(centroids).all()


def test_cosine_kmeans__bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"k <= number of non-zero rows \(3\)"):
        cosine_kmeans(torch.randn(3, 4), k=4)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        cosine_kmeans(torch.randn(3, 4, 5), k=2)


def test_random_directions__unit_norm_and_seeded():
    a = random_directions(16, 32, seed=0)
    assert a.shape == (16, 32) and torch.allclose(a.norm(dim=1), torch.ones(16), atol=1e-6)
    assert torch.equal(a, random_directions(16, 32, seed=0))
    assert not torch.equal(a, random_directions(16, 32, seed=1))
    before = torch.random.get_rng_state()
    random_directions(4, 4, seed=0)
    assert torch.equal(before, torch.random.get_rng_state())  # leaves the global generator alone


def test_direction_activations__projects_onto_each_direction():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(direction_activations(x, directions), x)
    with pytest.raises(ValueError, match="d=2.*d=3"):
        direction_activations(x, torch.ones(1, 3))
