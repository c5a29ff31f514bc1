"""DatasetExamples: the held-out image patches where chosen SAE features fire most, next to neurons'."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L

from callbacks.held_out import Selection, visual_callbacks, feature_scan, frequency_label, has_images, neuron_scan
from callbacks.media import add_to_feature_table, log_images, run_dir, save_png, step_name
from callbacks.periodic import PeriodicCallback
from sae.analysis.examples import ActivationScan, crops, image_grid, tile_captions

log = logging.getLogger("sae")


class DatasetExamples(PeriodicCallback):
    """Top-k receptive-field crops over `datamodule.held_out_images()`, the activation under each.

    Every `every_n_steps` and at the end of training (rank zero), for the features chosen by `features` /
    `n_features` (see `callbacks.held_out.Selection`) and, as the baseline, for `neurons` of the layer:
    one row per unit, the k images where it fires most (one position per image), each cropped to the
    layer's receptive field at that position (grey where the field leaves the image).

    Logged as the W&B images `features/dataset_examples` (SAE grid, neuron grid) and saved as
    `<run_dir>/features/dataset_examples/{sae,neurons}_stepNNNNNNN.png`. With precomputed vectors
    (data=vectors) there are no images: it says so once and does nothing.
    """

    name = "dataset_examples"
    key = "features/dataset_examples"

    def __init__(self, every_n_steps: int | None = None, at_end: bool | None = None,
                 features: str | Sequence[int] = "spread", n_features: int = 8, neurons: int | Sequence[int] = 4,
                 k: int = 9, crop_size: int = 64, seed: int = 0, max_overhead: float | None = 0.05) -> None:
        super().__init__(every_n_steps, at_end, max_overhead)
        self.selection = Selection(features, n_features, neurons, seed)
        self.k, self.crop_size = int(k), int(crop_size)
        self._neuron_grid = None  # the network is frozen: neurons' examples never change
        self._neurons_logged = False
        self.table_columns: dict[str, tuple] = {}  # per member: (density, examples per feature) of the last grid

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero and not self.disabled:
            for name, _ in pl_module.named_members():
                add_to_feature_table(trainer, pl_module.prefix(name), self, "examples",
                                     *self.table_columns.get(name, ({}, {})), expected=visual_callbacks(trainer))

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not has_images(datamodule):
            self.disable("the data has no images (precomputed vectors), so there are no dataset examples")
            return
        for name, member in pl_module.named_members():
            self.run_member(trainer, name, pl_module.prefix(name), member)
        self.show_neurons(trainer)

    def run_member(self, trainer: L.Trainer, name: str, prefix: str, member) -> None:
        """One member's chosen features; logged under `prefix` (empty for a single SAE)."""
        datamodule, step = trainer.datamodule, trainer.global_step
        images, layer = datamodule.held_out_images(), datamodule.extractor.layer
        scan = feature_scan(trainer, member)
        features = self.selection.pick_features(scan)
        if not features:
            log.warning("%s at step %d: no SAE feature of %s fired on the held-out images; nothing to show",
                        self.name, step, name or "the SAE")
            return
        sae_grid = self._grid(images, layer, scan, features, "feature",
                              f"{prefix}SAE features, step {step}: top {self.k} held-out crops")
        top = scan.top(features, self.k)
        tiles = crops(images, layer, top, self.crop_size)
        self.table_columns[name] = ({i: float(scan.frequency[scan.units.index(i)]) for i in features},
                                    {f: image_grid(tiles[j:j + 1], tile_captions=tile_captions(top)[j:j + 1])
                                     for j, f in enumerate(features)})
        save_png(sae_grid, run_dir(trainer) / "features" / "dataset_examples" / step_name(f"{prefix}sae", step))
        # Each grid under its own key: W&B draws the images of one key at one size.
        log_images(trainer, f"{prefix}{self.key}/sae", [sae_grid], [f"SAE features {features} (step {step})"], step)

    def show_neurons(self, trainer: L.Trainer) -> None:
        """The layer's neurons beside the features: scanned once (the network is frozen), saved each time."""
        datamodule, step = trainer.datamodule, trainer.global_step
        images, layer = datamodule.held_out_images(), datamodule.extractor.layer
        neurons = self.selection.pick_neurons(datamodule.d_in)
        if self._neuron_grid is None:
            self._neuron_grid = self._grid(images, layer, neuron_scan(trainer, neurons), neurons, "neuron",
                                           f"neurons of {layer}: top {self.k} held-out crops")
        save_png(self._neuron_grid, run_dir(trainer) / "features" / "dataset_examples" / step_name("neurons", step))
        if not self._neurons_logged:
            log_images(trainer, f"{self.key}/neurons", [self._neuron_grid], [f"neurons {neurons}"], step)
            self._neurons_logged = True

    def _grid(self, images, layer: str, scan: ActivationScan, units: list[int], kind: str, title: str):
        top = scan.top(units, self.k)
        tiles = crops(images, layer, top, self.crop_size)
        labels = [f"{kind} {u}\n{frequency_label(scan, u)}" for u in units]
        return image_grid(tiles, labels, tile_captions(top), title=title)
