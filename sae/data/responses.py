"""Recorded responses (`data=responses`): an (n_stimuli, n_units) array and the stimulus images, row i to image i.

    python train.py data=responses data.path=rec/responses.npy data.images=rec/stimuli
    python evaluate.py run=RUN                      # II of units, k-means, PCA, ICA, NMF and SAE features

The array is `.npy` (read with allow_pickle=False), `.pt`/`.pth` (torch.load with weights_only=True),
`.safetensors` or `.csv` (numbers separated by commas, an optional header line). The images are a folder
(its image files sorted by name) or a list file (one path per line, relative to the list file; blank lines
and lines starting with # are skipped). Rows are split by the seed into training stimuli (the SAE and the
direction families are fitted on them) and held-out stimuli (validation, and the ones II scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sae.data.datamodule import ActivationDataModule, VectorDataModule
from sae.data.vectors import VectorFileError, check_vectors, load_vectors, split_holdout

RESPONSE_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ResponseFileError(VectorFileError):
    """Recorded responses or their stimulus images that are missing, malformed, or do not match."""


def load_responses(path: str | Path) -> Tensor:
    """(n_stimuli, n_units) float32 from `.npy`, `.pt`/`.pth`, `.safetensors` or `.csv`, checked finite."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ResponseFileError(f"data.path={str(path)!r} is not a file; give an (n_stimuli, n_units) array as "
                                f"{', '.join(RESPONSE_SUFFIXES)}.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:  # an object array: refusing to unpickle is the point
            raise ResponseFileError(f"{path}: {e}; save a numeric array (np.save of a float array).") from None
        responses = torch.from_numpy(np.asarray(array, dtype=np.float32))
    elif suffix == ".csv":
        responses = torch.from_numpy(_read_csv(path))
    elif suffix in RESPONSE_SUFFIXES:
        responses = load_vectors(path)
    else:
        raise ResponseFileError(f"data.path={str(path)!r}: unknown format {suffix!r}; use one of {RESPONSE_SUFFIXES}.")
    return check_vectors(responses.float(), str(path))


def _read_csv(path: Path) -> np.ndarray:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines and not _is_numeric_row(lines[0]):
        lines = lines[1:]  # a header
    try:
        rows = [[float(v) for v in line.split(",")] for line in lines]
    except ValueError as e:
        raise ResponseFileError(f"{path}: a value is not a number ({e}); write one stimulus per line, "
                                "numbers separated by commas.") from None
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ResponseFileError(f"{path}: rows have different numbers of values {sorted(widths)}; every stimulus "
                                "needs one value per unit.")
    return np.asarray(rows, dtype=np.float32)


def _is_numeric_row(line: str) -> bool:
    try:
        [float(v) for v in line.split(",")]
        return True
    except ValueError:
        return False


def stimulus_paths(images: str | Path) -> list[Path]:
    """The stimulus image files in row order: a folder's images sorted by name, or a list file's lines."""
    source = Path(images).expanduser()
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ResponseFileError(f"data.images={str(source)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        return paths
    if source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        paths = [(source.parent / line) for line in lines if line and not line.startswith("#")]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ResponseFileError(f"data.images={str(source)!r}: {len(missing)} listed images do not exist "
                                    f"(first: {missing[0]}); paths are relative to the list file.")
        if not paths:
            raise ResponseFileError(f"data.images={str(source)!r} lists no images.")
        return paths
    raise ResponseFileError(f"data.images={str(source)!r} does not exist; give the stimulus images as a folder "
                            "(sorted by name) or a list file (one path per line), in the order of the response rows.")


def check_counts(n_rows: int, paths: Sequence[Path], path: str, images: str) -> None:
    if n_rows != len(paths):
        raise ResponseFileError(f"{path} has {n_rows} response rows but {images} has {len(paths)} stimulus images; "
                                "there must be one image per row, in the same order.")


def load_stimuli(paths: Sequence[Path], size: int) -> Tensor:
    """The images (n, 3, size, size) uint8: RGB, the centre square, resized (antialiased)."""
    from PIL import Image

    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                w, h = image.size
                side = min(w, h)
                box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
                image = image.crop(box).resize((size, size), Image.Resampling.BICUBIC)
                out[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        except OSError as e:
            raise ResponseFileError(f"stimulus {path} cannot be read as an image ({e}).") from None
    return out


class ResponseDataModule(VectorDataModule):
    """Recorded responses as training vectors, with their stimulus images (checked: one per row).

    The seeded split of rows (`val_fraction` held out) is the one evaluation uses: the SAE and the direction
    families see the training stimuli; II is scored on the held-out ones.
    """

    layer = "responses"  # what the run's sae.json records instead of an InceptionV1 layer

    def __init__(self, path: str, images: str, batch_size: int = 256, val_fraction: float = 0.2,
                 image_size: int = 64, seed: int = 0):
        ActivationDataModule.__init__(self, batch_size, seed)
        self.path, self.images, self.image_size = path, images, int(image_size)
        self.cache, self.shuffle_vectors = None, 0
        self.vectors = load_responses(path)
        self.stimuli = stimulus_paths(images)
        check_counts(len(self.vectors), self.stimuli, path, images)
        if not 0 < val_fraction < 1:
            raise ResponseFileError(f"data.val_fraction={val_fraction}: hold out a fraction in (0, 1) of the stimuli "
                                    "to score II on.")
        self.train_rows, self.val_rows = split_holdout(len(self.vectors), val_fraction, self.seed)
