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


def test_cosine_kmeans__identity_init_starts_from_the_neuron_axes():
    x = torch.eye(4).repeat(50, 1) + 0.01 * torch.rand(200, 4, generator=torch.Generator().manual_seed(0))
    centroids = cosine_kmeans(x, k=4, init="identity")
    assert torch.allclose(centroids, torch.eye(4), atol=0.02)  # axis i keeps the rows nearest to it
    with pytest.raises(ValueError, match="k == d"):
        cosine_kmeans(x, k=3, init="identity")


@pytest.mark.parametrize("name", ["kmeans", "pca", "ica", "nmf", "random"])
def test_fit_family__fits_on_training_rows_and_encodes_new_ones(name):
    from sae.analysis.directions import fit_family

    x, _ = _planted(n=600, d=12, k=4)
    x = x.clamp_min(0)  # activations after a ReLU, as NMF needs
    family = fit_family(name, x[:400], k=12, iters=200)
    assert family.vectors.shape == (12, 12) and torch.allclose(family.vectors.norm(dim=1), torch.ones(12), atol=1e-5)
    codes = family.encode(x[400:])
    assert codes.shape == (200, 12) and torch.isfinite(codes).all()
    assert family.info["k"] == 12 and (name != "kmeans" or family.info["init"] == "identity")


def test_fit_family__ica_finds_sparse_sources_with_their_heavy_tail_positive():
    from sae.analysis.directions import fit_family

    generator = torch.Generator().manual_seed(0)
    sources = torch.rand(3000, 4, generator=generator).pow(8)  # sparse, non-negative, positively skewed
    mixing = torch.nn.functional.normalize(torch.randn(4, 6, generator=generator), dim=1)
    family = fit_family("ica", sources @ mixing, k=4, iters=500)
    codes = family.encode(sources @ mixing)
    match = torch.corrcoef(torch.cat([codes.T, sources.T]))[:4, 4:]
    assert (match.max(dim=1).values > 0.95).all(), "each component is one source, with the sign that makes it positive"
