"""Shared fixtures: small image folders made on the fly, and quiet, offline runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sae.run.configs import register_configs
from tests.helpers import REPO, write_images

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

register_configs()  # the generated config groups (layer=...), for the tests that compose configs in-process

SHARED_IMAGES = REPO.parent / "shared" / "data" / "imagenet-sample-1k"


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


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """12 small images, shared by a module's evaluation tests."""
    root = tmp_path_factory.mktemp("images")
    write_images(root, 12)
    return root
