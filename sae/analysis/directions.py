"""Direction baselines for the interpretability index (Klindt et al. 2023): cosine k-means and random directions.

Klindt et al. find interpretable directions by clustering normalised activations with k-means; the
centroids are directions as a neuron or an SAE feature is, scored by the same interpretability index.
Random directions are the chance level.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 16384  # rows per similarity block: bounds memory at CHUNK * k floats however large N is
# k-means++ seeds from a random subsample of max(INIT_MIN_ROWS, INIT_ROWS_PER_CLUSTER * k) rows: its k
# sequential passes over all of N would cost more than the Lloyd steps, for seeds of the same quality.
INIT_MIN_ROWS, INIT_ROWS_PER_CLUSTER = 10_000, 20


def _normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _best_similarity(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Unit rows x (N, d), unit centroids (k, d) -> (N,) max cosine and (N,) index of its centroid."""
    values, indices = [], []
    for start in range(0, x.shape[0], CHUNK):
        best = (x[start : start + CHUNK] @ centroids.T).max(dim=1)
        values.append(best.values)
        indices.append(best.indices)
    return torch.cat(values), torch.cat(indices)


def _plus_plus_init(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007) with the cosine distance 1 - cos: unit rows x (N, d) -> (k, d)."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator, device=x.device))]
    distance = 1 - x @ x[chosen[0]]
    for _ in range(1, k):
        weights = distance.clamp_min(0).square()
        if float(weights.sum()) <= 0:  # fewer distinct directions than k: repeat points, fixed below
            weights = torch.ones_like(weights)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        distance = torch.minimum(distance, 1 - x @ x[chosen[-1]])
    return x[chosen].clone()


def cosine_kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0, tol: float = 1e-4) -> Tensor:
    """Spherical k-means: (N, d) activations -> (k, d) unit-norm centroids, on x's device.

    Rows are L2-normalised (all-zero rows dropped), seeded by k-means++ on 1 - cos (on a subsample of
    max(10k, 20 k) rows), then Lloyd steps:
    assign each row to its most similar centroid, set each centroid to the normalised mean of its rows.
    A cluster left empty is re-seeded with the row worst served by its centroid. Stops early once fewer
    than ``tol * N`` assignments change in a step. Cost: N k d multiply-adds per step; for a layer's
    millions of position vectors, fit on a random subsample of ~100k (Klindt et al. cluster a sample too).
    """
    if x.ndim != 2:
        raise ValueError(f"cosine_kmeans expects (N, d) activations, got {tuple(x.shape)}.")
    x = x.float()
    x = _normalise(x[x.norm(dim=1) > 0])
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"cosine_kmeans needs 1 <= k <= number of non-zero rows ({x.shape[0]}), got k={k}.")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    n_init = min(x.shape[0], max(INIT_MIN_ROWS, INIT_ROWS_PER_CLUSTER * k))
    subsample = torch.randperm(x.shape[0], generator=generator, device=x.device)[:n_init]
    centroids = _plus_plus_init(x[subsample], k, generator)
    assignment = None
    for _ in range(iters):
        similarity, new_assignment = _best_similarity(x, centroids)
        if assignment is not None and int((new_assignment != assignment).sum()) <= tol * x.shape[0]:
            break
        assignment = new_assignment
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            worst = similarity.topk(len(empty), largest=False).indices
            sums[empty] = x[worst]
        centroids = _normalise(sums)
    return centroids


def random_directions(k: int, d: int, seed: int = 0, device: str | torch.device | None = None) -> Tensor:
    """(k, d) directions uniform on the unit sphere (normalised Gaussians), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return _normalise(torch.randn(k, d, generator=generator)).to(device or "cpu")


def direction_activations(x: Tensor, directions: Tensor) -> Tensor:
    """(N, d) activations, (k, d) directions -> (N, k) projections x @ directions.T (not normalised: a
    direction's "activation" scales with the input's norm, as a neuron's does)."""
    if x.shape[-1] != directions.shape[-1]:
        raise ValueError(f"Activations have d={x.shape[-1]} but directions d={directions.shape[-1]}.")
    return x.float() @ directions.to(x.device, torch.float32).T
