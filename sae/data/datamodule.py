"""LightningDataModules that serve activation vectors, from images or from precomputed vectors.

`train_dataloader()` returns an endless iterable of (batch_size, d_in) tensors already on the training
device; `data.batch_size` is the number of vectors per optimizer step for every source. The module's
`state_dict()` is the number of batches consumed, which is all that exact resume needs (see
`sae.data.stream`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from sae.checks import BadConfigError, fraction, non_negative, positive
from sae.data.images import CropSpec, ImageFolder, ImageSource, ImageSourceError
from sae.data.stream import (
    ActivationStream,
    HeldOutImages,
    ImageStream,
    derive_seed,
    extractor_output_shape,
    to_vectors,
)
from sae.data.vectors import (
    ShardedVectors, ShardStream, VectorStream, check_not_all_zero, check_vectors, load_vectors, split_holdout,
)

log = logging.getLogger(__name__)


class Batches:
    """A fixed sequence of on-device batches. (A plain list would read to Lightning as several loaders.)"""

    def __init__(self, batches: list[Tensor]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ActivationDataModule(L.LightningDataModule):
    """What the trainer needs from any source: `d_in`, train/val batches, a sample for init, resume state."""

    def __init__(self, batch_size: int = 4096, seed: int = 0):
        super().__init__()
        positive("data.batch_size", batch_size, integer=True)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self._start_batch = 0
        self._train_stream = None
        self._device: torch.device | None = None

    # -- where the trainer runs ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The trainer's device; without a trainer, the one set here (e.g. by `sae.cache`), else CPU."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return self._device or torch.device("cpu")

    @device.setter
    def device(self, device: str | torch.device) -> None:
        self._device = torch.device(device)

    @property
    def rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        trainer = self.trainer
        return {"batches": trainer.global_step * trainer.accumulate_grad_batches, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"the checkpoint's data stream used seed={state['seed']} but this run has seed={self.seed}; "
                "resume with the original seed."
            )
        self._start_batch = int(state["batches"])

    # -- to implement -------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        raise NotImplementedError

    def sample_vectors(self, n: int) -> Tensor:
        """About `n` training-distribution vectors on the training device, for input scaling and b_dec init."""
        raise NotImplementedError

    @property
    def vectors_per_image(self) -> int | None:
        return None


class ImageActivationDataModule(ActivationDataModule):
    """Activations of `extractor` (InceptionV1 truncated at the layer) on a stream of image crops."""

    def __init__(
        self,
        extractor: nn.Module,
        source: ImageSource | None = None,
        root: str | None = None,
        batch_size: int = 4096,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.25, 1.0),
        positions_per_image: int | None = None,
        vectors_per_window: int = 131072,
        image_batch_size: int = 32,
        num_workers: int = 2,
        val_images: int = 64,
        holdout: bool = True,
        seed: int = 0,
    ):
        super().__init__(batch_size, seed)
        positive("data.val_images", val_images, integer=True)
        positive("data.image_size", image_size, integer=True)
        positive("data.vectors_per_window", vectors_per_window, integer=True)
        positive("data.image_batch_size", image_batch_size, integer=True)
        non_negative("data.num_workers", num_workers, integer=True)
        if len(crop_scale) != 2 or not 0 < fraction("data.crop_scale", crop_scale[0], low_open=True) <= \
                fraction("data.crop_scale", crop_scale[1], low_open=True):
            raise BadConfigError(f"data.crop_scale={list(crop_scale)} must be [low, high] with 0 < low <= high <= 1.")
        if (source is None) == (root is None):
            raise ValueError("give exactly one image source: data.root=DIR (a folder of images) or data=sample.")
        source = ImageFolder(root) if root is not None else source
        self.extractor, self.source = extractor, source
        source.validate()
        if positions_per_image is not None:
            positive("data.positions_per_image", positions_per_image, integer=True)
        self.crop = CropSpec(size=int(image_size), scale=tuple(crop_scale))
        self.positions_per_image = None if positions_per_image is None else int(positions_per_image)
        self.vectors_per_window, self.image_batch_size = int(vectors_per_window), int(image_batch_size)
        self.num_workers = int(num_workers)
        indices = np.random.default_rng(derive_seed(self.seed, 7)).permutation(len(source)).tolist()
        if holdout:
            if len(source) <= val_images:
                raise ImageSourceError(
                    f"{source!r} has {len(source)} images, too few to hold out data.val_images={val_images}; "
                    "lower data.val_images."
                )
            self.val_indices, self.train_indices = sorted(indices[:val_images]), indices[val_images:]
        else:  # a tiny source (data=sample): validation uses other seeded crops of the same photographs
            self.train_indices = indices
            self.val_indices = [indices[i % len(indices)] for i in range(val_images)]
        self.holdout = holdout
        self._val_batches: list[Tensor] | None = None
        self._held_out: Tensor | None = None
        self._sample: tuple | None = None

    @functools.cached_property
    def layer_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image's activation."""
        return extractor_output_shape(self.extractor, self.crop.size)

    @property
    def d_in(self) -> int:
        return self.layer_shape[0]

    @property
    def vectors_per_image(self) -> int:
        _, h, w = self.layer_shape
        return min(self.positions_per_image or h * w, h * w)

    def _stream(self, start_batch: int, seed: int, vectors_per_window: int | None = None) -> ActivationStream:
        rank, world = self.rank_and_world
        self.extractor.to(self.device)
        return ActivationStream(
            ImageStream(self.source, self.train_indices, self.crop, seed), self.extractor, self.device,
            self.batch_size, self.positions_per_image, vectors_per_window or self.vectors_per_window, self.image_batch_size,
            self.num_workers, seed, rank, world, start_batch,
        )

    def train_dataloader(self) -> Iterable[Tensor]:
        self._train_stream = self._stream(self._start_batch, self.seed)
        return self._train_stream

    def sample_vectors(self, n: int) -> Tensor:
        # A separate seed: the sample is drawn from the training distribution without touching the stream.
        # Kept, so that the K SAEs of a shared-stream sweep (sae=multi) extract it once, not K times.
        key = (n, self.device)
        if self._sample is None or self._sample[0] != key:
            self._sample = (key, self._draw_sample(n))
        return self._sample[1]

    def _draw_sample(self, n: int) -> Tensor:
        stream = self._stream(0, derive_seed(self.seed, 8), vectors_per_window=n)
        batches, total = [], 0
        for batch in stream:
            batches.append(batch)
            total += batch.shape[0]
            if total >= n:
                return torch.cat(batches)[:n]
        raise AssertionError("unreachable: the stream is endless")

    def val_dataloader(self) -> Batches:
        if self._val_batches is None:
            self._val_batches = Batches(self._extract_val())
        return self._val_batches

    def held_out_images(self) -> Tensor:
        """The validation images as a (N, 3, S, S) uint8 CPU tensor, in a fixed order (cached).

        These are the images behind `val_dataloader()`: callbacks and evaluation find dataset examples here.
        """
        if self._held_out is None:
            held_out = HeldOutImages(self.source, self.val_indices, self.crop, derive_seed(self.seed, 9),
                                     not self.holdout)
            loader = DataLoader(held_out, batch_size=self.image_batch_size, num_workers=0)
            pixels, skipped = (torch.cat(parts) for parts in zip(*loader))
            self.held_out_skipped = int(skipped.sum())
            if self.held_out_skipped == len(held_out):
                raise ImageSourceError(f"{self.source!r}: none of the {len(held_out)} held-out images could be "
                                       "decoded; check the image files.")
            if self.held_out_skipped:
                log.warning("%d of %d held-out images are unreadable and were skipped; %d are used.",
                            self.held_out_skipped, len(held_out), len(held_out) - self.held_out_skipped)
            self._held_out = pixels[skipped == 0]
        return self._held_out

    def _extract_val(self) -> list[Tensor]:
        self.extractor.to(self.device)
        with torch.inference_mode():
            chunks = [to_vectors(self.extractor(pixels.to(self.device, non_blocking=True)), None, None)
                      for pixels in self.held_out_images().split(self.image_batch_size)]
        vectors = torch.cat(chunks).clone()
        return list(vectors.split(self.batch_size))


class VectorDataModule(ActivationDataModule):
    """Precomputed (N, d) vectors: a file (`data=vectors data.path=FILE`) or an activation cache directory.

    A file is loaded into memory and batches are drawn from a seeded permutation per epoch. A cache directory
    (`python -m sae.cache ... out=DIR`) stays on disk, memory-mapped: its first rows (`val_fraction` of it, at
    most `CACHE_VAL_MAX`) are the validation set, the rest streams in shuffled blocks (`ShardStream`).
    """

    CACHE_VAL_MAX = 65536  # validation vectors read into memory from a cache: plenty for the metrics

    def __init__(self, path: str, batch_size: int = 4096, val_fraction: float = 0.05, expected_width: int | None = None,
                 check_width: bool = True, seed: int = 0, shuffle_vectors: int = 262144):
        super().__init__(batch_size, seed)
        fraction("data.val_fraction", val_fraction, high_open=True)
        positive("data.shuffle_vectors", shuffle_vectors, integer=True)
        self.path, self.shuffle_vectors = path, int(shuffle_vectors)
        width = expected_width if check_width else None
        if Path(path).expanduser().is_dir():
            self.cache = ShardedVectors(path)
            n_val = min(self.CACHE_VAL_MAX, max(1, round(len(self.cache) * val_fraction))) if val_fraction > 0 else 0
            self.val_vectors = check_vectors(self.cache.rows(0, n_val), f"{path} (first {n_val} rows)", width) \
                if n_val else torch.empty(0, self.cache.width)
            if n_val == 0:
                check_vectors(self.cache.rows(0, 2), path, width)
            self.first_train_row = n_val
            self.vectors = None
        else:
            self.cache = None
            self.vectors = check_not_all_zero(check_vectors(load_vectors(path), path, width), path)
            self.train_rows, self.val_rows = split_holdout(len(self.vectors), val_fraction, self.seed)

    @property
    def d_in(self) -> int:
        return int(self.cache.width if self.cache is not None else self.vectors.shape[1])

    def train_dataloader(self) -> Iterable[Tensor]:
        rank, world = self.rank_and_world
        if self.cache is not None:
            self._train_stream = ShardStream(self.cache, self.first_train_row, self.device, self.batch_size, self.seed,
                                             rank, world, self._start_batch, self.shuffle_vectors)
        else:
            self._train_stream = VectorStream(self.vectors, self.train_rows, self.device, self.batch_size, self.seed,
                                              rank, world, self._start_batch)
        return self._train_stream

    def val_dataloader(self) -> Batches:
        val = self.val_vectors if self.cache is not None else self.vectors[self.val_rows]
        return Batches([b.to(self.device) for b in val.split(self.batch_size)])

    def sample_vectors(self, n: int) -> Tensor:
        rng = np.random.default_rng(derive_seed(self.seed, 8))
        if self.cache is not None:
            train = len(self.cache) - self.first_train_row
            positions = self.first_train_row + rng.choice(train, size=min(n, train), replace=False)
            return self.cache.gather(positions).to(self.device)
        rows = self.train_rows[torch.from_numpy(rng.permutation(len(self.train_rows))[:n])]
        return self.vectors[rows].to(self.device)
