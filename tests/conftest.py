"""Shared fixtures: small image folders made on the fly, and quiet, offline runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sae.run.configs import register_configs

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
register_configs()  # the generated config groups (layer=...), for the tests that compose configs in-process

SHARED_IMAGES = REPO.parent / "shared" / "data" / "imagenet-sample-1k"


def write_images(root: Path, n: int, size: tuple[int, int] = (96, 80), seed: int = 0) -> list[Path]:
    """`n` small random JPEGs/PNGs in two class folders (ImageFolder layout)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img{i:03d}.{'jpg' if i % 3 else 'png'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_images(root, 24)
    return root


@pytest.fixture
def shared_images() -> Path:
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"{SHARED_IMAGES} is not here (a fresh clone has no ../shared)")
    return SHARED_IMAGES
