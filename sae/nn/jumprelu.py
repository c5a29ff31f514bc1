"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders").

Each latent fires only above its own learnable threshold theta_i, and the penalty is L0 itself.
Both are step functions of theta, so their gradients with respect to theta come from
straight-through estimators: the step is smoothed by a rectangle kernel of width ``bandwidth``,
only in the backward pass (the forward pass stays exactly sparse).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .auxk import auxk_loss, resolve_aux_batch_size, resolve_k_aux
from .base import (
    SAEConfigError,
    SAEOutput,
    SparseAutoencoder,
    check_nonnegative_float,
    check_positive_float,
    register_architecture,
)


def _rectangle_window(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """(B, d_sae) bool: K((pre - theta) / eps) != 0 for the rectangle kernel K(u) = 1[|u| < 1/2]."""
    return (pre_acts - threshold).abs() < bandwidth / 2


def _sum_to_threshold(grad: Tensor, threshold: Tensor) -> Tensor:
    """Sum a (..., d_sae) gradient over the batch dims into theta's shape and dtype."""
    return grad.reshape(-1, threshold.shape[-1]).sum(dim=0).to(threshold.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta). d/dpre = H(pre - theta) [+ (theta / eps) K(...) with ``pre_acts_grad``];
    d/dtheta := -(theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float, pre_acts_grad: bool) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth, ctx.pre_acts_grad = bandwidth, pre_acts_grad
        return pre_acts * (pre_acts > threshold)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None, None]:
        pre_acts, threshold = ctx.saved_tensors
        # The jump of height theta, smoothed: what switching the latent on is worth to the reconstruction.
        jump_grad = grad_out * _rectangle_window(pre_acts, threshold, ctx.bandwidth) * (threshold / ctx.bandwidth)
        grad_pre = grad_out * (pre_acts > threshold)
        if ctx.pre_acts_grad:
            grad_pre = grad_pre + jump_grad
        return grad_pre, -_sum_to_threshold(jump_grad, threshold), None, None


class _Step(torch.autograd.Function):
    """H(pre - theta). d/dtheta := -(1 / eps) K((pre - theta) / eps); d/dpre := 0 as in the paper, or with
    ``pre_acts_grad`` the mirror image +(1 / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float, pre_acts_grad: bool) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth, ctx.pre_acts_grad = bandwidth, pre_acts_grad
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor, None, None]:
        pre_acts, threshold = ctx.saved_tensors
        window_grad = grad_out * _rectangle_window(pre_acts, threshold, ctx.bandwidth) / ctx.bandwidth
        grad_pre = window_grad if ctx.pre_acts_grad else None
        return grad_pre, -_sum_to_threshold(window_grad, threshold), None, None


@register_architecture
class JumpReLUSAE(SparseAutoencoder):
    """f = pre * H(pre - theta), theta = exp(log_threshold) per latent; sparsity = l0_coefficient * mean L0.

    Units: inputs have mean norm sqrt(d_in), so with unit decoder rows (and W_enc = W_dec.T) the
    pre-activations start roughly N(0, 1), and a latent firing at theta lowers the per-element MSE by
    about theta^2 / d_in: the learned threshold settles near sqrt(l0_coefficient * d_in).

    Hyperparameters (why each default; the measurements are in bench/README.md, "Why the defaults"):
        l0_coefficient: the sparsity knob; 0.01 cuts latents contributing under ~10% of the input norm.
        bandwidth: the straight-through window, in pre-activation units. Wide on purpose: with the paper's
            narrow window only pre-activations already next to theta learn that crossing it would help
            (Anthropic's 2025 update also trains with a wide window). The forward pass stays exactly sparse.
        init_firing_rate: before training each theta_i is set from a sample so that latent i fires on this
            fraction of it (``init_from_sample_``): a sparse, competitive start like TopK's, where the
            break-even start lets tens of random latents overshoot every input. None: keep threshold_init.
        threshold_init: theta before any sample is seen (None = sqrt(l0_coefficient * d_in)). Theta is
            learned in log space, so under Adam it moves by a roughly constant factor per step.
        pre_acts_grad: False (the paper). True also sends the STE's kernel terms to the pre-activations,
            as in Anthropic's 2025 update.
        k_aux, aux_k_coefficient, aux_batch_size: AuxK (``auxk.py``): a latent whose threshold lies above all
            its pre-activations gets no gradient from anything else.
    Decoder rows are unit-norm: L0 is blind to the scale of f, so the constraint only fixes the
    gauge (f -> c f, W_dec -> W_dec / c, theta -> c theta), making thresholds comparable across latents.
    """

    architecture: ClassVar[str] = "jumprelu"
    constrains_decoder_norm: ClassVar[bool] = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        l0_coefficient: float = 0.01,
        bandwidth: float = 3.0,
        threshold_init: float | None = 2.5,
        init_firing_rate: float | None = 0.002,
        pre_acts_grad: bool = False,
        k_aux: int | None = None,
        aux_k_coefficient: float = 0.5,
        aux_batch_size: int | None = None,
    ) -> None:
        super().__init__(d_in, d_sae)
        self.l0_coefficient = check_nonnegative_float("l0_coefficient", l0_coefficient)
        self.bandwidth = check_positive_float("bandwidth", bandwidth)
        if threshold_init is None:
            if l0_coefficient == 0:
                raise SAEConfigError("threshold_init=None derives theta from l0_coefficient, which is 0; "
                                     "pass threshold_init explicitly")
            threshold_init = math.sqrt(self.l0_coefficient * d_in)
        self.threshold_init = check_positive_float("threshold_init", threshold_init)
        if init_firing_rate is not None and not 0 < check_positive_float("init_firing_rate", init_firing_rate) < 1:
            raise SAEConfigError(f"init_firing_rate={init_firing_rate!r} must lie in (0, 1) (or be None)")
        self.init_firing_rate = None if init_firing_rate is None else float(init_firing_rate)
        if pre_acts_grad not in (True, False):
            raise SAEConfigError(f"pre_acts_grad={pre_acts_grad!r} must be true or false")
        self.pre_acts_grad = bool(pre_acts_grad)
        self.k_aux = resolve_k_aux(k_aux, d_in, d_sae)
        self.aux_k_coefficient = check_nonnegative_float("aux_k_coefficient", aux_k_coefficient)
        self.aux_batch_size = resolve_aux_batch_size(aux_batch_size)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(threshold_init)))

    @property
    def threshold(self) -> Tensor:
        """(d_sae,) theta = exp(log_threshold), in pre-activation units."""
        return self.log_threshold.exp()

    @torch.no_grad()
    def init_from_sample_(self, sample: Tensor) -> None:
        """theta_i := the (1 - init_firing_rate) quantile of latent i's pre-activations on sample (N, d_in)."""
        if self.init_firing_rate is None:
            return
        sample = sample.to(device=self.W_enc.device, dtype=self.W_enc.dtype)
        k = min(sample.shape[0], max(1, math.ceil((1 - self.init_firing_rate) * sample.shape[0])))
        bias = self.encoder_bias()
        for start in range(0, self.d_sae, 1024):  # in column blocks: N x 1024 pre-activations at a time
            cols = slice(start, start + 1024)
            pre = torch.addmm(bias[cols], sample, self.W_enc[:, cols])
            quantile = pre.kthvalue(k, dim=0).values
            # Log-space thresholds must stay positive; a latent whose quantile is <= 0 starts just above 0.
            self.log_threshold[cols] = quantile.clamp_min(1e-3).log()

    def activation(self, pre_acts: Tensor) -> Tensor:
        return _JumpReLU.apply(pre_acts, self.threshold, self.bandwidth, self.pre_acts_grad)

    def l0(self, pre_acts: Tensor) -> Tensor:
        """(B, d_sae) -> (B,) number of active latents, differentiable in theta through the STE."""
        return _Step.apply(pre_acts, self.threshold, self.bandwidth, self.pre_acts_grad).sum(dim=-1)

    def sparsity_loss(self, out: SAEOutput) -> Tensor:
        return self.l0_coefficient * self.l0(out.pre_acts).mean()

    def aux_loss(self, x: Tensor, out: SAEOutput, dead_mask: Tensor | None) -> Tensor:
        """AuxK on the latents whose thresholds shut them off (``auxk.auxk_loss``); 0 when the coefficient is."""
        return auxk_loss(self.W_dec, x, out, dead_mask, self.k_aux, self.aux_k_coefficient,
                         aux_batch_size=self.aux_batch_size)

    # ----------------------------------------------------------------------------- description
    def extra_hparams(self) -> dict[str, Any]:
        return {
            "l0_coefficient": self.l0_coefficient,
            "bandwidth": self.bandwidth,
            "threshold_init": self.threshold_init,
            "init_firing_rate": self.init_firing_rate,
            "pre_acts_grad": self.pre_acts_grad,
            "k_aux": self.k_aux,
            "aux_k_coefficient": self.aux_k_coefficient,
            "aux_batch_size": self.aux_batch_size,
        }

    def extra_export_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold}

    @torch.no_grad()
    def load_extra_tensors_(self, tensors: dict[str, Tensor]) -> None:
        threshold = tensors["threshold"]
        if not bool((threshold > 0).all()):
            raise SAEConfigError("jumprelu thresholds must all be > 0 (they are stored as exp(log_threshold))")
        self.log_threshold.copy_(threshold.log())

    def activation_formula(self) -> str:
        return "pre * (pre > threshold), one learned threshold per latent (JumpReLU)"
