"""The SAE's features and the layer's neurons on the held-out images, shared by the visual callbacks.

The held-out vectors are the validation batches the DataModule already extracted (image-major, every
position), so a scan costs one SAE encoding of them and no InceptionV1 pass: each visual callback scans on
its own call (small next to its rendering), and as the scan is a pure function of the SAE's parameters, both
select the same features at the same step.
"""

from __future__ import annotations

import lightning as L

from sae.analysis.examples import ActivationScan, scan_vectors, select_features, select_neurons

def has_images(datamodule) -> bool:
    return hasattr(datamodule, "held_out_images") and hasattr(datamodule, "extractor")


def feature_scan(trainer: L.Trainer, member) -> ActivationScan:
    """Every feature of one member's SAE (an SAETrainingState) over the held-out images: per-image maxima and
    firing frequencies."""
    datamodule = trainer.datamodule
    _, h, w = datamodule.layer_shape
    return scan_vectors(datamodule.val_dataloader(), (h, w), member.sae, input_scale=float(member.input_scale))


def neuron_scan(trainer: L.Trainer, neurons: list[int]) -> ActivationScan:
    """The given neurons over the held-out images (they never change: the network is frozen)."""
    datamodule = trainer.datamodule
    _, h, w = datamodule.layer_shape
    return scan_vectors(datamodule.val_dataloader(), (h, w), None, units=neurons)


class Selection:
    """Which SAE features and neurons to show: the callbacks' shared `features`/`neurons` arguments.

    features: "spread" (alive ones spread evenly over log density), "frequent" (most frequent on the held-out
    images), "random" (random alive ones, seeded) or a
    list of indices; n_features: how many; neurons: a number of random neurons (seeded) or a list.
    """

    def __init__(self, features="spread", n_features: int = 8, neurons=4, seed: int = 0) -> None:
        if isinstance(features, str) and features not in ("spread", "frequent", "random"):
            raise ValueError(f"features={features!r} is unknown: use 'spread', 'frequent', 'random' or a list of indices")
        self.features = features if isinstance(features, str) else [int(i) for i in features]
        self.n_features, self.seed = int(n_features), int(seed)
        self.neurons = neurons if isinstance(neurons, int) else [int(i) for i in neurons]

    def pick_features(self, scan: ActivationScan) -> list[int]:
        if self.features == "spread":
            from sae.analysis.units import select_spread

            return select_spread(scan.frequency, self.n_features)
        return select_features(scan.frequency, self.features, self.n_features, self.seed)

    def pick_neurons(self, d_in: int) -> list[int]:
        return select_neurons(d_in, self.neurons, self.seed)


def frequency_label(scan: ActivationScan, unit: int) -> str:
    """e.g. 'freq 3.1e-03' for a scanned unit."""
    column = scan.units.index(unit)
    return f"freq {float(scan.frequency[column]):.1e}"


def visual_callbacks(trainer: L.Trainer) -> list:
    """The picture-making callbacks that will run at the end of training (they share the W&B feature table)."""
    from callbacks.periodic import PeriodicCallback

    return [c for c in trainer.callbacks if isinstance(c, PeriodicCallback) and hasattr(c, "table_columns")
            and c.at_end and not c.disabled]
