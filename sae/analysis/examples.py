"""Dataset examples: the image patches that activate a unit (an SAE feature or a neuron) the most.

A unit's activation at layer position (i, j) depends only on the pixels of that position's receptive field,
so the patch to show is exactly that field (`sae.model.crop_box`), never a guess. Examples are one per image
(the image's strongest position), as in OpenAI Microscope: otherwise the neighbouring positions of a single
image fill the top k.

    top = top_activations(extractor, sae, images, units=[12, 40], k=9, input_scale=scale)
    tiles = crops(images, extractor.layer, top)            # (2, 9, 3, 64, 64)
    image_grid(tiles, ["feature 12", "feature 40"], tile_captions(top)).save("examples.png")
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.model import receptive_field

# InceptionV1 subtracts 117 from pixels and then zero-pads: outside the image the network sees pixel 117.
PAD_VALUE = 117 / 255
ENCODE_ROWS = 8192  # vectors encoded at once: bounds the (rows, d_sae) feature matrix in memory


@dataclass
class TopExamples:
    """The k strongest images of each unit, one position per image, best first.

    units: the n_units unit indices. values (n_units, k) float: the activation at (row, col) of image
    image_index; image_index, row, col (n_units, k) long: positions in the layer's (h, w) grid.
    """

    units: list[int]
    values: Tensor
    image_index: Tensor
    row: Tensor
    col: Tensor


@dataclass
class ActivationScan:
    """Per-image maxima of units over a set of images, and how often each unit fired.

    image_max (N, U): each image's largest activation; argmax (N, U) long: its flat position i * w + j;
    fire_count (U,) long: positions where the unit was > 0; n_vectors: positions seen; grid: (h, w).
    """

    units: list[int]
    image_max: Tensor
    argmax: Tensor
    fire_count: Tensor
    n_vectors: int
    grid: tuple[int, int]

    @property
    def frequency(self) -> Tensor:
        """(U,) float: the fraction of positions where each unit fired."""
        return self.fire_count.float() / max(self.n_vectors, 1)

    def top(self, units: Sequence[int] | None = None, k: int = 9) -> TopExamples:
        """The top k images of `units` (indices into this scan's units; all by default); k <= N images."""
        units = list(self.units) if units is None else [int(u) for u in units]
        column = {u: c for c, u in enumerate(self.units)}
        missing = [u for u in units if u not in column]
        if missing:
            raise KeyError(f"units {missing} were not scanned; scan them (units=None scans all)")
        columns = torch.tensor([column[u] for u in units], dtype=torch.long)
        image_max = self.image_max[:, columns].T  # (n_units, N)
        k = min(int(k), image_max.shape[1])
        values, image_index = image_max.topk(k, dim=1)
        flat = self.argmax[:, columns].T.gather(1, image_index)
        _, w = self.grid
        return TopExamples(units, values, image_index, flat // w, flat % w)


class _Scanner:
    """Folds image-major rows of unit activations (image n, position p at row n*h*w + p) into an ActivationScan.

    Batches need not align with images: the rows of an unfinished image wait for the next update.
    """

    def __init__(self, units: list[int], grid: tuple[int, int]):
        self.units, self.grid, self.per_image = units, grid, grid[0] * grid[1]
        self.maxima: list[Tensor] = []
        self.argmax: list[Tensor] = []
        self.fire_count: Tensor | None = None
        self.n_vectors = 0
        self.pending: Tensor | None = None

    def update(self, acts: Tensor) -> None:
        """acts (R, U): the next R rows."""
        acts = acts.float()
        fired = (acts > 0).sum(0)
        self.fire_count = fired if self.fire_count is None else self.fire_count + fired
        self.n_vectors += acts.shape[0]
        if self.pending is not None:
            acts = torch.cat([self.pending, acts])
        n_images = acts.shape[0] // self.per_image
        done = n_images * self.per_image
        if n_images:
            values, argmax = acts[:done].reshape(n_images, self.per_image, -1).max(dim=1)
            self.maxima.append(values.cpu())
            self.argmax.append(argmax.cpu())
        self.pending = acts[done:] if done < acts.shape[0] else None

    def result(self) -> ActivationScan:
        if self.pending is not None:
            raise ValueError(
                f"{self.pending.shape[0]} rows left over: the vectors are not whole images of {self.grid[0]}x"
                f"{self.grid[1]} positions. Pass every position of every image (image-major order)."
            )
        if not self.maxima:
            raise ValueError("no images to scan")
        return ActivationScan(self.units, torch.cat(self.maxima), torch.cat(self.argmax),
                              self.fire_count.cpu(), self.n_vectors, self.grid)


@contextmanager
def evaluating(module: nn.Module):
    """Eval mode inside, the previous mode after (BatchTopK encodes with its threshold in eval mode)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def unit_activations(sae: nn.Module | None, units: Sequence[int] | None, input_scale: float = 1.0) -> Callable:
    """A function (R, d_in) layer vectors -> (R, U) activations of `units` (all units if None).

    With an SAE, units are its features and the vectors are multiplied by `input_scale` first (the scale the
    SAE was trained at; exported SAEs are in the layer's units, scale 1). Without, units are neurons, in the
    layer's raw units.
    """
    index = None if units is None else torch.as_tensor(list(units), dtype=torch.long)

    def activations(x: Tensor) -> Tensor:
        if sae is not None:
            x = sae.encode(x.float() * input_scale)
        return x if index is None else x[:, index.to(x.device)]

    return activations


def scan_vectors(batches: Iterable[Tensor], grid: tuple[int, int], sae: nn.Module | None = None,
                 units: Sequence[int] | None = None, input_scale: float = 1.0) -> ActivationScan:
    """Scan precomputed layer vectors: batches of (B, d_in) rows, every position of every image, image-major.

    This is the layout of `ImageActivationDataModule.val_dataloader()`, whose image n is
    `held_out_images()[n]`. units=None scans every unit (all SAE features: needed for firing frequencies).
    """
    width = sae.d_sae if sae is not None else None
    all_units = list(units) if units is not None else None
    activations = unit_activations(sae, units, input_scale)
    scanner: _Scanner | None = None
    context = evaluating(sae) if sae is not None else _nothing()
    with torch.inference_mode(), context:
        for batch in batches:
            if all_units is None:
                all_units = list(range(width if width is not None else batch.shape[1]))
            scanner = scanner or _Scanner(all_units, grid)
            for rows in batch.split(ENCODE_ROWS):
                scanner.update(activations(rows))
    if scanner is None:
        raise ValueError("no vectors to scan")
    return scanner.result()


@contextmanager
def _nothing():
    yield


def top_activations(extractor: nn.Module, sae: nn.Module | None, images: Tensor, units: Sequence[int], k: int = 9,
                    batch_size: int = 32, input_scale: float = 1.0) -> TopExamples:
    """The k images of `images` (N, 3, S, S) uint8 where each unit fires the most, and where.

    extractor: `sae.model.InceptionExtractor` of the SAE's layer. sae=None: units are neurons. input_scale:
    see `unit_activations`. Returns TopExamples with k = min(k, N).
    """
    check_images(images)
    grid = tuple(extractor.output_shape(tuple(images.shape[-2:]))[1:])

    def batches():
        for pixels in images.split(batch_size):
            acts = extractor(pixels)  # (B, C, h, w)
            yield acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])  # image-major, position i * w + j

    with torch.inference_mode():
        return scan_vectors(batches(), grid, sae, units, input_scale).top(k=k)


def check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels in [0, 255], got {images.dtype}; convert with (x * 255).byte()")


def crops(images: Tensor, layer: str, top: TopExamples, size: int = 64) -> Tensor:
    """Receptive-field crops of each example: (n_units, k, 3, size, size) float in [0, 1].

    images: the (N, 3, H, W) uint8 images `top` indexes. The crop is the field of `layer` at (row, col),
    `sae.model.crop_box`, padded with InceptionV1's own padding value (grey 117) where the field leaves the
    image, so every crop shows the field at the same scale. Resized to `size` (nearest when enlarging, so
    small fields stay pixel-exact).
    """
    check_images(images)
    field = receptive_field(layer)
    pad = field.size  # enough for any field that still overlaps the image
    padded = F.pad(images.float() / 255, (pad, pad, pad, pad), value=PAD_VALUE)
    n_units, k = top.values.shape
    out = torch.empty(n_units, k, 3, size, size)
    for u in range(n_units):
        for e in range(k):
            top_px = field.start + int(top.row[u, e]) * field.stride + pad
            left_px = field.start + int(top.col[u, e]) * field.stride + pad
            patch = padded[int(top.image_index[u, e]), :, top_px:top_px + field.size, left_px:left_px + field.size]
            out[u, e] = resize(patch, size)
    return out


def resize(patch: Tensor, size: int) -> Tensor:
    """(3, h, w) -> (3, size, size): nearest when enlarging, antialiased bilinear when shrinking."""
    if patch.shape[-1] <= size:
        return F.interpolate(patch[None], size=(size, size), mode="nearest")[0]
    return F.interpolate(patch[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def tile_captions(top: TopExamples) -> list[list[str]]:
    """The activation value under each example: n_units lists of k strings."""
    return [[f"{v:.3g}" for v in row.tolist()] for row in top.values]


def select_features(frequency: Tensor | None, how: str | Sequence[int] = "frequent", n: int = 8,
                    seed: int = 0) -> list[int]:
    """Which features to show: the `n` most frequent, `n` random alive ones, or an explicit list.

    frequency: (d_sae,) firing frequencies (needed for "frequent" and "random"; alive = frequency > 0).
    Returns at most n indices (fewer if fewer are alive); a list is returned as given, after a range check.
    """
    if not isinstance(how, str):
        features = [int(i) for i in how]
        if frequency is not None and any(not 0 <= i < len(frequency) for i in features):
            raise ValueError(f"feature indices {features} must lie in [0, d_sae={len(frequency)})")
        return features
    if how not in ("frequent", "random"):
        raise ValueError(f"features={how!r} is unknown: use 'frequent', 'random' or a list of feature indices")
    if frequency is None:
        raise ValueError(f"features={how!r} needs firing frequencies; pass a list of feature indices instead")
    alive = torch.nonzero(frequency > 0).flatten()
    if how == "frequent":
        order = frequency[alive].argsort(descending=True, stable=True)
        return alive[order[:n]].tolist()
    return sorted(random.Random(seed).sample(alive.tolist(), min(n, len(alive))))


def select_neurons(d_in: int, how: int | Sequence[int] = 4, seed: int = 0) -> list[int]:
    """The baseline neurons: `how` random ones (seeded, so the same every call), or an explicit list."""
    if isinstance(how, int):
        return sorted(random.Random(seed).sample(range(d_in), min(how, d_in)))
    neurons = [int(i) for i in how]
    if any(not 0 <= i < d_in for i in neurons):
        raise ValueError(f"neuron indices {neurons} must lie in [0, d_in={d_in})")
    return neurons


def image_grid(tiles: Tensor, captions: Sequence[str] | None = None,
               tile_captions: Sequence[Sequence[str]] | None = None, title: str | None = None):
    """Tiles (n, k, 3, S, S) in [0, 1] (or uint8) -> a PIL image: n rows of k tiles.

    captions: one label per row, drawn left of it; tile_captions: n lists of k strings drawn under the
    tiles (e.g. activation values); title: a line above everything.
    """
    from PIL import Image, ImageDraw

    if tiles.ndim != 5 or tiles.shape[2] != 3:
        raise ValueError(f"expected tiles of shape (n, k, 3, S, S), got {tuple(tiles.shape)}")
    n, k, _, height, width = tiles.shape
    pixels = tiles if tiles.dtype == torch.uint8 else (tiles.detach().float().clamp(0, 1) * 255).round().byte()
    font = _font(11)
    gap = 2
    label_w = 0 if not captions else max(_text_width(font, c) for c in captions) + 8
    caption_lines = max((str(c).count("\n") + 1 for row in tile_captions or [] for c in row), default=0)
    caption_h = 13 * caption_lines + 2 if caption_lines else 0
    title_h = 18 if title else 0
    row_h = height + caption_h + gap
    canvas = Image.new("RGB", (label_w + k * (width + gap) + gap, title_h + n * row_h + gap), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    for r in range(n):
        y = title_h + gap + r * row_h
        if captions:
            lines = str(captions[r]).count("\n") + 1
            draw.multiline_text((4, y + height // 2 - 7 * lines), str(captions[r]), fill="black", font=font)
        for c in range(k):
            x = label_w + gap + c * (width + gap)
            canvas.paste(Image.fromarray(pixels[r, c].permute(1, 2, 0).cpu().numpy()), (x, y))
            if tile_captions:
                draw.multiline_text((x + 2, y + height + 1), str(tile_captions[r][c]), fill="black", font=font)
    return canvas


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    return max(int(font.getbbox(line)[2] - font.getbbox(line)[0]) for line in str(text).split("\n"))
