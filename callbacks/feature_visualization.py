"""FeatureVisualization: lucent renderings of chosen SAE features' decoder directions, next to neurons'."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch

from callbacks.held_out import Selection, visual_callbacks, feature_scan, frequency_label, has_images
from callbacks.media import add_to_feature_table, log_images, run_dir, save_png, step_name
from callbacks.periodic import PeriodicCallback
from sae.analysis.examples import image_grid
from sae.analysis.featureviz import feature_directions, neuron_directions, render_directions

log = logging.getLogger("sae")
GPU_STEPS, CPU_STEPS = 512, 64  # lucid's 512 where it is cheap; on a CPU a few minutes is all a run can spare


class FeatureVisualization(PeriodicCallback):
    """Feature visualizations (lucent: FFT image, decorrelated colour, standard transforms) on the truncated net.

    Every `every_n_steps` and at the end of training (rank zero), renders the decoder direction of the
    features chosen by `features` / `n_features` (see `callbacks.held_out.Selection`; their frequencies are
    measured on the held-out images) and, as the baseline, `neurons` of the layer (rendered once: the
    network is frozen). The objective is the activation's dot product with the direction, at the centre
    position or summed over `position="all"`.

    steps: Adam steps per rendering; None: 512 (lucid's default) on a GPU, 64 on a CPU. image_size: side
    of the rendered image. Logged as the W&B images `features/visualizations` (SAE grid, neuron grid) and
    saved as `<run_dir>/features/visualizations/{sae,neurons}_stepNNNNNNN.png`.
    Needs the InceptionV1 extractor, so it does nothing with precomputed vectors (data=vectors).
    """

    name = "feature_visualization"
    key = "features/visualizations"

    def __init__(self, every_n_steps: int | None = None, at_end: bool | None = None,
                 features: str | Sequence[int] = "spread", n_features: int = 8, neurons: int | Sequence[int] = 4,
                 steps: int | None = None, image_size: int = 128, position: str = "center", lr: float = 0.05,
                 seed: int = 0, max_overhead: float | None = 0.05) -> None:
        super().__init__(every_n_steps, at_end, max_overhead)
        if position not in ("center", "all"):
            raise ValueError(f"feature_visualization.position={position!r} is unknown: use 'center' or 'all'")
        self.selection = Selection(features, n_features, neurons, seed)
        self.steps = None if steps is None else int(steps)
        self.image_size, self.position, self.lr, self.seed = int(image_size), position, float(lr), int(seed)
        self._neuron_grid = None
        self._neurons_logged = False
        self.table_columns: dict[str, tuple] = {}  # per member: (density, image per feature) of the last rendering

    def render(self, extractor, directions: torch.Tensor) -> torch.Tensor:
        device = next(extractor.parameters()).device
        steps = self.steps or (GPU_STEPS if device.type == "cuda" else CPU_STEPS)
        return render_directions(extractor, directions, steps=steps, image_size=self.image_size,
                                 position=self.position, seed=self.seed, lr=self.lr, progress=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero and not self.disabled:
            for name, _ in pl_module.named_members():
                add_to_feature_table(trainer, pl_module.prefix(name), self, "visualization",
                                     *self.table_columns.get(name, ({}, {})), expected=visual_callbacks(trainer))

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not has_images(datamodule):
            self.disable("the data are precomputed vectors, with no InceptionV1 to render through")
            return
        for name, member in pl_module.named_members():
            self.run_member(trainer, name, pl_module.prefix(name), member)
        self.show_neurons(trainer)

    def run_member(self, trainer: L.Trainer, name: str, prefix: str, member) -> None:
        """Render one member's chosen features; logged under `prefix` (empty for a single SAE)."""
        extractor, step = trainer.datamodule.extractor, trainer.global_step
        scan = feature_scan(trainer, member)
        features = self.selection.pick_features(scan)
        if not features:
            log.warning("%s at step %d: no SAE feature of %s fired on the held-out images; nothing to show",
                        self.name, step, name or "the SAE")
            return
        images = self.render(extractor, feature_directions(member.sae, features))
        captions = [[f"feature {i}\n{frequency_label(scan, i)}" for i in features]]
        self.table_columns[name] = ({i: float(scan.frequency[scan.units.index(i)]) for i in features},
                                    {i: image_grid(images[j][None, None]) for j, i in enumerate(features)})
        sae_grid = image_grid(images[None], tile_captions=captions,
                              title=f"{prefix}SAE features of {extractor.layer}, step {step} ({self.position})")
        save_png(sae_grid, run_dir(trainer) / "features" / "visualizations" / step_name(f"{prefix}sae", step))
        # Each grid under its own key: W&B draws the images of one key at one size.
        log_images(trainer, f"{prefix}{self.key}/sae", [sae_grid], [f"SAE features {features} (step {step})"], step)

    def show_neurons(self, trainer: L.Trainer) -> None:
        """The layer's neurons beside the features: rendered once (the network is frozen), saved each time."""
        datamodule, step = trainer.datamodule, trainer.global_step
        extractor = datamodule.extractor
        neurons = self.selection.pick_neurons(datamodule.d_in)
        if self._neuron_grid is None:
            images = self.render(extractor, neuron_directions(datamodule.d_in, neurons))
            self._neuron_grid = image_grid(images[None], tile_captions=[[f"neuron {i}" for i in neurons]],
                                           title=f"neurons of {extractor.layer} ({self.position})")
        save_png(self._neuron_grid, run_dir(trainer) / "features" / "visualizations" / step_name("neurons", step))
        if not self._neurons_logged:
            log_images(trainer, f"{self.key}/neurons", [self._neuron_grid], [f"neurons {neurons}"], step)
            self._neurons_logged = True
