"""A simulated recording whose interpretable directions are known: python -m sae.data.simulate_responses OUT

Stimuli are small images in `clusters` groups; a group is one colour and one grating (orientation and
spatial frequency), each image with its own phase and pixel noise. Each stimulus drives one latent cause, its
group, with a random gain. The `units` recorded responses mix the causes through a non-negative matrix
(each group drives `spread` units, so most units answer to several groups: polysemantic), plus Gaussian
noise, rectified:

    r = relu(gain * M[group] + noise * N(0, I))          M: (clusters, units), rows of unit norm

The truth: the rows of M are the monosemantic directions. Cosine k-means and an SAE should recover them and
score a higher interpretability index than the units; the random directions are the floor. OUT receives
responses.npy (n, units) float32, stimuli/000000.png ... (the same order), truth.npy (the rows of M),
labels.npy (each stimulus's group) and simulation.json (the parameters).

    python -m sae.data.simulate_responses /tmp/rec --stimuli 1200 --clusters 8 --units 24
    python train.py data=responses data.path=/tmp/rec/responses.npy data.images=/tmp/rec/stimuli
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class Recording:
    """responses (n, units) float32, images (n, 3, S, S) uint8, labels (n,) long, truth (clusters, units)."""

    responses: Tensor
    images: Tensor
    labels: Tensor
    truth: Tensor


def cluster_images(n: int, clusters: int = 8, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n images (n, 3, size, size) uint8 in `clusters` groups of one colour and one grating each, and the
    (n,) group labels (balanced: image i is in group i % clusters, then shuffled by the seed)."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.15, 0.85, size=(clusters, 3))
    orientation = rng.permutation(clusters) * math.pi / clusters
    frequency = rng.uniform(1.5, 4.5, size=clusters) * 2 * math.pi / size
    labels = rng.permutation(np.arange(n) % clusters)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((n, 3, size, size))
    for i, c in enumerate(labels):
        along = xx * math.cos(orientation[c]) + yy * math.sin(orientation[c])
        grating = 0.15 * np.sin(frequency[c] * along + rng.uniform(0, 2 * math.pi))
        images[i] = colours[c][:, None, None] + grating[None] + rng.normal(0, 0.03, size=(3, size, size))
    return torch.from_numpy((images.clip(0, 1) * 255).round().astype(np.uint8)), torch.from_numpy(labels).long()


def mixing_matrix(clusters: int, units: int, spread: int, seed: int = 0) -> Tensor:
    """(clusters, units) non-negative, unit-norm rows: each group drives `spread` random units with random
    weights (spread 1 and units == clusters: one unit per group, the monosemantic case)."""
    rng = np.random.default_rng(seed + 1)
    m = np.zeros((clusters, units))
    for c in range(clusters):
        chosen = rng.choice(units, size=min(spread, units), replace=False) if spread > 1 or units != clusters else [c]
        m[c, chosen] = rng.uniform(0.5, 1.0, size=len(chosen))
    return torch.from_numpy(m / np.linalg.norm(m, axis=1, keepdims=True)).float()


def simulate(stimuli: int = 1200, clusters: int = 8, units: int = 24, spread: int = 4, noise: float = 0.05,
             size: int = 32, seed: int = 0) -> Recording:
    """A simulated recording (see the module docstring)."""
    images, labels = cluster_images(stimuli, clusters, size, seed)
    truth = mixing_matrix(clusters, units, spread, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    gain = 0.5 + torch.rand(stimuli, 1, generator=generator)
    responses = (gain * truth[labels] + noise * torch.randn(stimuli, units, generator=generator)).clamp_min(0)
    return Recording(responses, images, labels, truth)


def write_recording(recording: Recording, out: str | Path, parameters: dict | None = None) -> Path:
    """Write the recording's files under `out` (see the module docstring); returns `out`."""
    from PIL import Image

    out = Path(out)
    (out / "stimuli").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(recording.images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / "stimuli" / f"{i:06d}.png")
    np.save(out / "responses.npy", recording.responses.numpy().astype(np.float32))
    np.save(out / "truth.npy", recording.truth.numpy().astype(np.float32))
    np.save(out / "labels.npy", recording.labels.numpy())
    (out / "simulation.json").write_text(json.dumps(parameters or {}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write responses.npy, stimuli/, truth.npy, labels.npy into")
    parser.add_argument("--stimuli", type=int, default=1200)
    parser.add_argument("--clusters", type=int, default=8, help="groups of stimuli = known directions")
    parser.add_argument("--units", type=int, default=24, help="recorded units")
    parser.add_argument("--spread", type=int, default=4, help="units each group drives (1 with units=clusters: monosemantic)")
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--size", type=int, default=32, help="stimulus side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parameters = {k: v for k, v in vars(args).items() if k != "out"}
    out = write_recording(simulate(**parameters), args.out, parameters)
    print(f"wrote {args.stimuli} stimuli and responses of {args.units} units to {out}")


if __name__ == "__main__":
    main()
