"""Direction baselines for the interpretability index (Klindt et al. 2023): cosine k-means, PCA, FastICA, NMF
and random directions.

Klindt et al. find interpretable directions by clustering normalised activations with k-means (started from
the neuron axes when there are as many clusters as neurons) and compare them with PCA, ICA and NMF; each
direction is a unit as a neuron or an SAE feature is, scored by the same interpretability index. Random
directions are the chance level. ``fit_family`` fits one family on training vectors and returns a
``Directions``, whose ``encode`` then scores vectors the fit never saw.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("sae.analysis")
FAMILIES = ("kmeans", "pca", "ica", "nmf", "random")

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


def cosine_kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0, tol: float = 1e-4,
                  init: str = "plus_plus") -> Tensor:
    """Spherical k-means: (N, d) activations -> (k, d) unit-norm centroids, on x's device.

    Rows are L2-normalised (all-zero rows dropped) and the centroids start from ``init``: "identity" (the
    neuron axes, Klindt et al.'s start; needs k == d) or "plus_plus" (k-means++ on 1 - cos, on a subsample
    of max(10k, 20 k) rows). Then Lloyd steps:
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
    if init == "identity":
        if k != x.shape[1]:
            raise ValueError(f"cosine_kmeans init='identity' starts from the {x.shape[1]} neuron axes: it needs "
                             f"k == d, got k={k}; use init='plus_plus'.")
        centroids = torch.eye(k, device=x.device)
    elif init == "plus_plus":
        n_init = min(x.shape[0], max(INIT_MIN_ROWS, INIT_ROWS_PER_CLUSTER * k))
        subsample = torch.randperm(x.shape[0], generator=generator, device=x.device)[:n_init]
        centroids = _plus_plus_init(x[subsample], k, generator)
    else:
        raise ValueError(f"cosine_kmeans init={init!r}: use 'identity' (the neuron axes) or 'plus_plus'.")
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


# ------------------------------------------------------------------------------------------ fitted families
@dataclass
class Directions:
    """A fitted family of k units: ``vectors`` (k, d) unit-norm directions in activation space (for
    comparing with known directions) and ``encode``: (R, d) activations -> (R, k) unit activations."""

    name: str
    vectors: Tensor
    encode: Callable[[Tensor], Tensor]
    info: dict


def _cosine_encoder(directions: Tensor) -> Callable[[Tensor], Tensor]:
    """A direction's activation is the cosine of each row with it (Klindt et al. cluster normalised rows)."""
    return lambda x: direction_activations(_normalise(x.float()), directions)


def _skew_signs(projections: np.ndarray) -> np.ndarray:
    """+1/-1 per column: the sign that puts each component's heavy tail (positive third moment) on the positive
    side, so a component's top images are its strong responses. PCA and ICA components have no sign of their own."""
    centred = projections - projections.mean(0)
    return np.where((centred**3).mean(0) >= 0, 1.0, -1.0)


def _sklearn_encoder(model, signs: np.ndarray, clip: bool = False) -> Callable[[Tensor], Tensor]:
    def encode(x: Tensor) -> Tensor:
        x = x.detach().float().cpu().numpy().astype(np.float64)
        return torch.from_numpy(model.transform(np.maximum(x, 0) if clip else x) * signs).float()

    return encode


def fit_family(name: str, x: Tensor, k: int, seed: int = 0, iters: int = 100, kmeans_init: str = "identity") -> Directions:
    """Fit one direction family on training activations x (N, d); k directions (PCA, ICA and NMF: at most d).

    kmeans: cosine k-means, from the neuron axes when kmeans_init='identity' and k == d (else k-means++);
    pca: principal axes of the centred rows; ica: FastICA unmixing filters (unit-variance whitening); nmf:
    non-negative factors of the rows clipped at 0 (a unit's activation is its NMF code, ``NMF.transform``);
    random: k uniform directions (no fit). PCA and ICA components are signed by ``_skew_signs``; iters caps
    the Lloyd / FastICA / NMF iterations.
    """
    d = x.shape[1]
    x = x.float().cpu()
    if name == "random":
        vectors = random_directions(k, d, seed=seed)
        return Directions(name, vectors, _cosine_encoder(vectors), {"k": k})
    if name == "kmeans":
        init = kmeans_init if (kmeans_init != "identity" or k == d) else "plus_plus"
        if init != kmeans_init:
            log.info("k-means: k=%d differs from d=%d, so it starts from k-means++ instead of the neuron axes", k, d)
        vectors = cosine_kmeans(x, k, iters=iters, seed=seed, init=init)
        return Directions(name, vectors, _cosine_encoder(vectors), {"k": k, "init": init})
    from sklearn.decomposition import NMF, PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    k = min(k, d, x.shape[0] - 1)
    data = x.numpy().astype(np.float64)
    info: dict = {"k": k}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if name == "pca":
            model = PCA(n_components=k, random_state=seed).fit(data)
            components, clip = model.components_, False
            info["explained_variance"] = float(model.explained_variance_ratio_.sum())
        elif name == "ica":
            model = FastICA(n_components=k, whiten="unit-variance", max_iter=iters, random_state=seed).fit(data)
            components, clip = model.components_, False
        elif name == "nmf":
            info["clipped_fraction"] = float((data < 0).mean())
            model = NMF(n_components=k, init="nndsvda", max_iter=iters, random_state=seed).fit(np.maximum(data, 0))
            components, clip = model.components_, True
        else:
            raise ValueError(f"unknown direction family {name!r}; use one of {', '.join(FAMILIES)}.")
    info["converged"] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not info["converged"]:
        log.warning("%s did not converge in %d iterations (its directions are used as they are)", name, iters)
    signs = np.ones(k) if clip else _skew_signs(model.transform(data))
    vectors = _normalise(torch.from_numpy(components * signs[:, None]).float())
    return Directions(name, vectors, _sklearn_encoder(model, signs, clip), info)
