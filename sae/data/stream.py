"""The activation stream: images → (workers) → device → extractor → vectors → shuffle window → batches.

Every batch is a pure function of (seed, rank, batch index), so a run resumes exactly by restarting the
stream at a batch index, with no buffer to checkpoint:

- image j of rank r's stream is file `perm_e[(j*W + r) mod N]` of epoch e, cropped with an RNG seeded by
  (seed, j*W + r); a corrupt file is replaced by the next one in the permutation (and counted);
- the stream is cut into windows of `images_per_window` images. A window's vectors (all positions, or
  `positions_per_image` random ones per image) are shuffled on the device with a generator seeded by
  (seed, rank, window) and served as `batches_per_window` batches of `batch_size` vectors.

A window holds vectors from many images, so that no batch is dominated by a few images (the
shuffle-buffer property; see `tests/test_data.py`). Resuming inside a window re-extracts that window once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from sae.data.images import CropSpec, ImageSource, ImageSourceError, center_crop_box, crop_to_tensor, random_crop_box

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and machines)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class ImageStream(Dataset):
    """Map-style view of an endless, shuffled stream of random crops.

    Index j is a position in the stream, not a file: `__getitem__(j)` returns
    `(image (3, S, S) uint8, skipped)` where `skipped` counts corrupt files passed over to produce it.
    """

    def __init__(self, source: ImageSource, indices: list[int], crop: CropSpec, seed: int):
        if not indices:
            raise ImageSourceError(f"{source!r}: no images left for training after holding out the validation set.")
        self.source, self.indices, self.crop, self.seed = source, list(indices), crop, seed
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(derive_seed(self.seed, epoch, 1)).permutation(len(self.indices))
            self._perm_epoch = epoch
        return self._perm

    def __len__(self) -> int:  # an endless stream; DataLoader only needs this for its repr
        return 2**62

    def __getitem__(self, j: int) -> tuple[Tensor, int]:
        n = len(self.indices)
        epoch, pos = divmod(int(j), n)
        perm = self._permutation(epoch)
        for skipped in range(n):
            index = self.indices[perm[(pos + skipped) % n]]
            try:
                image = self.source.load(index)
                break
            except Exception as e:  # noqa: BLE001 - corrupt or unreadable: skip and count, never crash
                log.warning("skipping unreadable image %s: %s", self.source.describe(index), e)
        else:
            raise ImageSourceError(f"{self.source!r}: every image failed to decode.")
        rng = np.random.default_rng(derive_seed(self.seed, j, 2))
        box = random_crop_box(image.width, image.height, self.crop, rng)
        return crop_to_tensor(image, box, self.crop.size, flip=bool(rng.random() < self.crop.flip)), skipped


class HeldOutImages(Dataset):
    """A fixed set of validation images: centre crops of held-out files, or seeded random crops."""

    def __init__(self, source: ImageSource, indices: list[int], crop: CropSpec, seed: int, random_crops: bool):
        self.source, self.indices, self.crop, self.seed, self.random_crops = source, indices, crop, seed, random_crops

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """(image (3, S, S) uint8, 0), or (zeros, 1) for a corrupt file: the caller drops and counts those, as
        the training stream skips and counts its own."""
        try:
            image = self.source.load(self.indices[i])
        except Exception as e:  # noqa: BLE001 - corrupt or unreadable: skip and count, never crash
            log.warning("skipping unreadable held-out image %s: %s", self.source.describe(self.indices[i]), e)
            return torch.zeros(3, self.crop.size, self.crop.size, dtype=torch.uint8), 1
        if self.random_crops:
            rng = np.random.default_rng(derive_seed(self.seed, i, 3))
            box = random_crop_box(image.width, image.height, self.crop, rng)
        else:
            box = center_crop_box(image.width, image.height)
        return crop_to_tensor(image, box, self.crop.size, flip=False), 0


class StreamSampler(Sampler[int]):
    """Endless indices j*world_size + rank for j = start, start+1, ...: disjoint streams per rank."""

    def __init__(self, start: int, rank: int = 0, world_size: int = 1):
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        j = self.start
        while True:
            yield j * self.world_size + self.rank
            j += 1


def to_vectors(acts: Tensor, positions_per_image: int | None, generator: torch.Generator | None) -> Tensor:
    """(B, C, H, W) activations → (B*P, C) vectors, P = H*W or `positions_per_image` random positions."""
    b, c, h, w = acts.shape
    vectors = acts.permute(0, 2, 3, 1).reshape(b, h * w, c)  # free for channels_last activations
    if positions_per_image is not None and positions_per_image < h * w:
        scores = torch.rand(b, h * w, device=acts.device, generator=generator)
        keep = scores.topk(positions_per_image, dim=1).indices  # k distinct random positions per image
        vectors = vectors.gather(1, keep.unsqueeze(-1).expand(-1, -1, c))
    return vectors.reshape(-1, c)


@dataclass
class StreamStats:
    """Counters the trainer logs; updated without host/device synchronization."""

    images: int = 0
    skipped_images: int = 0
    windows: int = 0


class ActivationStream:
    """Endless iterable of (batch_size, d_in) activation batches on `device`, starting at `start_batch`."""

    def __init__(
        self,
        images: ImageStream,
        extractor: nn.Module,
        device: torch.device,
        batch_size: int,
        positions_per_image: int | None,
        vectors_per_window: int,
        image_batch_size: int,
        num_workers: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        self.images, self.extractor, self.device = images, extractor, torch.device(device)
        self.batch_size, self.positions_per_image = batch_size, positions_per_image
        self.image_batch_size, self.num_workers = image_batch_size, num_workers
        self.seed, self.rank, self.world_size, self.start_batch = seed, rank, world_size, start_batch
        c, h, w = extractor_output_shape(extractor, images.crop.size)
        self.vectors_per_image = min(positions_per_image or h * w, h * w)
        loader_batches = max(1, math.ceil(vectors_per_window / (self.vectors_per_image * image_batch_size)))
        loader_batches = max(loader_batches, math.ceil(batch_size / (self.vectors_per_image * image_batch_size)))
        self.images_per_window = loader_batches * image_batch_size
        self.batches_per_window = self.images_per_window * self.vectors_per_image // batch_size
        self.stats = StreamStats()

    def _loader(self, first_image: int) -> DataLoader:
        return DataLoader(
            self.images,
            batch_size=self.image_batch_size,
            sampler=StreamSampler(first_image, self.rank, self.world_size),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
            worker_init_fn=ignore_sigint if self.num_workers > 0 else None,
        )

    def window(self, images: Iterator[tuple[Tensor, Tensor]], index: int) -> Tensor:
        """Extract and shuffle window `index`: (images_per_window * vectors_per_image, d_in)."""
        generator = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, self.rank, index, 4))
        chunks = []
        with torch.inference_mode():
            for _ in range(self.images_per_window // self.image_batch_size):
                pixels, skipped = next(images)
                pixels = pixels.to(self.device, non_blocking=True)
                chunks.append(to_vectors(self.extractor(pixels), self.positions_per_image, generator))
                self.stats.images += pixels.shape[0]
                self.stats.skipped_images += int(skipped.sum())  # a CPU tensor from the workers: no device sync
            vectors = torch.cat(chunks)
            order = torch.randperm(vectors.shape[0], device=self.device, generator=generator)
            return vectors[order[: self.batches_per_window * self.batch_size]]

    def __iter__(self) -> Iterator[Tensor]:
        first_window, skip = divmod(self.start_batch, self.batches_per_window)
        images = iter(self._loader(first_window * self.images_per_window))
        index = first_window
        while True:
            vectors = self.window(images, index)
            self.stats.windows += 1
            for b in range(skip, self.batches_per_window):
                # A clone outside inference mode: a normal tensor that autograd may save for backward.
                yield vectors[b * self.batch_size : (b + 1) * self.batch_size].clone()
            skip, index = 0, index + 1


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process: a terminal's Ctrl-C reaches the whole process group,
    and a worker that died of it would fail the main process's next fetch before it saved last.ckpt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def extractor_output_shape(extractor: nn.Module, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the extractor's output for square images of `image_size`.

    Computed from the architecture when the extractor can (`output_shape`), so that a compiled extractor is
    not compiled for a throwaway CPU call; otherwise one dry run on one image.
    """
    if callable(getattr(extractor, "output_shape", None)):
        return tuple(extractor.output_shape(image_size))
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    with torch.inference_mode():
        out = extractor(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device))
    return tuple(out.shape[1:])
