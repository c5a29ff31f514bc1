"""Image sources and the per-image transform that feeds the extractor.

Everything here runs in DataLoader workers: it decodes, crops and flips, and returns uint8 tensors.
InceptionV1 never runs here; it runs on the training device (see `sae.data.stream`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from sae.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"})

# scikit-image's bundled colour photographs (no download needed).
SAMPLE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)


class ImageSourceError(UserError, ValueError):
    """An image source that cannot produce a single image (missing, empty or all corrupt)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB.

    Grayscale, palette, CMYK and RGBA are converted by PIL. 16-bit and float images ("I;16", "I", "F")
    are rescaled to 0..255 first, because PIL's own conversion clips them to 255.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        image = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        # Composite on mid-grey rather than black: transparent areas should carry no edges.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (128, 128, 128, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


@dataclass(frozen=True)
class CropSpec:
    """Random-resized-crop parameters.

    size: output side in pixels; scale: range of the crop's area as a fraction of the image's;
    ratio: range of the crop's aspect ratio; flip: probability of a horizontal flip.
    """

    size: int = 224
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5


def random_crop_box(width: int, height: int, spec: CropSpec, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) box drawn as in Inception's random-resized crop."""
    area = width * height
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    return center_crop_box(width, height)


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_to_tensor(image: Image.Image, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """Crop `box`, resize to (size, size) (up or down), optionally flip: a (3, size, size) uint8 tensor."""
    out = image.resize((size, size), resample=Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageSource:
    """A finite, indexable list of images. Subclasses implement `__len__`, `load` and `describe`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        """The image at `index` as RGB; raises OSError/ValueError if it cannot be decoded."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"image {index}"

    def validate(self, probe: int = 16) -> None:
        """Fail before any training if the source is empty or if the first `probe` images all fail."""
        if len(self) == 0:
            raise ImageSourceError(f"{self!r} contains no images.")
        errors = []
        for i in range(min(probe, len(self))):
            try:
                self.load(i)
                return
            except Exception as e:  # noqa: BLE001 - any decoder failure counts as corrupt
                errors.append(f"{self.describe(i)}: {e}")
        raise ImageSourceError(
            f"{self!r}: none of the first {len(errors)} images could be decoded, e.g. {errors[0]}. "
            "Check that the folder holds readable image files (JPEG, PNG, ...)."
        )


class SampleImages(ImageSource):
    """scikit-image's bundled colour photographs: works offline, with no setup (`data=sample`)."""

    def __init__(self, names: tuple[str, ...] | list[str] = SAMPLE_PHOTOS):
        self.names = tuple(names)
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> Image.Image:
        if index not in self._cache:
            import skimage.data

            array = getattr(skimage.data, self.names[index])()
            if isinstance(array, tuple):  # stereo pairs: take the left image
                array = array[0]
            self._cache[index] = to_rgb(Image.fromarray(array))
        return self._cache[index]

    def describe(self, index: int) -> str:
        return f"skimage.data.{self.names[index]}"

    def __repr__(self) -> str:
        return f"SampleImages({len(self)} scikit-image photographs)"


class ImageFolder(ImageSource):
    """Every image file under `root`, recursively, in sorted order (ImageNet's train folder or any tree).

    Sorting makes the file order, and so every derived stream, identical on every machine.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise ImageSourceError(f"data.root={str(root)!r} does not exist. Point data.root at a folder of images.")
        if not self.root.is_dir():
            raise ImageSourceError(f"data.root={str(root)!r} is not a folder. Point data.root at a folder of images.")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ImageSourceError(
                f"data.root={str(root)!r} holds no image files (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, "
                "recursively)."
            )

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as image:
            image.load()
            return to_rgb(image)

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} files)"


# Truncated files raise instead of being silently padded with grey; they are then skipped and counted.
ImageFile.LOAD_TRUNCATED_IMAGES = False
