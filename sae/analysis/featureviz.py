"""Feature visualization (Olah et al. 2017, "Feature Visualization", Distill): images that maximize a direction.

An SAE feature is a direction in a layer's activation space (its decoder row); a neuron is a one-hot
direction. Both are rendered the same way, so they can be compared side by side:

* the image is lucent's parameterization: a Fourier-space image with a 1/f spectrum, through lucid's
  decorrelated colour basis and a sigmoid (`lucent.optvis.param.image`);
* every step applies lucent's standard transforms (padding, jitter, scale, rotation), for robustness;
* the objective is the dot product of the layer's activation with the direction, at the centre position
  (the classic "neuron" objective; its image sits inside the centre's receptive field) or summed over all
  positions (the "channel" objective, a texture);
* the network runs only up to the layer (`InceptionExtractor`), not to the logits, which is what makes
  early layers fast.

Images are optimized at their own size (lucid's behaviour); lucent's `render_vis` would upsample them to
224 px first. lucent picks its device when imported (cuda:0 if there is one); the image lives there and the
transformed image is moved to the extractor's device, so both may differ.

    directions = feature_directions(sae, [12, 40])
    images = render_directions(extractor, directions, steps=512)      # (2, 3, 128, 128) in [0, 1]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

POSITIONS = ("center", "all")


class Rendering(NamedTuple):
    images: Tensor  # (n, 3, S, S) float in [0, 1], on the CPU
    objective: Tensor  # (steps, n): each image's objective value before each step


def feature_directions(sae: nn.Module, features: Sequence[int]) -> Tensor:
    """(n, d_in): the decoder rows W_dec[features] of an SAE, the directions its features write."""
    index = torch.as_tensor(list(features), dtype=torch.long)
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < sae.d_sae):
        raise ValueError(f"features {list(features)} must lie in [0, d_sae={sae.d_sae})")
    return sae.W_dec.detach()[index.to(sae.W_dec.device)].float().cpu()


def neuron_directions(d_in: int, neurons: Sequence[int]) -> Tensor:
    """(n, d_in): one-hot directions, so a neuron renders exactly like a feature."""
    if any(not 0 <= int(i) < d_in for i in neurons):
        raise ValueError(f"neurons {list(neurons)} must lie in [0, d_in={d_in})")
    return torch.eye(d_in)[torch.as_tensor(list(neurons), dtype=torch.long)]


def direction_objective(acts: Tensor, directions: Tensor, position: str = "center") -> Tensor:
    """acts (n, C, h, w), directions (n, C) -> (n,): each image's activation along its own direction."""
    if position == "center":
        h, w = acts.shape[-2:]
        return (acts[:, :, h // 2, w // 2] * directions).sum(dim=1)
    if position == "all":
        return torch.einsum("nchw,nc->n", acts, directions)
    raise ValueError(f"position={position!r} is unknown: use one of {POSITIONS}")


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Seed torch and numpy (lucent's transforms draw from numpy's global RNG) and restore both after, so
    rendering during training leaves the training run's random streams untouched."""
    devices = [device] if device.type == "cuda" else []
    state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def optimize_directions(extractor: nn.Module, directions: Tensor, *, steps: int = 512, image_size: int = 128,
                        position: str = "center", seed: int = 0, lr: float = 0.05,
                        progress: bool = False) -> Rendering:
    """Render one image per direction (all in one batch) and record the objective at every step.

    extractor: an `InceptionExtractor` (pixels in [0, 255] -> (n, C, h, w) activations of its layer).
    directions: (n, C) with C = the layer's channels. See `render_directions`.
    """
    from lucent.optvis import param, transform  # imported here: lucent picks its device on import

    if directions.ndim != 2 or directions.shape[1] != extractor.d_in:
        raise ValueError(f"directions must be (n, d_in={extractor.d_in}) for layer {extractor.layer!r}; "
                         f"got {tuple(directions.shape)}")
    if position not in POSITIONS:
        raise ValueError(f"position={position!r} is unknown: use one of {POSITIONS}")
    if int(steps) < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    device = next(extractor.parameters()).device
    directions = directions.to(device=device, dtype=torch.float32)
    history = []
    with seeded(seed, device), torch.enable_grad():
        params, image_f = param.image(int(image_size), batch=directions.shape[0])
        jitter_and_scale = transform.compose(transform.standard_transforms)
        optimizer = torch.optim.Adam(params, lr=lr)
        for _ in _steps(int(steps), progress):
            optimizer.zero_grad()
            pixels = jitter_and_scale(image_f()).to(device) * 255
            value = direction_objective(extractor(pixels), directions, position)
            (-value.sum()).backward()  # images are independent: each gets the gradient of its own objective
            optimizer.step()
            history.append(value.detach().cpu())
        images = image_f().detach().cpu()
    return Rendering(images, torch.stack(history))


def render_directions(extractor: nn.Module, directions: Tensor, *, steps: int = 512, image_size: int = 128,
                      position: str = "center", seed: int = 0, lr: float = 0.05, progress: bool = False) -> Tensor:
    """Images that maximize each direction at the extractor's layer: (n, 3, S, S) float in [0, 1], CPU.

    directions: (n, d_in), e.g. `feature_directions(sae, features)` or `neuron_directions(d_in, neurons)`.
    steps: Adam steps (lucid's default 512; far fewer give blurrier images). image_size: S, the side of the
    optimized image. position: "center" (the centre position's activation) or "all" (summed over positions).
    seed: the image initialization and the random transforms. lr: Adam's learning rate (lucid's 0.05).
    """
    return optimize_directions(extractor, directions, steps=steps, image_size=image_size, position=position,
                               seed=seed, lr=lr, progress=progress).images


def _steps(steps: int, progress: bool):
    if not progress:
        return range(steps)
    from tqdm import tqdm

    return tqdm(range(steps), desc="feature visualization")
