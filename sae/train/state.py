"""One SAE's training state in a plain `nn.Module`: the SAE, its input scale, firing counters, resampling,
optimizer settings and export.

`sae.train.module.SAEModule` trains one of these and `sae.train.multi.MultiSAEModule` K of them on the same
batches; Lightning sees only those modules, and callbacks iterate their `named_members()`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sae.checks import BadConfigError, fraction, non_negative, positive
from sae.metrics import SparsityMetrics
from sae.nn import SparseAutoencoder, build_sae, save_sae
from sae.nn.base import SAELoss, SAEOutput
from sae.train.guards import DataStatisticsError
from sae.train.resampling import ResampleSchedule, draw_replacements, resample_features_
from sae.train.schedules import lr_factor, sparsity_factor

log = logging.getLogger(__name__)

DEAD_WINDOW_MAX = 10_000_000  # vectors; the TopK paper's definition of a dead latent
HOST_CHECK_EVERY = 10  # steps between reads of device flags (dead latents, non-finite loss): no per-step sync


class Step(NamedTuple):
    """One member's forward pass on a batch: x (B, d_in) scaled inputs, the SAE's output and loss, whether
    the loss has been non-finite on some rank, and l1, the mean L1 norm of f (a scalar)."""

    x: Tensor
    out: SAEOutput
    losses: SAELoss
    nonfinite: bool
    l1: Tensor


class SAETrainingState(nn.Module):
    """`build_sae(architecture, d_in, ...)` and what training it needs beyond its parameters.

    Inputs are multiplied by `input_scale` so that their mean norm is sqrt(d_in) (estimated once from a
    sample before training, `prepare`); the export folds the scale back, so `sae.safetensors` is in the
    layer's units. `vectors_since_fired` (d_sae,) counts, over all ranks, the vectors since each latent last
    fired: a latent is dead once it reaches `dead_window`, which AuxK and resampling act on.
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
        self.architecture = architecture
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
        self.register_buffer("any_dead", torch.zeros((), dtype=torch.bool))  # see any_dead_now
        self.register_buffer("nonfinite_seen", torch.zeros((), dtype=torch.bool), persistent=False)
        self._any_dead_cached: bool | None = None
        # In a dict, not an attribute: a fresh metric for each validation, never in the state dict.
        self._val: dict[str, SparsityMetrics] = {}
        self.val_feature_frequency: Tensor | None = None  # (d_sae,) of the last validation

    # -- set-up -----------------------------------------------------------------------------------------
    def prepared(self) -> bool:
        return float(self.input_scale) > 0

    def prepare(self, sample: Tensor, default_dead_window: int) -> None:
        """Set the dead window (unless configured), the input scale from `sample` (n, d_in) and b_dec."""
        if int(self.dead_window) == 0:
            self.dead_window.fill_(default_dead_window)
        self.to(sample.device)
        scale = input_scale_of(sample) if self.normalize_inputs else 1.0
        self.input_scale.fill_(scale)
        scaled = sample * scale
        self.sae.init_b_dec_(scaled, method=self.b_dec_init)
        self.sae.init_from_sample_(scaled)
        log.info("input scale %.4g (mean norm → sqrt(d_in)); b_dec initialized by %s", scale, self.b_dec_init)

    def param_group(self) -> dict[str, Any]:
        """This member's Adam parameter group (Adam's state is per parameter, so groups step independently)."""
        return {"params": list(self.sae.parameters()), "lr": self.lr, "betas": self.betas}

    def lr_lambda(self, total_steps: int | None) -> Callable[[int], float]:
        return lambda step: lr_factor(step, self.lr_warmup_steps, total_steps, self.lr_decay_fraction)

    # -- training ---------------------------------------------------------------------------------------
    def step(self, batch: Tensor, global_step: int) -> Step:
        """Forward and loss on a (B, d_in) batch, and the firing counters updated over all ranks."""
        x = batch.float() * self.input_scale
        out = self.sae(x)
        dead = self.dead_mask()
        losses = self.sae.loss(x, out, sparsity_scale=sparsity_factor(global_step, self.sparsity_warmup_steps),
                               dead_mask=dead if self.any_dead_now(dead, global_step) else None)
        # f >= 0 for every architecture, so a latent fired in this batch iff its column sum is > 0, and the
        # column sums add up to the batch's L1 norm: one reduction gives both, with no (B, d_sae) bool mask.
        column_sums = out.column_sums()
        nonfinite = self.update_firing(column_sums > 0, x.shape[0], ~torch.isfinite(losses.loss.detach()), global_step)
        return Step(x, out, losses, nonfinite, column_sums.sum() / x.shape[0])

    def any_dead_now(self, dead: Tensor, global_step: int) -> bool:
        """Whether any latent is dead, read from the device once every HOST_CHECK_EVERY steps (not per step).

        While none is, the loss gets no dead mask and AuxK costs nothing. A latent that dies in between waits
        at most HOST_CHECK_EVERY steps for AuxK: nothing next to the dead window itself. The flag is a buffer,
        so a resumed run continues with the same value."""
        if global_step % HOST_CHECK_EVERY == 0:
            self.any_dead.copy_(dead.any())
            self._any_dead_cached = None
        if self._any_dead_cached is None:
            self._any_dead_cached = bool(self.any_dead)
        return self._any_dead_cached

    def update_firing(self, fired: Tensor, n: int, nonfinite: Tensor, global_step: int) -> bool:
        """Count vectors since each feature last fired, over all ranks (so dead masks agree everywhere).

        `fired` (d_sae,) bool: the latents active on some of this batch's n inputs. Returns whether the loss
        has been non-finite on any rank: one collective carries both, so every rank stops at the same step.
        The flag is read from the device every step on CPU (free there) and every HOST_CHECK_EVERY steps
        elsewhere (a read is a host sync)."""
        flags = torch.cat([fired, nonfinite.reshape(1)]).to(torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            n = torch.tensor(n, device=flags.device)
            dist.all_reduce(n)
        self.nonfinite_seen.logical_or_(flags[-1].bool())
        check = flags.device.type == "cpu" or global_step % HOST_CHECK_EVERY == HOST_CHECK_EVERY - 1
        if check and bool(self.nonfinite_seen):
            return True
        self.vectors_since_fired.add_(n).masked_fill_(flags[:-1].bool(), 0)
        return False

    def dead_mask(self) -> Tensor:
        """(d_sae,) bool: the latents silent for `dead_window` vectors."""
        return self.vectors_since_fired >= self.dead_window

    def resample_due(self, global_step: int, total_steps: int | None = None) -> bool:
        """Whether to resample now: never once the learning rate decays (ResampleSchedule.due)."""
        return self.resample is not None and self.resample.due(global_step, total_steps, self.lr_decay_fraction)

    def resample_dead(self, x: Tensor, global_step: int, optimizer: torch.optim.Optimizer,
                      broadcast: Callable[[Tensor], Tensor]) -> int:
        """Give the dead latents new directions drawn from the scaled inputs `x` (B, d_in); returns how many.
        `broadcast` sends rank zero's draw to every rank (identical resampling under DDP)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead:
            generator = torch.Generator(device=x.device).manual_seed(global_step)
            replacements = broadcast(draw_replacements(self.sae, x, n_dead, generator))
            resample_features_(self.sae, dead, replacements, optimizer, self.resample.encoder_scale)
            self.vectors_since_fired[dead] = 0
        return n_dead

    # -- validation -------------------------------------------------------------------------------------
    def start_validation(self) -> None:
        self._val["metrics"] = SparsityMetrics(self.sae.d_sae, dead_window=DEAD_WINDOW_MAX, d_in=self.sae.d_in).to(
            self.input_scale.device
        )

    def validate(self, batch: Tensor) -> SAELoss:
        """The loss on a held-out (B, d_in) batch; accumulates the validation metrics."""
        x = batch.float() * self.input_scale
        out = self.sae(x)
        self._val["metrics"].update(x, out.x_hat, out.f)
        return self.sae.loss(x, out)

    def end_validation(self) -> dict[str, float]:
        """The held-out metrics (a collective under DDP: every rank calls it); keeps the feature frequency."""
        metrics = self._val.pop("metrics")
        values = {k: float(v) for k, v in metrics.compute().items()}
        self.val_feature_frequency = metrics.feature_frequency()
        return values

    # -- checkpoints and export -------------------------------------------------------------------------
    def describe(self) -> str:
        """What a checkpoint must match to be resumed into this member."""
        return (f"layer={self.metadata.get('layer')}, sae.architecture={self.architecture}, d_sae={self.sae.d_sae}, "
                f"d_in={self.sae.d_in}")

    def export(self, directory: str | Path, global_step: int, **metadata: Any) -> None:
        """Write sae.safetensors + sae.json in the layer's units (atomic)."""
        meta = {**self.metadata, **metadata, "input_scale": float(self.input_scale), "global_step": global_step}
        save_sae(self.sae, directory, scale=float(self.input_scale) or 1.0, metadata=meta)


def check_hparams(lr, betas, lr_warmup_steps, lr_decay_fraction, sparsity_warmup_steps, init_sample, dead_window,
                  resample) -> None:
    """Every numeric training option in its range, before any work (BadConfigError names it)."""
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
