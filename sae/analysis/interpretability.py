"""The interpretability index (Klindt et al. 2023, "Identifying interpretable visual features in artificial
and biological neural systems").

    II(u) = - mean over pairs {a, b} of u's top-k images of  distance(a, b)        (k = 5: 10 pairs)

A unit whose strongest images look alike scores near 0 (the maximum); one whose top images are
unrelated scores lower. The distance is pluggable; LPIPS with AlexNet is the paper's choice and pixel
L2 and mean-colour distance its controls (a high II under mean colour alone means "fires on one colour").

Every distance here is a function of a squared Euclidean distance between per-image embeddings,
distance(a, b) = ``from_squared``(||embed(a) - embed(b)||^2): the RMS pixel difference and the mean-colour
distance are square roots of one, and LPIPS is one exactly (its heads are non-negative 1x1 convolutions
of squared feature differences). So all the pairwise distances among M images are one Gram matrix of
their embeddings (``pairwise_distances``), each image embedded once, and computed once per distance
for every unit family (neurons, SAE features, k-means and random directions): ``unit_interpretability``
then only gathers. Images are float in [0, 1] or uint8, (n, 3, S, S).
"""

from __future__ import annotations

import http.client
import logging
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.model import WeightsUnavailableError
from sae.model.weights import hub_state_dict
from sae.safeload import torch_load

log = logging.getLogger("sae.analysis")

# The ImageNet backbones lpips builds through torchvision, by lpips's net name.
BACKBONE_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}
RANDOM_BACKBONE_SEED = 0
LPIPS_MIN_SIZE = 64  # px; smaller images (receptive-field crops of early layers) are upsampled to this


class LPIPSWeightsUnavailableError(WeightsUnavailableError):
    """The LPIPS backbone's ImageNet weights are neither cached nor downloadable."""


def as_unit_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] images (n, 3, S, S) -> float32 [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected RGB images of shape (n, 3, S, S), got {tuple(images.shape)}.")
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


class Distance:
    """A perceptual distance: ``distance(a, b) -> (n,)`` for image batches a, b of shape (n, 3, S, S)."""

    name = ""
    embedding_dtype: torch.dtype = torch.float32  # how pairwise_distances keeps the M embeddings

    def embed(self, images: Tensor) -> Tensor:
        """(n, 3, S, S) images -> (n, D) float embeddings."""
        raise NotImplementedError

    def from_squared(self, squared: Tensor) -> Tensor:
        """Squared embedding distances -> distances (elementwise)."""
        return squared.clamp_min(0).sqrt()

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise ValueError(f"Distances compare images pairwise: shapes {tuple(a.shape)} and {tuple(b.shape)} differ.")
        with torch.inference_mode():
            return self.from_squared((self.embed(a) - self.embed(b)).pow(2).sum(1)).float().cpu()


class PixelL2(Distance):
    """Root-mean-square pixel difference in [0, 1] units (the L2 distance over sqrt(3 S^2), size-free)."""

    name = "pixel"

    def embed(self, images: Tensor) -> Tensor:
        x = as_unit_float(images).flatten(1)
        return x / x.shape[1] ** 0.5


class MeanColourDistance(Distance):
    """Euclidean distance between the images' mean RGB colours, in [0, 1] units."""

    name = "mean_colour"

    def embed(self, images: Tensor) -> Tensor:
        return as_unit_float(images).mean(dim=(2, 3))


def backbone_cache_path(net: str) -> str:
    """Where torch.hub keeps the LPIPS backbone's weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(BACKBONE_URLS[net]).path))


def _backbone_state_dict(net: str) -> dict[str, Tensor]:
    url, cache = BACKBONE_URLS[net], backbone_cache_path(net)
    was_cached = os.path.isfile(cache)
    try:
        return hub_state_dict(url)
    except (OSError, http.client.HTTPException) as err:
        if was_cached:
            raise LPIPSWeightsUnavailableError(f"Cannot read the cached LPIPS weights {cache} ({err}); delete it and retry.") from err
        raise LPIPSWeightsUnavailableError(
            f"Cannot download the LPIPS {net} backbone weights from {url} into the torch hub cache {cache} "
            f"({type(err).__name__}: {err}). Fix: put a copy of that file at {cache} (or point TORCH_HOME at a "
            f"directory holding hub/checkpoints/{os.path.basename(cache)}), or use the distance 'pixel' or "
            f"'mean_colour' instead of 'lpips'."
        ) from err


def _load_backbone_(backbone: nn.Module, state: dict[str, Tensor], net: str) -> None:
    """Load torchvision ``features.<i>.*`` weights into lpips's slices (which keep torchvision's indices)."""
    layers = {name: module for sliced in backbone.children() for name, module in sliced.named_children()}
    loaded = set()
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue  # the classifier, which LPIPS does not use
        index, param = parts[1], ".".join(parts[2:])
        if index not in layers:
            continue  # layers past the last slice LPIPS reads (vgg's final conv block)
        target = layers[index].get_parameter(param)
        if target.shape != value.shape:
            raise LPIPSWeightsUnavailableError(f"{backbone_cache_path(net)}: {key} has shape {tuple(value.shape)}, "
                                               f"expected {tuple(target.shape)}; delete the file and retry.")
        with torch.no_grad():
            target.copy_(value)
        loaded.add(f"{index}.{param}")
    expected = {f"{name}.{p}" for name, module in layers.items() for p, _ in module.named_parameters()}
    if expected - loaded:
        raise LPIPSWeightsUnavailableError(f"{backbone_cache_path(net)} lacks {sorted(expected - loaded)[:5]}; "
                                           "delete the file and retry.")


class LPIPSDistance(Distance):
    """LPIPS (Zhang et al. 2018) from the ``lpips`` package: its calibrated linear heads (shipped with it)
    on an ImageNet backbone (downloaded once by torch.hub, with a clear error offline).

    ``pretrained=False`` keeps the backbone random: for tests only, never for a reported number.
    Images smaller than 64 px are upsampled (bilinear) so every AlexNet stage has a spatial extent.
    """

    name = "lpips"
    embedding_dtype = torch.float16  # cached per-image features: half the memory, ~1e-3 relative error

    def __init__(self, net: str = "alex", pretrained: bool = True, device: str | torch.device | None = None) -> None:
        import lpips  # imported here: it pulls in torchvision's model zoo, which only LPIPS needs

        if net not in BACKBONE_URLS:
            raise ValueError(f"LPIPS net={net!r} is unknown; use one of {', '.join(BACKBONE_URLS)} ('alex' in Klindt et al.).")
        self.net, self.pretrained = net, pretrained
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # pnet_rand=True builds the backbone without torchvision's own (silent-on-success, opaque-on-failure)
        # download; the weights are then loaded here from the same URL and cache, with our error.
        # A random backbone is always the same one (seed 0, whatever the global RNG), so test numbers repeat.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")  # lpips's `pretrained=`
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        # lpips's own heads (package data), read here weights-only: lpips's torch.load does not say so itself.
        heads = Path(lpips.__file__).parent / "weights" / f"v{self.model.version}" / f"{net}.pth"
        self.model.load_state_dict(torch_load(heads), strict=False)
        if pretrained:
            _load_backbone_(self.model.net, _backbone_state_dict(net), net)
        else:
            log.warning("LPIPS backbone has RANDOM weights (pretrained=False): its distances are not perceptual. "
                        "Use this for testing only.")
        self.model = self.model.eval().requires_grad_(False).to(self.device)
        self._heads = self._head_weights()

    def from_squared(self, squared: Tensor) -> Tensor:
        return squared.clamp_min(0)  # LPIPS is itself a (weighted, spatially averaged) squared distance

    def embed(self, images: Tensor) -> Tensor:
        """(n, 3, S, S) -> (n, D): per stage, the unit-normalised features (lpips's normalize_tensor) of the
        channels its head weighs, times sqrt(head weight / positions), flattened and concatenated."""
        x = as_unit_float(images).to(self.device)
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
            scale = LPIPS_MIN_SIZE / min(x.shape[-2:])
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        with torch.inference_mode():
            parts = []
            for stage, (keep, scale) in zip(self.model.net(self.model.scaling_layer(2 * x - 1)), self._heads):
                unit = stage / (stage.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                parts.append((unit[:, keep] * (scale / (unit.shape[2] * unit.shape[3]) ** 0.5)).flatten(1))
            return torch.cat(parts, dim=1)

    def _head_weights(self) -> list[tuple[Tensor, Tensor]]:
        """Per stage: the channels with a non-zero head weight, and sqrt of those weights (C', 1, 1)."""
        heads = []
        for head in self.model.lins:
            weight = head.model[-1].weight.detach().flatten()  # a 1x1 convolution to one channel, no bias
            if (weight < 0).any():
                raise ValueError("LPIPS heads with negative weights are not a squared distance; use lpips' own weights.")
            keep = (weight > 0).nonzero().flatten()
            heads.append((keep, weight[keep].sqrt().view(-1, 1, 1)))
        return heads


def build_distance(name: str, **kwargs) -> Distance:
    """"lpips" (kwargs: net, pretrained, device), "pixel" or "mean_colour"."""
    factories = {"lpips": LPIPSDistance, "pixel": PixelL2, "mean_colour": MeanColourDistance,
                 "mean_color": MeanColourDistance}
    if name not in factories:
        raise ValueError(f"Unknown distance {name!r}; use 'lpips' (Klindt et al.'s choice), 'pixel' or 'mean_colour'.")
    return factories[name](**kwargs)


# ------------------------------------------------------------------------------------------ the index
def top_indices(activations: Tensor, k: int = 5) -> Tensor:
    """(N_images, n_units) activations (max over positions) -> (n_units, k) indices of each unit's top images."""
    if activations.ndim != 2 or activations.shape[0] < k:
        raise ValueError(f"Expected (N_images >= k={k}, n_units) activations, got {tuple(activations.shape)}.")
    return activations.topk(k, dim=0).indices.T.contiguous()


def top_images(activations: Tensor, images: Tensor, k: int = 5) -> Tensor:
    """(N, n_units) activations, (N, 3, S, S) images -> (n_units, k, 3, S, S) each unit's top-k images.

    This materialises n_units * k images; for many units prefer ``unit_interpretability``, which indexes.
    """
    if images.shape[0] != activations.shape[0]:
        raise ValueError(f"{activations.shape[0]} activation rows but {images.shape[0]} images.")
    return images[top_indices(activations, k).to(images.device)]


def pairwise_distances(images: Tensor, distance: Distance, batch_size: int = 64, block: int = 256) -> Tensor:
    """(M, 3, S, S) images -> (M, M) float32 CPU matrix of distance(images[i], images[j]), zero diagonal.

    Each image is embedded once (kept in ``distance.embedding_dtype``: half precision for LPIPS, about
    1 GB for 1000 images at 224 px) and the matrix comes from block Gram products. Quadratic in M: meant
    for a held-out set of a few thousand images.
    """
    with torch.inference_mode():
        chunks = [distance.embed(images[s : s + batch_size]).to("cpu", distance.embedding_dtype)
                  for s in range(0, images.shape[0], batch_size)]
        embedded = torch.cat(chunks)
        m = embedded.shape[0]
        norms = torch.cat([embedded[s : s + block].float().pow(2).sum(1) for s in range(0, m, block)])
        squared = torch.empty(m, m)
        for i in range(0, m, block):
            rows = embedded[i : i + block].float()
            for j in range(i, m, block):
                gram = rows @ embedded[j : j + block].float().T
                part = norms[i : i + block, None] + norms[None, j : j + block] - 2 * gram
                if i == j:  # BLAS need not return an exactly symmetric X @ X.T
                    part = (part + part.T) / 2
                squared[i : i + block, j : j + block] = part
                squared[j : j + block, i : i + block] = part.T
        squared.fill_diagonal_(0)
        return distance.from_squared(squared).float()


def interpretability_index_from_distances(distances: Tensor, top: Tensor) -> Tensor:
    """(M, M) pairwise distances, (n_units, k) indices of each unit's top images -> (n_units,) II."""
    if top.ndim != 2 or top.shape[1] < 2:
        raise ValueError(f"Expected top indices of shape (n_units, k >= 2), got {tuple(top.shape)}.")
    top = top.long().to(distances.device)
    i, j = torch.triu_indices(top.shape[1], top.shape[1], offset=1, device=distances.device)
    pair = distances[top[:, i], top[:, j]]  # (n_units, k (k - 1) / 2)
    return 0.0 - pair.float().mean(1).cpu()  # 0.0 - x, not -x: identical images score 0, not -0


def interpretability_index_by_index(images: Tensor, top: Tensor, distance: Distance, batch_size: int = 64) -> Tensor:
    """(M, 3, S, S) image bank, (n_units, k) indices into it -> (n_units,) II. Embeds the images that
    some unit uses once; to score several unit families on one bank, compute ``pairwise_distances`` once
    and call ``interpretability_index_from_distances`` per family instead."""
    top = top.long().cpu()
    used, slot = torch.unique(top, return_inverse=True)
    distances = pairwise_distances(images[used.to(images.device)], distance, batch_size)
    return interpretability_index_from_distances(distances, slot)


def interpretability_index(images: Tensor, distance: Distance, units_per_batch: int = 64) -> Tensor:
    """(n_units, k, 3, S, S) each unit's top images or crops (float [0, 1] or uint8) -> (n_units,) II.

    Each unit's images are compared only among themselves, ``units_per_batch`` units at a time.
    """
    if images.ndim != 5 or images.shape[2] != 3 or images.shape[1] < 2:
        raise ValueError(f"Expected (n_units, k >= 2, 3, S, S) images, got {tuple(images.shape)}.")
    n_units, k = images.shape[:2]
    i, j = torch.triu_indices(k, k, offset=1)
    out = []
    with torch.inference_mode():
        for start in range(0, n_units, units_per_batch):
            chunk = images[start : start + units_per_batch]
            e = distance.embed(chunk.flatten(0, 1)).float().view(chunk.shape[0], k, -1)
            squared = (e[:, i] - e[:, j]).pow(2).sum(-1)  # (units, pairs)
            out.append(0.0 - distance.from_squared(squared).float().mean(1).cpu())
    return torch.cat(out)


def unit_interpretability(activations: Tensor, distances: Tensor, k: int = 5,
                          min_activation: float | None = 0.0) -> Tensor:
    """(N, n_units) activations (max over positions) and the (N, N) ``pairwise_distances`` of the N images
    -> (n_units,) II of each unit's top-k images.

    Units whose k-th strongest activation is <= ``min_activation`` get NaN: a dead or nearly dead unit has
    no k top images to compare (summarise with ``nanmedian``). ``min_activation=None`` scores every unit
    (e.g. random directions, whose projections may all be negative).
    """
    if distances.shape != (activations.shape[0],) * 2:
        raise ValueError(f"{activations.shape[0]} activation rows but distances of shape {tuple(distances.shape)}; "
                         "pass pairwise_distances(images, distance) of the same images.")
    values, top = activations.topk(k, dim=0)
    ii = interpretability_index_from_distances(distances, top.T)
    if min_activation is not None:
        ii[values[-1].cpu() <= min_activation] = float("nan")
    return ii
