"""Precomputed vectors (`data=vectors`): cached activations, or recorded neural responses (Klindt et al. 2023).

A vectors file is an (N, d) array in `.npy`, `.pt` or `.safetensors`. It enters the data path where the
shuffle window would: batches are drawn from a seeded permutation per epoch, so the stream is again a pure
function of (seed, rank, batch index) and resumes exactly. A directory written by `python -m sae.cache`
(shards + manifest) is memory-mapped and streamed in shuffled blocks instead (`ShardedVectors`, `ShardStream`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sae.data.stream import derive_seed
from sae.errors import UserError
from sae.safeload import load_error_text, np_load, torch_load

VECTOR_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


class VectorFileError(UserError, ValueError):
    """A vectors file that is missing, of the wrong shape, or holds non-finite values."""


def load_vectors(path: str | Path) -> Tensor:
    """Load an (N, d) float tensor from `.npy`, `.pt`/`.pth` or `.safetensors` and validate it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise VectorFileError(f"data.path={str(path)!r} does not exist. Give an (N, d) array as {VECTOR_SUFFIXES}.")
    suffix = path.suffix.lower()
    if suffix not in VECTOR_SUFFIXES:
        raise VectorFileError(f"data.path={str(path)!r}: unknown format {suffix!r}; use one of {VECTOR_SUFFIXES}.")
    try:
        if suffix == ".npy":
            vectors = torch.from_numpy(np_load(path, mmap_mode="r").astype(np.float32, copy=True))
        elif suffix in (".pt", ".pth"):
            vectors = torch_load(path, map_location="cpu")
        else:
            from safetensors.torch import load_file

            vectors = load_file(path)
    except Exception as e:  # noqa: BLE001 - numpy, pickle, zip and header errors come in many types
        raise VectorFileError(f"data.path={str(path)!r} cannot be read ({load_error_text(e)}). Give an (N, d) "
                              f"float array as {VECTOR_SUFFIXES}.") from e
    if isinstance(vectors, dict):
        vectors = _single_tensor(vectors, path)
    if not isinstance(vectors, (torch.Tensor, np.ndarray)):
        raise VectorFileError(f"data.path={str(path)!r} holds a {type(vectors).__name__}, not an (N, d) array.")
    return check_vectors(torch.as_tensor(vectors).float(), str(path))


def check_not_all_zero(vectors: Tensor, name: str) -> Tensor:
    if not bool(vectors.any()):
        raise VectorFileError(f"{name}: all {vectors.shape[0]} vectors are zero; there is nothing to learn. Check "
                              "that the file holds the activations you meant.")
    return vectors


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


# -- activation caches: a directory of shards written by `python -m sae.cache` -----------------------------
MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "inception-sae-activation-cache/1"


class ShardedVectors:
    """A cache directory's shards, memory-mapped and read as one (N, d) array without loading it.

    The manifest lists the shards (`.npy`, float16 or float32) in order; rows are numbered across them.
    Only shards the manifest names are read, so a half-written cache (an interrupted `sae.cache`) is
    usable up to its last complete shard.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        manifest_path = self.directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise VectorFileError(
                f"data.path={str(self.directory)!r} is a folder without {MANIFEST_NAME}; give an activation cache "
                "written by `python -m sae.cache ... out=DIR`, or a single vectors file."
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise VectorFileError(f"{manifest_path}: format {self.manifest.get('format')!r} is not {CACHE_FORMAT!r}.")
        try:
            self.shards = [np_load(self.directory / s["file"], mmap_mode="r") for s in self.manifest["shards"]]
        except Exception as e:  # noqa: BLE001 - a missing, torn or pickled shard
            raise VectorFileError(f"{self.directory}: a shard cannot be read ({load_error_text(e)}); rewrite the "
                                  "cache with `python -m sae.cache`.") from e
        if not self.shards:
            raise VectorFileError(f"{manifest_path} lists no shards yet: let `python -m sae.cache` write one first.")
        self.width = int(self.manifest["d_in"])
        for shard, entry in zip(self.shards, self.manifest["shards"]):
            if shard.ndim != 2 or shard.shape != (entry["rows"], self.width):
                raise VectorFileError(f"{self.directory / entry['file']}: shape {shard.shape} disagrees with the "
                                      f"manifest ({entry['rows']}, {self.width}); rewrite the cache.")
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.width

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) as a float32 (stop - start, d) tensor, read sequentially across shards."""
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for s in range(first, len(self.shards)):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            if lo >= hi:
                break
            # One pass from the memory map into a new, writable float32 array.
            parts.append(torch.from_numpy(np.array(self.shards[s][lo - self.offsets[s] : hi - self.offsets[s]],
                                                   dtype=np.float32)))
        return (torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else torch.empty(0, self.width)

    def gather(self, positions: np.ndarray) -> Tensor:
        """Rows at arbitrary `positions` (any order) as float32 (len(positions), d)."""
        order = np.argsort(positions, kind="stable")
        sorted_positions = np.asarray(positions)[order]
        shard_of = np.searchsorted(self.offsets, sorted_positions, side="right") - 1
        out = torch.empty(len(positions), self.width)
        for s in np.unique(shard_of):
            mask = shard_of == s
            rows = np.asarray(self.shards[s][sorted_positions[mask] - self.offsets[s]], dtype=np.float32)
            out[torch.from_numpy(order[mask])] = torch.from_numpy(rows)
        return out


class ShardStream:
    """Endless shuffled (batch_size, d) batches of cache rows [first_row, len(cache)), from `start_batch` on.

    Rows are read in blocks of `block_rows` consecutive rows (sequential, disk-speed reads). Each epoch
    visits the blocks in a seeded random order, `shuffle_vectors` rows of blocks at a time, and shuffles the
    rows within each such group in memory. The cache writer already shuffled each window of many images,
    so this mixes well while reading the disk sequentially. Like `VectorStream`, batch b of rank r is a pure
    function of (seed, epoch, b), so runs resume exactly; ranks take disjoint batches.
    """

    def __init__(self, cache: ShardedVectors, first_row: int, device: torch.device, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0, shuffle_vectors: int = 262144,
                 block_rows: int = 16384):
        self.cache, self.first_row, self.device = cache, first_row, torch.device(device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.start_batch, self.block_rows = start_batch, block_rows
        n = len(cache) - first_row
        self.blocks = [(first_row + i, min(first_row + i + block_rows, len(cache))) for i in range(0, n, block_rows)]
        self.blocks_per_group = max(1, shuffle_vectors // block_rows)
        self.batches_per_epoch = n // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise VectorFileError(
                f"{n} training vectors cannot fill one batch of data.batch_size={batch_size} on each of "
                f"{world_size} process(es). Lower data.batch_size or cache more vectors."
            )

    def _groups(self, epoch: int) -> list[list[tuple[int, int]]]:
        order = np.random.default_rng(derive_seed(self.seed, epoch, 10)).permutation(len(self.blocks))
        blocks = [self.blocks[i] for i in order]
        return [blocks[i : i + self.blocks_per_group] for i in range(0, len(blocks), self.blocks_per_group)]

    def _load_group(self, epoch: int, g: int, group: list[tuple[int, int]]) -> Tensor:
        rows = torch.cat([self.cache.rows(lo, hi) for lo, hi in group])
        perm = torch.from_numpy(np.random.default_rng(derive_seed(self.seed, epoch, g, 11)).permutation(len(rows)))
        return rows[perm]

    def __iter__(self) -> Iterator[Tensor]:
        epoch, skip = divmod(self.start_batch, self.batches_per_epoch)
        pin = self.device.type == "cuda"
        while True:
            groups = self._groups(epoch)
            ends = np.cumsum([sum(hi - lo for lo, hi in group) for group in groups])
            loaded: dict[int, Tensor] = {}
            for b in range(skip, self.batches_per_epoch):
                start = (b * self.world_size + self.rank) * self.batch_size
                stop = start + self.batch_size
                parts = []
                g = int(np.searchsorted(ends, start, side="right"))
                while start < stop:
                    if g not in loaded:
                        loaded = {k: v for k, v in loaded.items() if k >= g}  # earlier groups are done
                        loaded[g] = self._load_group(epoch, g, groups[g])
                    begin = int(ends[g - 1]) if g else 0
                    take = min(stop, int(ends[g])) - start
                    parts.append(loaded[g][start - begin : start - begin + take])
                    start, g = start + take, g + 1
                batch = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
                yield (batch.pin_memory() if pin else batch).to(self.device, non_blocking=True)
            skip, epoch = 0, epoch + 1
