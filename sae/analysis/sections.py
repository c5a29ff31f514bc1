"""The sections of an evaluation, each a function of the held-out data that returns its metrics and writes its
files: reconstruction, spliced-in fidelity, curve detectors, the interpretability index, and the browsed
features' pictures. `sae.analysis.evaluation` runs them in order; `sae.analysis.browser` lays out the pages.

Every unit kind (SAE features, neurons, k-means and random directions) is scanned the same way: its activation
at every position of every held-out image, reduced to each image's maximum (an `examples.ActivationScan`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae.analysis import examples
from sae.analysis.fidelity import fidelity_unavailable_reason, sae_substitute, spliced_fidelity
from sae.metrics import SparsityMetrics, density_histogram_figure
from sae.nn import SparseAutoencoder
from sae.nn.io import atomic_write_bytes

log = logging.getLogger("sae.evaluate")

ROWS_PER_CHUNK = 8192  # vectors encoded at once: bounds the (rows, d_sae) feature matrix in memory


@dataclass
class HeldOut:
    """The evaluation data: images (N, 3, S, S) uint8 and their layer activations acts (N, C, h, w)."""

    images: Tensor
    acts: Tensor
    layer: str

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.acts.shape[-2:])

    def image_chunks(self) -> list[Tensor]:
        """Whole images' activations, ~ROWS_PER_CHUNK positions per chunk."""
        h, w = self.grid
        return list(self.acts.split(max(1, ROWS_PER_CHUNK // (h * w))))


def to_rows(acts: Tensor) -> Tensor:
    """(n, C, h, w) -> (n * h * w, C), image-major: image k, position (i, j) is row k*h*w + i*w + j."""
    return acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])


@dataclass
class Section:
    """What a section computed: `metrics` (JSON-able, for metrics.json), `files` (written, relative to the
    output folder), and `units` (per-unit arrays for the browser, keyed by unit kind then column)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    units: dict[str, dict[str, Any]] = field(default_factory=dict)


def save_figure(figure, path: Path) -> str:
    """Save a matplotlib figure as PNG atomically; returns the file name."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path.name


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, allow_nan=True, default=float).encode())


def scan(held: HeldOut, encode: Callable[[Tensor], Tensor] | None = None) -> examples.ActivationScan:
    """Each image's maximum (and where) of every unit: encode maps (R, C) rows to (R, U) unit activations;
    None scans the neurons themselves."""
    with torch.inference_mode():
        batches = [to_rows(chunk) if encode is None else encode(to_rows(chunk)) for chunk in held.image_chunks()]
    return examples.scan_vectors(batches, held.grid)


# -- 1. reconstruction ----------------------------------------------------------------------------------
def reconstruction(sae: SparseAutoencoder, held: HeldOut, out: Path) -> tuple[Section, examples.ActivationScan]:
    """MSE, explained variance, FVU, L0, dead and dense fractions on every held-out position (raw units), the
    density histogram, and the features' scan (for dataset examples and the interpretability index)."""
    device = sae.W_dec.device
    metrics = SparsityMetrics(sae.d_sae, d_in=sae.d_in).to(device)
    maxima, argmax = [], []
    with torch.inference_mode():
        for chunk in held.image_chunks():
            x = to_rows(chunk).to(device)
            result = sae(x)
            metrics.update(x, result.x_hat, result.f)
            value, where = result.f.reshape(chunk.shape[0], -1, sae.d_sae).max(dim=1)
            maxima.append(value.cpu())
            argmax.append(where.cpu())
    values = {k: float(v) for k, v in metrics.compute().items()}
    frequency = metrics.feature_frequency().cpu()
    n_vectors = held.acts.shape[0] * held.grid[0] * held.grid[1]
    feature_scan = examples.ActivationScan(list(range(sae.d_sae)), torch.cat(maxima), torch.cat(argmax),
                                           (frequency.double() * n_vectors).round().long(), n_vectors, held.grid)
    values.update(n_images=int(held.acts.shape[0]), n_vectors=n_vectors, d_sae=sae.d_sae,
                  n_dead=int((frequency == 0).sum()))
    figure = density_histogram_figure(frequency, title=f"Feature density on {n_vectors} held-out positions")
    section = Section(values, [save_figure(figure, out / "density.png")])
    log10 = torch.where(frequency > 0, frequency.clamp_min(1e-30).log10(), torch.full_like(frequency, math.nan))
    section.units["features"] = {"density": frequency.numpy(), "log10_density": log10.numpy()}
    neuron_frequency = (held.acts > 0).float().mean(dim=(0, 2, 3))
    section.units["neurons"] = {"density": neuron_frequency.numpy()}
    return section, feature_scan


# -- 2. spliced-in fidelity -----------------------------------------------------------------------------
def fidelity(net, sae: SparseAutoencoder, held: HeldOut, batch_size: int = 32) -> Section:
    """Spliced-in KL, top-1 agreement and KL gap recovered (see `sae.analysis.fidelity`), or the reason why not."""
    reason = fidelity_unavailable_reason(held.layer, int(held.images.shape[-1]))
    if reason is not None:
        log.warning("spliced-in fidelity not available: %s", reason)
        return Section({"available": False, "reason": reason})
    device = next(net.parameters()).device
    result = spliced_fidelity(net, held.layer, held.acts.to(device), sae_substitute(sae), batch_size=batch_size)
    return Section({"available": True, **result.as_dict()})


# -- 5. browsed features: visualizations and dataset examples --------------------------------------------
def _write_png(image, path: Path) -> str:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path.name


def _tiles_to_pil(tile: Tensor):
    from PIL import Image

    return Image.fromarray((tile.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def render(extractor, directions: Tensor, cfg: Any) -> Tensor | None:
    """Feature visualizations (n, 3, S, S) of `directions` (n, d_in), all in one batch; None if disabled.

    cfg.viz_steps: Adam steps; null = 512 on CUDA (lucid's default) and 16 on CPU, where each step of a
    batch of ~30 images costs seconds: a blurry first look, not a finished visualization."""
    steps = cfg.viz_steps
    if steps is None:
        steps = 512 if next(extractor.parameters()).device.type == "cuda" else 16
    if int(steps) <= 0 or directions.shape[0] == 0:
        return None
    from sae.analysis.featureviz import render_directions

    return render_directions(extractor, directions, steps=int(steps), image_size=int(cfg.viz_size), seed=int(cfg.seed),
                             progress=True)  # a bar with an ETA: minutes on a CPU


def browse(held: HeldOut, units: list[int], unit_scan: examples.ActivationScan, viz: Tensor | None, folder: Path,
           prefix: str, cfg: Any) -> dict[int, dict[str, str]]:
    """Write `folder/{prefix}{unit}_viz.png` (from `viz`, (n_units, 3, S, S), if given) and
    `..._examples.png` (cfg.examples receptive-field crops of the held-out images) for each of `units`.
    Returns {unit: {"viz": path, "examples": path}}, paths relative to folder's parent (the page's folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[int, dict[str, str]] = {u: {} for u in units}
    if not units:
        return paths
    for unit, image in zip(units, viz if viz is not None else []):
        paths[unit]["viz"] = f"{folder.name}/" + _write_png(_tiles_to_pil(image), folder / f"{prefix}{unit}_viz.png")
    top = unit_scan.top(units, k=int(cfg.examples))
    tiles = examples.crops(held.images, held.layer, top, size=int(cfg.crop_size))
    captions = examples.tile_captions(top)
    for row, unit in enumerate(units):
        grid = examples.image_grid(tiles[row : row + 1], tile_captions=captions[row : row + 1])
        paths[unit]["examples"] = f"{folder.name}/" + _write_png(grid, folder / f"{prefix}{unit}_examples.png")
    return paths


def finite_list(values) -> list[float | None]:
    """A JSON-safe list: NaN and inf become None."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).ravel()]
