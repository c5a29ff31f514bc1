"""SparsityMonitor: `sparsity/*` metrics over each logging interval of training, and the feature-density histograms."""

from __future__ import annotations

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
    fire_counts,
    log10_density,
)

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

    Every SAE of the module is monitored: with several (sae=multi) each logs under its name
    (`<name>/sparsity/l0`, plots in `plots/<name>/`). Reads the training step's outputs["members"], one
    {"x", "x_hat", "f"} per SAE (x scaled as the SAE sees it). One pass over f
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
        self.trackers: list[MemberSparsity] = []  # one per member of the module, in its order
        self._pending_state: list | None = None

    # -- set-up -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if not hasattr(pl_module, "named_members"):
            raise TypeError("SparsityMonitor reads the SAEs of an SAETrainer (SAEModule, MultiSAEModule); remove "
                            "callbacks.sparsity for other modules.")
        pending = self._pending_state or []
        self.trackers = [MemberSparsity(name, member, self.dead_window, pending[i] if i < len(pending) else None)
                         for i, (name, member) in enumerate(pl_module.named_members())]

    def state_dict(self) -> dict[str, Any]:
        dead = [t.dead.state_dict() if t.dead is not None else None for t in self.trackers]
        return {"dead": dead} if any(d is not None for d in dead) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict.get("dead")  # the dead-feature counters carry on in a resumed run

    # -- training ---------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for tracker, out in zip(self.trackers, outputs["members"], strict=True):
            tracker.update(out)
        step = trainer.global_step
        histogram_due = bool(self.histogram_every_n_steps) and step % self.histogram_every_n_steps == 0
        if step % max(1, trainer.log_every_n_steps) == 0 or histogram_due:
            for tracker in self.trackers:
                values = tracker.end_interval(trainer.world_size, self.dense_threshold)
                # Already reduced over ranks (no sync_dist); Lightning writes it at this step, as train/* are.
                pl_module.log_dict({f"{tracker.prefix}sparsity/{k}": v for k, v in values.items()}, on_step=True,
                                   on_epoch=False)
        if histogram_due:
            for tracker in self.trackers:
                self._histogram(trainer, tracker.prefix, "density", tracker.take_density(), step)

    def on_train_end(self, trainer, pl_module) -> None:
        for tracker in self.trackers:
            if int(tracker.firing.n_vectors) > 0:
                tracker.end_interval(trainer.world_size, self.dense_threshold)
            if tracker.density_vectors > 0:
                self._histogram(trainer, tracker.prefix, "density", tracker.take_density(), trainer.global_step)

    # -- validation -------------------------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        # After the module's on_validation_epoch_end (Lightning calls callbacks' epoch-end hooks first).
        if trainer.sanity_checking or not hasattr(pl_module, "named_members"):
            return
        for name, member in pl_module.named_members():
            if member.val_feature_frequency is not None:
                prefix = pl_module.prefix(name)
                self._histogram(trainer, prefix, "val_density", member.val_feature_frequency, trainer.global_step)

    # -- output -----------------------------------------------------------------------------------------
    def _histogram(self, trainer: L.Trainer, prefix: str, name: str, freq: torch.Tensor, step: int) -> None:
        if not trainer.is_global_zero:
            return
        log_histogram(trainer, f"{prefix}sparsity/{name}", log10_density(freq.double()), step)
        if not has_wandb(trainer):
            title = "Validation feature density" if name.startswith("val") else "Feature density"
            figure = density_histogram_figure(freq, title=f"{prefix}{title}, step {step}")
            save_png(figure, run_dir(trainer) / "plots" / step_name(f"{prefix}{name}", step))


class MemberSparsity:
    """One member's interval metrics: reconstruction, firing, and (with its own window) dead features."""

    def __init__(self, name: str, member, dead_window: int | None, dead_state: dict | None) -> None:
        sae, device = member.sae, member.input_scale.device
        self.prefix, self.member = (f"{name}/" if name else ""), member
        self.reconstruction = ReconstructionError(sae.d_in).to(device)
        self.firing = FeatureFiring(sae.d_sae).to(device)
        self.dead: DeadFraction | None = None
        if dead_window is not None:
            self.dead = DeadFraction(sae.d_sae, dead_window).to(device)
            if dead_state is not None:
                self.dead.load_state_dict(dead_state, strict=False)
        self.density_counts = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)  # firings since the last histogram
        self.density_vectors = 0

    def update(self, out: dict[str, Any]) -> None:
        self.reconstruction.update(out["x"], out["x_hat"])
        counts = fire_counts(out["f"], out.get("active"))  # once for both metrics, from the active entries if known
        self.firing.update(out["f"], counts)
        if self.dead is not None:
            self.dead.update(out["f"], counts)

    def end_interval(self, world_size: int, dense_threshold: float) -> dict[str, torch.Tensor]:
        """The interval's values (collective under DDP: every rank calls it); folds its firings into the density."""
        values = dict(self.reconstruction.compute())
        freq = self.firing.compute()
        n_vectors = int(self.firing.n_vectors) * world_size  # local count; ranks see equal batches
        self.density_counts += freq.double() * n_vectors
        self.density_vectors += n_vectors
        values["l0"] = freq.double().sum().float()
        dead = self.dead.compute() if self.dead is not None else self.member.dead_mask().float().mean()
        values["dead_fraction"] = dead
        values["dense_fraction"] = dense_fraction(freq, dense_threshold)
        self.reconstruction.reset()
        self.firing.reset()
        if self.dead is not None:
            self.dead.reset()
        return {k: values[k] for k in TRAIN_KEYS}

    def take_density(self) -> torch.Tensor:
        freq = (self.density_counts / max(self.density_vectors, 1)).float()
        self.density_counts.zero_()
        self.density_vectors = 0
        return freq
