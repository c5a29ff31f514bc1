"""The LightningModule that trains one SAE: optimizer, schedules, input scaling, resampling and logging.

The SAE itself is a plain `sae.nn.SparseAutoencoder`; this module only wires it to Lightning.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from sae.checks import BadConfigError, fraction, non_negative, positive
from sae.metrics import SparsityMetrics
from sae.nn import SparseAutoencoder, build_sae, save_sae
from sae.train.guards import DataStatisticsError, NonFiniteLossError, ResumeMismatchError, kept_checkpoint_hint
from sae.train.resampling import ResampleSchedule, draw_replacements, resample_features_
from sae.train.schedules import lr_factor, sparsity_factor

log = logging.getLogger(__name__)

DEAD_WINDOW_MAX = 10_000_000  # vectors; the TopK paper's definition of a dead latent
HOST_CHECK_EVERY = 10  # steps between reads of device flags (dead latents, non-finite loss): no per-step sync


class SAEModule(L.LightningModule):
    """Trains `build_sae(architecture, d_in, ...)` on batches of (B, d_in) activation vectors.

    Inputs are multiplied by `input_scale` so that their mean norm is sqrt(d_in) (estimated once from a
    sample before training); the export folds the scale back, so `sae.safetensors` is in the layer's units.
    """

    def __init__(
        self,
        d_in: int,
        architecture: str = "relu",
        expansion: float | None = 8,
        d_sae: int | None = None,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup_steps: int = 100,
        lr_decay_fraction: float = 0.2,
        sparsity_warmup_steps: int = 0,
        b_dec_init: str = "geometric_median",
        init_sample: int = 16384,
        normalize_inputs: bool = True,
        dead_window: int | None = None,
        resample: dict | None = None,
        metadata: dict | None = None,
        **arch_hparams: Any,
    ):
        super().__init__()
        check_hparams(lr=lr, betas=betas, lr_warmup_steps=lr_warmup_steps, lr_decay_fraction=lr_decay_fraction,
                      sparsity_warmup_steps=sparsity_warmup_steps, init_sample=init_sample, dead_window=dead_window,
                      resample=resample)
        # Plain containers (not a config library's), so checkpoints load with torch.load(weights_only=True).
        resample, betas, metadata = (dict(resample) if resample else None), tuple(betas), dict(metadata or {})
        self.save_hyperparameters(logger=False)  # the logger gets the resolved run config once (train.py)
        self.sae: SparseAutoencoder = build_sae(
            architecture, int(d_in), d_sae=d_sae, expansion=None if d_sae is not None else expansion, **arch_hparams
        )
        self.lr, self.betas = float(lr), tuple(betas)
        self.lr_warmup_steps, self.lr_decay_fraction = int(lr_warmup_steps), float(lr_decay_fraction)
        self.sparsity_warmup_steps = int(sparsity_warmup_steps)
        self.b_dec_init, self.init_sample, self.normalize_inputs = b_dec_init, int(init_sample), normalize_inputs
        self.resample = ResampleSchedule(**resample) if resample else None
        self.metadata = dict(metadata or {})
        d = self.sae.W_dec.shape[0]
        self.register_buffer("input_scale", torch.zeros(()))  # 0 until estimated; restored from checkpoints
        self.register_buffer("vectors_since_fired", torch.zeros(d, dtype=torch.long))
        self.register_buffer("dead_window", torch.tensor(int(dead_window or 0)))
        self.register_buffer("any_dead", torch.zeros((), dtype=torch.bool))  # see _any_dead
        self.register_buffer("nonfinite_seen", torch.zeros((), dtype=torch.bool), persistent=False)
        self._any_dead_cached: bool | None = None
        self.resuming = False
        # Not a submodule: fresh for each validation, so "dead" there means "fired on no held-out vector".
        self._val: dict[str, SparsityMetrics] = {}

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Estimate the input scale and initialize b_dec before DDP wraps the model.

        DDP then broadcasts rank zero's parameters and buffers, so every rank starts identical. A resumed
        run (`resuming`, set by train.py before fit: Lightning reads the checkpoint only after setup) skips this:
        the checkpoint restores both, so the saved scale and b_dec are kept, not recomputed.
        """
        if stage != "fit" or float(self.input_scale) > 0 or self.resuming:
            return
        datamodule = self.trainer.datamodule
        if int(self.dead_window) == 0:
            total = max(1, self.trainer.max_steps) * datamodule.batch_size * self.trainer.world_size
            self.dead_window.fill_(min(DEAD_WINDOW_MAX, max(datamodule.batch_size, total // 5)))
        sample = datamodule.sample_vectors(self.init_sample).float()
        self.to(sample.device)
        scale = input_scale_of(sample) if self.normalize_inputs else 1.0
        self.input_scale.fill_(scale)
        scaled = sample * scale
        self.sae.init_b_dec_(scaled, method=self.b_dec_init)
        self.sae.init_from_sample_(scaled)
        log.info("input scale %.4g (mean norm → sqrt(d_in)); b_dec initialized by %s", scale, self.b_dec_init)

    def configure_optimizers(self):
        # torch's fused Adam: the same update in one kernel per parameter instead of a dozen ops (bench/README.md).
        fused = all(p.device.type in ("cpu", "cuda") for p in self.sae.parameters()) or None
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr, betas=self.betas, fused=fused)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.lr_warmup_steps, total, self.lr_decay_fraction)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """One step on a (B, d_in) batch. Returns the loss and, detached, what callbacks read:
        x (B, d_in) scaled inputs, x_hat (B, d_in) and f (B, d_sae)."""
        x = batch.float() * self.input_scale
        out = self.sae(x)
        dead = self.vectors_since_fired >= self.dead_window
        losses = self.sae.loss(x, out, sparsity_scale=sparsity_factor(self.global_step, self.sparsity_warmup_steps),
                               dead_mask=dead if self._any_dead(dead) else None)
        # f >= 0 for every architecture, so a latent fired in this batch iff its largest activation is > 0:
        # one reduction instead of a (B, d_sae) bool mask and a second pass over it.
        fired = out.f.detach().amax(dim=0) > 0
        if self._update_firing(fired, x.shape[0], nonfinite=~torch.isfinite(losses.loss.detach())):
            # Before backward on CPU (checked every step there); on an accelerator within HOST_CHECK_EVERY steps.
            # Either way no checkpoint is written with non-finite weights (SafeCheckpointIO refuses them).
            raise NonFiniteLossError(
                f"the training loss was found non-finite at step {self.global_step} (on some rank); the run stopped. "
                + kept_checkpoint_hint(self._checkpoint_dir())
            )
        if self._logs_this_step():
            self._log_step(x, out, losses, dead)
        self.log("loss", losses.loss, prog_bar=True, logger=False)
        return {"loss": losses.loss, "x": x.detach(), "x_hat": out.x_hat.detach(), "f": out.f.detach()}

    def _checkpoint_dir(self) -> Path:
        callback = getattr(self.trainer, "checkpoint_callback", None)
        return Path(getattr(callback, "dirpath", None) or Path(self.trainer.default_root_dir) / "checkpoints")

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this step's logs: the train/* statistics cost (B, d_sae) passes, so they
        are computed only then. Lightning's own answer (a private attribute: recomputing it from global_step
        disagrees with it after a resume, where its count of stepped batches is what decides)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    @torch.no_grad()
    def _log_step(self, x: Tensor, out, losses, dead: Tensor) -> None:
        residual = (x - out.x_hat).pow(2).sum()
        total = (x - x.mean(dim=0)).pow(2).sum()
        self.log_dict({
            "train/loss": losses.loss,
            "train/mse": losses.mse,
            "train/sparsity_loss": losses.sparsity,
            "train/aux_loss": losses.aux,
            "train/l1": out.f.abs().sum(dim=1).mean(),
            "train/l0": (out.f > 0).sum(dim=1, dtype=torch.int32).float().mean(),
            "train/explained_variance": 1 - residual / total,
            "train/dead_fraction": dead.float().mean(),
        }, on_step=True, prog_bar=False)

    def _any_dead(self, dead: Tensor) -> bool:
        """Whether any latent is dead, read from the device once every HOST_CHECK_EVERY steps (not per step).

        While none is, the loss gets no dead mask and AuxK costs nothing. A latent that dies in between waits
        at most HOST_CHECK_EVERY steps for AuxK: nothing next to the dead window itself. The flag is a buffer,
        so a resumed run continues with the same value."""
        if self.global_step % HOST_CHECK_EVERY == 0:
            self.any_dead.copy_(dead.any())
            self._any_dead_cached = None
        if self._any_dead_cached is None:
            self._any_dead_cached = bool(self.any_dead)
        return self._any_dead_cached

    def _update_firing(self, fired: Tensor, n: int, nonfinite: Tensor) -> bool:
        """Count vectors since each feature last fired, over all ranks (so dead masks agree everywhere).

        `fired` (d_sae,) bool: the latents active on some of this batch's n inputs. Returns whether the loss
        has been non-finite on any rank: one collective carries both, so every rank stops at the same step. The flag is read from the device every step on
        CPU (free there) and every HOST_CHECK_EVERY steps elsewhere (a read is a host sync)."""
        flags = torch.cat([fired, nonfinite.reshape(1)]).to(torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            n = torch.tensor(n, device=flags.device)
            dist.all_reduce(n)
        self.nonfinite_seen.logical_or_(flags[-1].bool())
        check = flags.device.type == "cpu" or self.global_step % HOST_CHECK_EVERY == HOST_CHECK_EVERY - 1
        if check and bool(self.nonfinite_seen):
            return True
        self.vectors_since_fired.add_(n).masked_fill_(flags[:-1].bool(), 0)
        return False

    def on_before_optimizer_step(self, optimizer) -> None:
        self.sae.project_decoder_grad_()

    def on_train_batch_end(self, outputs, batch: Tensor, batch_idx: int) -> None:
        self.sae.normalize_decoder_()
        if self.resample is not None and self.resample.due(self.global_step, self.trainer.max_steps,
                                                           self.lr_decay_fraction):
            self._resample(batch.float() * self.input_scale)

    def _resample(self, x: Tensor) -> None:
        dead = self.vectors_since_fired >= self.dead_window
        n_dead = int(dead.sum())
        if n_dead:
            generator = torch.Generator(device=x.device).manual_seed(self.global_step)
            replacements = draw_replacements(self.sae, x, n_dead, generator)
            # Rank zero decides; every rank applies the same replacements (identical resampling under DDP).
            replacements = self.trainer.strategy.broadcast(replacements, src=0)
            resample_features_(self.sae, dead, replacements, self.optimizers().optimizer, self.resample.encoder_scale)
            self.vectors_since_fired[dead] = 0
        self.log("train/resampled", float(n_dead), on_step=True)
        log.info("step %d: resampled %d dead features", self.global_step, n_dead)

    # -- validation -----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val["metrics"] = SparsityMetrics(self.sae.d_sae, dead_window=DEAD_WINDOW_MAX, d_in=self.sae.d_in).to(
            self.device
        )

    def validation_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """Returns x, x_hat, f (as training_step does) so that callbacks need not encode the batch again."""
        x = batch.float() * self.input_scale
        out = self.sae(x)
        losses = self.sae.loss(x, out)
        self.log("val/loss", losses.loss, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        self._val["metrics"].update(x, out.x_hat, out.f)
        return {"x": x, "x_hat": out.x_hat, "f": out.f}

    def on_validation_epoch_end(self) -> None:
        metrics = self._val.pop("metrics")
        # compute() is already reduced over ranks (a collective: every rank calls it); floats, so that Lightning
        # neither reduces them again nor warns that it does not.
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.compute().items()})
        self.val_feature_frequency = metrics.feature_frequency()

    # -- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Nothing in training draws from the global RNGs today (resampling and the data stream are seeded by
        # step), but a resumed run must stay exact if something ever does.
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_checkpoint(self, checkpoint)

    def check_resumable(self, checkpoint: dict[str, Any], name: str = "the checkpoint") -> None:
        """Raise ResumeMismatchError if `checkpoint` holds a different SAE (layer, widths, architecture)."""
        saved = checkpoint.get("hyper_parameters", {})
        W_dec = checkpoint.get("state_dict", {}).get("sae.W_dec")

        def describe(layer, arch, d_sae, d_in) -> str:
            return f"layer={layer}, sae.architecture={arch}, d_sae={d_sae}, d_in={d_in}"

        theirs = describe((saved.get("metadata") or {}).get("layer"), saved.get("architecture"),
                          None if W_dec is None else W_dec.shape[0], None if W_dec is None else W_dec.shape[1])
        ours = describe(self.metadata.get("layer"), self.hparams.architecture, self.sae.d_sae, self.sae.d_in)
        if theirs != ours:
            raise ResumeMismatchError(
                f"{name} was trained with {theirs} but this run is configured with {ours}. Resume with the "
                "original settings (the run directory's config_resolved.yaml lists them), or start a new run "
                "without ckpt_path."
            )

    # -- export ---------------------------------------------------------------------------------------
    def export(self, directory: str | Path, **metadata: Any) -> None:
        """Write sae.safetensors + sae.json in the layer's units (atomic)."""
        meta = {**self.metadata, **metadata, "input_scale": float(self.input_scale), "global_step": self.global_step}
        save_sae(self.sae, directory, scale=float(self.input_scale) or 1.0, metadata=meta)


def check_hparams(lr, betas, lr_warmup_steps, lr_decay_fraction, sparsity_warmup_steps, init_sample, dead_window,
                  resample) -> None:
    """Every numeric option of the training module in its range, before any work (BadConfigError names it)."""
    positive("sae.lr", lr)
    if len(betas) != 2 or not all(0 <= fraction("sae.betas", b, high_open=True) for b in betas):
        raise BadConfigError(f"sae.betas={list(betas)} must be two numbers in [0, 1).")
    non_negative("sae.lr_warmup_steps", lr_warmup_steps, integer=True)
    fraction("sae.lr_decay_fraction", lr_decay_fraction)
    non_negative("sae.sparsity_warmup_steps", sparsity_warmup_steps, integer=True)
    positive("sae.init_sample", init_sample, integer=True)
    if dead_window is not None:
        positive("sae.dead_window", dead_window, integer=True)
    if resample:
        positive("sae.resample.every_n_steps", resample.get("every_n_steps", 1), integer=True)
        if resample.get("until_step") is not None:
            non_negative("sae.resample.until_step", resample["until_step"], integer=True)


def input_scale_of(sample: Tensor) -> float:
    """The factor that gives `sample` (n, d_in) mean norm sqrt(d_in); computed in float64 so that very large
    inputs (norms past float32's range) still scale correctly. Raises DataStatisticsError naming the cause."""
    norms = sample.double().norm(dim=1)
    if not bool(torch.isfinite(norms).all()):
        raise DataStatisticsError(f"the sample of {sample.shape[0]} input vectors holds NaN or inf; check the data "
                                  "(data.path, or the images and model weights).")
    mean = float(norms.mean())
    if mean == 0:
        raise DataStatisticsError(f"all {sample.shape[0]} sampled input vectors are zero: there is nothing to learn. "
                                  "Check the data (data.path, or the layer and model weights: a dead layer gives zeros).")
    scale = math.sqrt(sample.shape[1]) / mean
    if not math.isfinite(scale) or not 1e-35 < scale < 1e35:
        raise DataStatisticsError(f"the input vectors' mean norm is {mean:.3g}, too far from 1 to scale in float32 "
                                  f"(factor {scale:.3g}); rescale the vectors before training.")
    return scale


def restore_checkpoint(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """What a module does on loading: refuse a checkpoint of another SAE, then restore the global RNG states."""
    module.check_resumable(checkpoint)
    if "rng_states" in checkpoint:
        set_rng_states(checkpoint["rng_states"])


def rng_states() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, random), as tensors and plain types."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(states["python"])
