"""Precomputed vectors (`data=vectors`): cached activations, or recorded neural responses (Klindt et al. 2023).

A vectors file is an (N, d) array in `.npy`, `.pt` or `.safetensors`. It enters the data path where the
shuffle window would: batches are drawn from a seeded permutation per epoch, so the stream is again a pure
function of (seed, rank, batch index) and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sae.data.stream import derive_seed

VECTOR_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


class VectorFileError(ValueError):
    """A vectors file that is missing, of the wrong shape, or holds non-finite values."""


def load_vectors(path: str | Path) -> Tensor:
    """Load an (N, d) float tensor from `.npy`, `.pt`/`.pth` or `.safetensors` and validate it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise VectorFileError(f"data.path={str(path)!r} does not exist. Give an (N, d) array as {VECTOR_SUFFIXES}.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        vectors = torch.from_numpy(np.load(path, mmap_mode="r").astype(np.float32, copy=True))
    elif suffix in (".pt", ".pth"):
        vectors = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(vectors, dict):
            vectors = _single_tensor(vectors, path)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        vectors = _single_tensor(load_file(path), path)
    else:
        raise VectorFileError(f"data.path={str(path)!r}: unknown format {suffix!r}; use one of {VECTOR_SUFFIXES}.")
    return check_vectors(torch.as_tensor(vectors).float(), str(path))


def _single_tensor(tensors: dict, path: Path) -> Tensor:
    if "activations" in tensors:
        return tensors["activations"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise VectorFileError(
        f"{path} holds several tensors ({', '.join(sorted(tensors))}); name the one to train on 'activations'."
    )


def check_vectors(vectors: Tensor, name: str, expected_width: int | None = None) -> Tensor:
    """Reject anything but a finite (N, d) array, with a message that says what is wrong and how to fix it."""
    if vectors.ndim != 2:
        raise VectorFileError(f"{name}: expected an (N, d) array of vectors, got shape {tuple(vectors.shape)}.")
    if vectors.shape[0] < 2:
        raise VectorFileError(f"{name}: needs at least 2 vectors, got {vectors.shape[0]}.")
    finite = torch.isfinite(vectors).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise VectorFileError(
            f"{name}: {bad.numel()} of {vectors.shape[0]} rows hold NaN or inf (first at row {int(bad[0])}). "
            "Drop or impute those rows before training."
        )
    if expected_width is not None and vectors.shape[1] != expected_width:
        raise VectorFileError(
            f"{name}: vectors have width {vectors.shape[1]} but the configured layer has {expected_width} channels. "
            "Set layer= to the layer they were recorded at, or data.check_width=false for vectors that do not "
            "come from InceptionV1 (e.g. neural recordings)."
        )
    return vectors


def split_holdout(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of row indices into (train, val); val gets round(n * val_fraction) rows, at least 1."""
    perm = torch.from_numpy(np.random.default_rng(derive_seed(seed, 5)).permutation(n))
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    return perm[n_val:], perm[:n_val]


class VectorStream:
    """Endless (batch_size, d) batches of `vectors[rows]`, reshuffled every epoch, from `start_batch` on.

    Ranks take disjoint slices of each epoch's permutation.
    """

    def __init__(self, vectors: Tensor, rows: Tensor, device: torch.device, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0):
        self.vectors, self.rows, self.device = vectors, rows, torch.device(device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.start_batch = start_batch
        self.batches_per_epoch = len(rows) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise VectorFileError(
                f"{len(rows)} training vectors cannot fill one batch of data.batch_size={batch_size} "
                f"on each of {world_size} process(es). Lower data.batch_size or add vectors."
            )

    def __iter__(self) -> Iterator[Tensor]:
        epoch, skip = divmod(self.start_batch, self.batches_per_epoch)
        pin = self.device.type == "cuda"
        while True:
            perm = np.random.default_rng(derive_seed(self.seed, epoch, 6)).permutation(len(self.rows))
            order = self.rows[torch.from_numpy(perm)]
            for b in range(skip, self.batches_per_epoch):
                start = (b * self.world_size + self.rank) * self.batch_size
                batch = self.vectors.index_select(0, order[start : start + self.batch_size])
                yield (batch.pin_memory() if pin else batch).to(self.device, non_blocking=True)
            skip, epoch = 0, epoch + 1
