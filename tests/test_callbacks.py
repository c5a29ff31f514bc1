"""Callbacks and dataset examples: values by hand, files per logger, W&B offline media, schedules.

Training runs are in-process and tiny: conv2d0 (random weights) on 32-pixel crops of generated images.
"""

from __future__ import annotations

import logging
import json
import re
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from callbacks import DatasetExamples, FeatureVisualization, SparsityMonitor
from callbacks.periodic import PeriodicCallback
from callbacks.sparsity import TRAIN_KEYS
from sae.analysis.examples import (
    PAD_VALUE,
    TopExamples,
    crops,
    image_grid,
    scan_vectors,
    select_features,
    top_activations,
)
from sae.data import ImageActivationDataModule, VectorDataModule
from sae.metrics import SparsityMetrics
from sae.model import InceptionExtractor, crop_box, load_inceptionv1
from sae.nn import build_sae
from sae.train import SAEModule
from sae.train.multi import MultiSAEModule

LAYER = "conv2d0"  # 64 channels, receptive field 7 px, stride 2: 16 x 16 positions on 32-px images


@pytest.fixture(scope="module")
def extractor():
    return InceptionExtractor(LAYER, net=load_inceptionv1(pretrained=False))


def small_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---------------------------------------------------------------- dataset examples by hand


def test_scan__top_examples_and_frequency_by_hand():
    # 3 images of 2 x 2 positions, 2 neurons; rows image-major (image n, position p at row 4n + p).
    acts = torch.tensor([
        [0.0, 1.0], [5.0, 0.0], [0.0, 0.0], [1.0, 0.0],   # image 0: neuron 0 peaks at position 1 = (0, 1)
        [0.0, 2.0], [0.0, 0.0], [3.0, 0.0], [0.0, 9.0],   # image 1: neuron 0 at 2 = (1, 0); neuron 1 at 3
        [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, 0.0],   # image 2: neuron 0 at 3 = (1, 1)
    ])
    scan = scan_vectors([acts[:5], acts[5:]], (2, 2))  # a batch boundary inside image 1
    # Fired on 4 and 3 of 12 positions.
    torch.testing.assert_close(scan.frequency, torch.tensor([4 / 12, 3 / 12]))
    top = scan.top([0, 1], k=2)
    assert top.values.tolist() == [[5.0, 4.0], [9.0, 1.0]]
    assert top.image_index.tolist() == [[0, 2], [1, 0]]
    assert top.row.tolist() == [[0, 1], [1, 0]] and top.col.tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="whole images"):
        scan_vectors([acts[:6]], (2, 2))


def test_top_activations__are_the_units_largest_values_one_per_image(extractor):
    images = small_images(5)
    sae = build_sae("relu", extractor.d_in, d_sae=128)
    with torch.no_grad():
        acts = extractor(images)  # (5, 64, 16, 16)
        rows = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])
        features = sae.encode(2.0 * rows).reshape(5, 16, 16, -1).permute(0, 3, 1, 2)  # input_scale 2
    for model, units, expected in ((None, [0, 3], acts), (sae, [7, 100], features)):
        top = top_activations(extractor, model, images, units, k=3, batch_size=2, input_scale=2.0)
        assert top.values.shape == (2, 3)
        for u, unit in enumerate(units):
            per_image_max = expected[:, unit].flatten(1).max(1).values
            torch.testing.assert_close(top.values[u], per_image_max.sort(descending=True).values[:3])
            for e in range(3):
                n, i, j = int(top.image_index[u, e]), int(top.row[u, e]), int(top.col[u, e])
                assert float(expected[n, unit, i, j]) == pytest.approx(float(top.values[u, e]))


def test_crops__are_the_receptive_field_padded_with_inceptions_grey():
    images = small_images(2)
    top = TopExamples([0], torch.ones(1, 2), torch.tensor([[1, 0]]), torch.tensor([[5, 0]]), torch.tensor([[6, 0]]))
    tiles = crops(images, LAYER, top, size=7)  # conv2d0's field is 7 px: no resizing
    assert tiles.shape == (1, 2, 3, 7, 7)
    top_px, left, bottom, right = crop_box(LAYER, 5, 6, 32)  # fully inside: rows 8..14, columns 10..16
    torch.testing.assert_close(tiles[0, 0], images[1, :, top_px:bottom, left:right].float() / 255)
    # Position (0, 0) sees pixels -2..4: two rows and columns of padding, then the image's corner.
    torch.testing.assert_close(tiles[0, 1, :, 2:, 2:], images[0, :, :5, :5].float() / 255)
    assert bool((tiles[0, 1, :, :2, :] == PAD_VALUE).all()) and bool((tiles[0, 1, :, :, :2] == PAD_VALUE).all())


def test_select_features__frequent_random_alive_or_listed():
    frequency = torch.tensor([0.0, 0.3, 0.1, 0.0, 0.5, 0.2])
    assert select_features(frequency, "frequent", n=3) == [4, 1, 5]
    chosen = select_features(frequency, "random", n=3, seed=1)
    assert chosen == select_features(frequency, "random", n=3, seed=1) and set(chosen) <= {1, 2, 4, 5}
    assert select_features(frequency, "random", n=10) == [1, 2, 4, 5]  # only the alive ones exist
    assert select_features(frequency, [5, 0]) == [5, 0]
    with pytest.raises(ValueError, match="d_sae=6"):
        select_features(frequency, [6])
    with pytest.raises(ValueError, match="frequent"):
        select_features(frequency, "densest")


def test_image_grid__lays_out_rows_of_tiles_with_captions():
    grid = image_grid(torch.rand(2, 3, 3, 16, 16), ["feature 1", "feature 2"], [["1.0"] * 3] * 2, title="t")
    assert grid.width > 3 * 16 and grid.height > 2 * 16
    assert np.asarray(grid).shape[2] == 3


# ---------------------------------------------------------------- training runs


def image_data(extractor, image_folder: Path) -> ImageActivationDataModule:
    return ImageActivationDataModule(extractor, root=str(image_folder), batch_size=512, image_size=32,
                                     vectors_per_window=2048, image_batch_size=8, num_workers=0, val_images=6)


def fit(datamodule, root: Path, callbacks: list, logger=False, max_steps: int = 4,
        members: list | None = None) -> tuple[L.Trainer, SAEModule]:
    hparams = dict(d_in=datamodule.d_in, expansion=2, init_sample=1024, lr_warmup_steps=1, lr=1e-3)
    module = SAEModule(**hparams) if members is None else MultiSAEModule(members=members, **hparams)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, max_epochs=-1, val_check_interval=2, check_val_every_n_epoch=None,
        log_every_n_steps=2, num_sanity_val_steps=0, logger=logger, callbacks=callbacks, default_root_dir=root,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module


def visual_callbacks() -> list:
    return [
        SparsityMonitor(histogram_every_n_steps=2),
        FeatureVisualization(every_n_steps=2, steps=2, image_size=24, n_features=3, neurons=2),
        DatasetExamples(every_n_steps=2, k=4, n_features=3, neurons=2, crop_size=16),
    ]


def _flushed_history(path, last_key: bytes, timeout: float = 60.0) -> bytes:
    """The run's history file once W&B's writer process has flushed it: ``wandb.finish()`` can return while the
    service still holds the records (seen as a file with only its header), so wait for the last key logged."""
    deadline = time.monotonic() + timeout
    while last_key not in (history := path.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return history


def test_wandb_offline_run__holds_the_image_grids_histograms_and_feature_table(extractor, image_folder, tmp_path,
                                                                              capfd):
    import wandb

    from sae.run.loggers import FallbackWandbLogger  # what logger=wandb builds

    logger = FallbackWandbLogger(project="test", save_dir=str(tmp_path), offline=True)
    try:
        fit(image_data(extractor, image_folder), tmp_path, visual_callbacks(), logger)
    finally:
        wandb.finish()
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    media = [p.relative_to(run / "files" / "media" / "images").as_posix()
             for p in (run / "files" / "media" / "images").rglob("*.png")]
    for key in ("features/visualizations", "features/dataset_examples"):
        # the SAE grid every time, the neuron grid (which never changes) once, each under its own key
        assert sum(m.startswith(key + "/sae_") for m in media) >= 2, media
        assert sum(m.startswith(key + "/neurons_") for m in media) == 1, media
    assert "sizes do not match" not in capfd.readouterr().err, "one size per W&B image key"
    (table,) = (run / "files" / "media" / "table" / "features").glob("table_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["feature", "density", "visualization", "examples"]
    assert len(content["data"]) == 3 and all(row[2] and row[3] for row in content["data"])
    history = _flushed_history(next(run.glob("run-*.wandb")), b"sparsity/val_density")
    for key in (b"sparsity/density", b"sparsity/val_density"):
        assert re.search(re.escape(key) + rb'.{0,8}_type.{0,8}"histogram"', history, re.DOTALL), key
    for key in (b"sparsity/l0", b"sparsity/fvu", b"sparsity/dead_fraction", b"val/dense_fraction"):
        assert key in history
    assert b"sparsity/val_l0" not in history and b"sparsity/mse" not in history, "one key per quantity"
    assert not (tmp_path / "plots").exists(), "W&B has the histograms: no PNG needed"
    assert (tmp_path / "features" / "visualizations" / "sae_step0000004.png").is_file()


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_without_wandb__every_picture_is_a_file_in_the_run_directory(extractor, image_folder, tmp_path, logger):
    from lightning.pytorch.loggers import CSVLogger

    csv = CSVLogger(str(tmp_path), name="csv", version="") if logger == "csv" else False
    fit(image_data(extractor, image_folder), tmp_path, visual_callbacks(), csv)
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")}
    for step in (2, 4):
        for name in ("plots/density", "plots/val_density", "features/visualizations/sae",
                     "features/dataset_examples/sae", "features/dataset_examples/neurons"):
            assert f"{name}_step{step:07d}.png" in files, sorted(files)
    if logger == "csv":
        header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        for key in TRAIN_KEYS:
            assert f"sparsity/{key}" in header
        for key in SparsityMetrics.KEYS:
            assert f"val/{key}" in header and f"sparsity/val_{key}" not in header, "one key per quantity"
        assert "train/l0" not in header and "sparsity/mse" not in header


def test_visual_callbacks__show_every_member_of_a_multi_run(extractor, image_folder, tmp_path):
    fit(image_data(extractor, image_folder), tmp_path, visual_callbacks(),
        members=[{"name": "a"}, {"name": "b", "architecture": "topk", "k": 4}])
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")}
    for name in ("a", "b"):
        for picture in (f"plots/{name}/density", f"plots/{name}/val_density", f"features/visualizations/{name}/sae",
                        f"features/dataset_examples/{name}/sae"):
            assert f"{picture}_step0000004.png" in files, sorted(files)
    assert "features/dataset_examples/neurons_step0000004.png" in files, "the neurons once, for all members"


def test_module__validation_values_equal_a_direct_computation(extractor, image_folder, tmp_path):
    datamodule = image_data(extractor, image_folder)
    trainer, module = fit(datamodule, tmp_path, [], max_steps=2)  # validates after step 2
    with torch.no_grad():
        x = torch.cat(list(datamodule.val_dataloader())) * module.input_scale
        f = module.sae.encode(x)
        x_hat = module.sae.decode(f)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    freq = (f > 0).float().mean(0)
    expected = {"l0": float((f > 0).float().sum(1).mean()), "fvu": fvu, "explained_variance": 1 - fvu,
                "mse": float((x - x_hat).pow(2).mean()), "dead_fraction": float((freq == 0).float().mean()),
                "dense_fraction": float((freq > 0.1).float().mean())}
    for key, value in expected.items():
        assert float(trainer.callback_metrics[f"val/{key}"]) == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_visual_callbacks__say_once_that_vectors_have_no_images(tmp_path, caplog):
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).random((4096, 16), dtype=np.float32))
    callbacks = [FeatureVisualization(every_n_steps=1), DatasetExamples(every_n_steps=1)]
    with caplog.at_level(logging.WARNING, logger="sae"):
        fit(VectorDataModule(str(path), batch_size=256), tmp_path, callbacks)
    warnings = [r.getMessage() for r in caplog.records if "does nothing" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert not list(tmp_path.rglob("*.png"))


class Recorder(PeriodicCallback):
    name = "recorder"

    def run(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize("max_overhead, expected", [(None, [1, 2, 3, 4]), (1e-12, [1, 4])])
def test_periodic__runs_every_n_steps_and_at_end_within_its_time_budget(tmp_path, max_overhead, expected):
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).random((4096, 16), dtype=np.float32))
    recorder = Recorder(every_n_steps=1, max_overhead=max_overhead)
    recorder.steps = []
    fit(VectorDataModule(str(path), batch_size=256), tmp_path, [recorder])
    # A budget of ~0 postpones every periodic run after the first; the final run always happens.
    assert recorder.steps == expected
    assert Recorder().active is False and Recorder(at_end=True).active is True
