"""SparsityMonitor: `sparsity/*` metrics of training and validation, and the feature-density histogram."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from callbacks.media import has_wandb, log_histogram, run_dir, save_png, step_name
from sae.metrics import (
    DeadFraction,
    FeatureFiring,
    ReconstructionError,
    dense_fraction,
    density_histogram_figure,
    log10_density,
)

log = logging.getLogger("sae")

DEAD_WINDOW = 10_000_000  # vectors: the TopK paper's dead latent, when the module does not say otherwise
TRAIN_KEYS = ("explained_variance", "fvu", "l0", "dead_fraction", "dense_fraction")  # sparsity/<key>


class SparsityMonitor(L.Callback):
    """Logs torchmetrics sparsity metrics of training, exact under DDP (every state is a sum over ranks).

    Every `trainer.log_every_n_steps` steps, over the training vectors of that interval:
    `sparsity/{explained_variance,fvu,l0,dense_fraction}` and `sparsity/dead_fraction`, the fraction of
    features that fired on none of the last `dead_window` vectors. With `dead_window=null` that is the
    module's own counter (`vectors_since_fired` >= `dead_window`, min(10M, a fifth of the run), summed over
    ranks every step: the definition resampling acts on, at no extra cost); a number gives a separate
    `DeadFraction` metric with that window. The batch's MSE is the module's `train/mse` (a loss term) and the
    held-out values are the module's `val/*`: each quantity has one key.

    The log10 feature-density histogram, `log10(frequency + 1e-10)` (dead features at -10), goes to W&B
    (`wandb.Histogram`) or TensorBoard as `sparsity/density` every `histogram_every_n_steps` (over the
    vectors since the last one) and at the end of training, and as `sparsity/val_density` after each
    validation (the module's held-out frequencies). Without W&B it is also drawn as a PNG in `<run_dir>/plots/`.

    Reads the training step's outputs {"x", "x_hat", "f"} (x scaled as the SAE sees it). One pass over f
    per step (the firing counts); the histogram reuses each interval's counts. The metrics update on every
    rank and reduce over all of them (ranks see equal batches); loggers write on rank zero.
    """

    def __init__(self, dense_threshold: float = 0.1, histogram_every_n_steps: int | None = 500,
                 dead_window: int | None = None) -> None:
        if histogram_every_n_steps is not None and int(histogram_every_n_steps) < 1:
            raise ValueError(f"sparsity.histogram_every_n_steps={histogram_every_n_steps} must be >= 1 or null")
        self.dense_threshold = float(dense_threshold)
        self.histogram_every_n_steps = None if histogram_every_n_steps is None else int(histogram_every_n_steps)
        self.dead_window = None if dead_window is None else int(dead_window)
        self.reconstruction: ReconstructionError | None = None
        self.firing: FeatureFiring | None = None
        self.dead: DeadFraction | None = None
        self.density_counts: torch.Tensor | None = None  # (d_sae,) float64 firings since the last histogram
        self.density_vectors = 0
        self._pending_state: dict | None = None

    # -- set-up -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        sae, device = pl_module.sae, pl_module.device
        self.reconstruction = ReconstructionError(sae.d_in).to(device)
        self.firing = FeatureFiring(sae.d_sae).to(device)
        if self.dead_window is not None or not hasattr(pl_module, "vectors_since_fired"):
            self.dead = DeadFraction(sae.d_sae, self.dead_window or DEAD_WINDOW).to(device)
            if self._pending_state is not None:  # a resumed run: the dead-feature counter carries on
                self.dead.load_state_dict(self._pending_state, strict=False)
        self.density_counts = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
        self.density_vectors = 0

    def state_dict(self) -> dict[str, Any]:
        return {} if self.dead is None else {"dead": self.dead.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict.get("dead")

    # -- training ---------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(outputs, dict) or not {"x", "x_hat", "f"} <= outputs.keys():
            raise TypeError("SparsityMonitor needs training_step to return {'loss', 'x', 'x_hat', 'f'} "
                            "(SAEModule does); remove callbacks.sparsity for other modules.")
        self.reconstruction.update(outputs["x"], outputs["x_hat"])
        self.firing.update(outputs["f"])
        if self.dead is not None:
            self.dead.update(outputs["f"])
        step = trainer.global_step
        histogram_due = bool(self.histogram_every_n_steps) and step % self.histogram_every_n_steps == 0
        if step % max(1, trainer.log_every_n_steps) == 0 or histogram_due:
            values = self._end_interval(trainer, pl_module)
            # Already reduced over ranks (no sync_dist); Lightning writes it at this step, as train/* are.
            pl_module.log_dict({f"sparsity/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False)
        if histogram_due:
            self._histogram(trainer, "density", self._take_density(), step)

    def _end_interval(self, trainer, pl_module) -> dict[str, torch.Tensor]:
        """The interval's values (collective under DDP: every rank calls it); folds its firings into the density."""
        values = dict(self.reconstruction.compute())
        freq = self.firing.compute()
        n_vectors = int(self.firing.n_vectors) * trainer.world_size  # local count; ranks see equal batches
        self.density_counts += freq.double() * n_vectors
        self.density_vectors += n_vectors
        values["l0"] = freq.double().sum().float()
        if self.dead is not None:
            values["dead_fraction"] = self.dead.compute()
        else:
            values["dead_fraction"] = (pl_module.vectors_since_fired >= pl_module.dead_window).float().mean()
        values["dense_fraction"] = dense_fraction(freq, self.dense_threshold)
        self.reconstruction.reset()
        self.firing.reset()
        if self.dead is not None:
            self.dead.reset()
        return {k: values[k] for k in TRAIN_KEYS}

    def on_train_end(self, trainer, pl_module) -> None:
        if self.firing is not None and int(self.firing.n_vectors) > 0:
            self._end_interval(trainer, pl_module)
        if self.density_vectors > 0:
            self._histogram(trainer, "density", self._take_density(), trainer.global_step)

    def _take_density(self) -> torch.Tensor:
        freq = (self.density_counts / max(self.density_vectors, 1)).float()
        self.density_counts.zero_()
        self.density_vectors = 0
        return freq

    # -- validation -------------------------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        # After the module's on_validation_epoch_end (Lightning calls callbacks' epoch-end hooks first).
        freq = getattr(pl_module, "val_feature_frequency", None)
        if trainer.sanity_checking or freq is None:
            return
        self._histogram(trainer, "val_density", freq, trainer.global_step)

    # -- output -----------------------------------------------------------------------------------------
    def _histogram(self, trainer: L.Trainer, name: str, freq: torch.Tensor, step: int) -> None:
        if not trainer.is_global_zero:
            return
        log_histogram(trainer, f"sparsity/{name}", log10_density(freq.double()), step)
        if not has_wandb(trainer):
            title = "Validation feature density" if name.startswith("val") else "Feature density"
            figure = density_histogram_figure(freq, title=f"{title}, step {step}")
            save_png(figure, run_dir(trainer) / "plots" / step_name(name, step))
