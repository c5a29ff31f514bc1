"""The activation data path: image sources, the shuffle window, determinism, exact resume, vectors files."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sae.data import (
    ActivationStream,
    CropSpec,
    ImageActivationDataModule,
    ImageFolder,
    ImageSource,
    ImageSourceError,
    ImageStream,
    SampleImages,
    VectorDataModule,
    VectorFileError,
    to_rgb,
    to_vectors,
)
from sae.model import InceptionExtractor
from tests.helpers import write_images


@pytest.fixture(scope="module")
def conv2d0() -> InceptionExtractor:
    torch.manual_seed(0)
    return InceptionExtractor("conv2d0", pretrained=False)


def take(stream, n: int) -> list[torch.Tensor]:
    return list(islice(iter(stream), n))


def make_stream(folder: Path, extractor: nn.Module, seed: int = 0, start_batch: int = 0, **kw) -> ActivationStream:
    source = ImageFolder(folder)
    images = ImageStream(source, list(range(len(source))), CropSpec(size=kw.pop("size", 32)), seed)
    args = dict(batch_size=256, positions_per_image=None, vectors_per_window=1024, image_batch_size=4, num_workers=0)
    args.update(kw)
    return ActivationStream(images, extractor, torch.device("cpu"), seed=seed, start_batch=start_batch, **args)


def test_stream__is_deterministic_under_seed(image_folder, conv2d0):
    a = take(make_stream(image_folder, conv2d0, seed=1), 3)
    b = take(make_stream(image_folder, conv2d0, seed=1), 3)
    c = take(make_stream(image_folder, conv2d0, seed=2), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (256, 64)


def test_stream__resumes_exactly_at_any_batch(image_folder, conv2d0):
    stream = make_stream(image_folder, conv2d0, seed=3)
    reference = take(stream, 3 * stream.batches_per_window + 2)
    for start in (1, stream.batches_per_window, stream.batches_per_window + 1):  # inside and across windows
        resumed = take(make_stream(image_folder, conv2d0, seed=3, start_batch=start), 3)
        assert all(torch.equal(x, y) for x, y in zip(resumed, reference[start : start + 3]))


def test_stream__workers_give_the_same_batches_as_the_main_process(image_folder, conv2d0):
    a = take(make_stream(image_folder, conv2d0, seed=4, num_workers=0), 2)
    b = take(make_stream(image_folder, conv2d0, seed=4, num_workers=2), 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


class ColouredImages(ImageSource):
    """Uniformly coloured images whose red value encodes their index."""

    def __len__(self) -> int:
        return 200

    def load(self, index: int) -> Image.Image:
        return Image.new("RGB", (40, 40), (index, 0, 0))


class MeanColour(nn.Module):
    """An extractor whose every vector is its image's red value: each vector names its source image."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) uint8 -> (B, 1, 4, 4)
        return images[:, :1].float().mean(dim=(2, 3), keepdim=True).expand(-1, -1, 4, 4).contiguous()


def test_shuffle_window__a_batch_mixes_many_images():
    images = ImageStream(ColouredImages(), list(range(200)), CropSpec(size=8), seed=0)
    stream = ActivationStream(images, MeanColour(), torch.device("cpu"), batch_size=64, positions_per_image=None,
                              vectors_per_window=1024, image_batch_size=16, num_workers=0, seed=0)
    # 16 positions per image; one batch of 64 without shuffling would hold just 4 images.
    for batch in take(stream, 5):
        _, counts = batch.flatten().round().unique(return_counts=True)
        assert len(counts) >= 32, "a batch should draw from many images"
        assert counts.max() <= 8, "no image should dominate a batch"


def test_positions_per_image__samples_distinct_positions():
    acts = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = to_vectors(acts, 5, torch.Generator().manual_seed(0))
    assert out.shape == (10, 3)
    first_image = out[:5, 0]
    assert first_image.unique().numel() == 5 and bool((first_image < 16).all())
    assert torch.equal(to_vectors(acts, None, None)[:, 0], torch.cat([torch.arange(16.0), torch.arange(48.0, 64.0)]))


def test_imagefolder__skips_and_counts_corrupt_files(tmp_path, conv2d0):
    root = tmp_path / "imgs"
    write_images(root, 8)
    (root / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "class1" / "truncated.png").write_bytes((root / "class1" / "img001.jpg").read_bytes()[:200])
    stream = make_stream(root, conv2d0, seed=0, vectors_per_window=256 * 20)
    batches = take(stream, 3)
    assert all(torch.isfinite(b).all() for b in batches)
    assert stream.stats.skipped_images >= 2  # each corrupt file was met at least once in the first 20 images


def test_imagefolder__missing_empty_or_all_corrupt_fails_before_training(tmp_path):
    with pytest.raises(ImageSourceError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match="no image files"):
        ImageFolder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageSourceError, match="could be decoded"):
        ImageFolder(bad).validate()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (20, 10), 200),
        lambda: Image.new("CMYK", (20, 10), (0, 255, 0, 0)),
        lambda: Image.new("RGBA", (20, 10), (255, 0, 0, 0)),
        lambda: Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16)),
        lambda: Image.new("P", (20, 10), 3),
    ],
    ids=["grayscale", "cmyk", "rgba", "16-bit", "palette"],
)
def test_to_rgb__converts_every_mode_to_8bit_rgb(make):
    out = to_rgb(make())
    assert out.mode == "RGB" and out.size == (20, 10)


def test_small_images__are_resized_up_to_the_crop(tmp_path, conv2d0):
    root = tmp_path / "tiny"
    write_images(root, 4, size=(9, 7))
    batch = take(make_stream(root, conv2d0, size=64, vectors_per_window=32 * 32 * 4), 1)[0]
    assert batch.shape == (256, 64)


def test_sample_images__need_no_setup():
    source = SampleImages()
    assert len(source) >= 8
    assert source.load(0).mode == "RGB"


def test_datamodule__holds_out_validation_images(image_folder, conv2d0):
    dm = ImageActivationDataModule(conv2d0, root=str(image_folder), batch_size=512, image_size=32, val_images=4,
                                   num_workers=0, vectors_per_window=1024, image_batch_size=4)
    assert not set(dm.val_indices) & set(dm.train_indices)
    assert dm.d_in == 64 and dm.vectors_per_image == 16 * 16
    val = dm.val_dataloader()
    assert sum(b.shape[0] for b in val) == 4 * 16 * 16


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_vectors__load_from_every_format(tmp_path, suffix):
    data = torch.randn(100, 8)
    path = tmp_path / f"v{suffix}"
    if suffix == ".npy":
        np.save(path, data.numpy())
    elif suffix == ".pt":
        torch.save(data, path)
    else:
        from safetensors.torch import save_file

        save_file({"activations": data}, path)
    dm = VectorDataModule(str(path), batch_size=16, val_fraction=0.1, expected_width=8)
    batches = take(dm.train_dataloader(), 7)
    assert dm.d_in == 8 and all(b.shape == (16, 8) for b in batches)
    seen = torch.cat(batches[:5])
    assert seen.unique(dim=0).shape[0] == 80, "one epoch visits every training row once"


def test_vectors__reject_nan_and_wrong_width(tmp_path):
    data = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    data[7, 3] = np.nan
    np.save(tmp_path / "nan.npy", data)
    with pytest.raises(VectorFileError, match="NaN or inf.*row 7"):
        VectorDataModule(str(tmp_path / "nan.npy"))
    np.save(tmp_path / "wide.npy", np.zeros((50, 9), np.float32))
    with pytest.raises(VectorFileError, match="width 9.*480 channels"):
        VectorDataModule(str(tmp_path / "wide.npy"), expected_width=480)
