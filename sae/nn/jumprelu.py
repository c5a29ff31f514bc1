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

from .auxk import auxk_loss, resolve_k_aux
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

    Units: inputs have mean norm sqrt(d_in), and with unit decoder rows a latent firing at theta
    lowers the per-element MSE by about theta^2 / d_in, so the learned threshold settles near
    sqrt(l0_coefficient) of the input norm. Hyperparameters:
        l0_coefficient: 0.01, i.e. latents contributing less than ~10% of the input norm are cut,
            the share of one feature among a few tens. Like TopK's k it sets the sparsity.
        bandwidth: 0.05. The paper's eps = 0.001 was set for inputs of unit mean squared norm; our
            pre-activations are sqrt(d_in) times larger (0.001 * sqrt(512) ~ 0.02), and a wider
            window sees more pre-activations per batch near theta, so theta's gradient is less noisy
            at our batch sizes, at the price of a little bias. Must stay well below theta. (Planted
            benchmark, l0 0.03: 0.05 and 0.5 recover the same 25-26%.)
        threshold_init: None = sqrt(l0_coefficient * d_in), the break-even activation above. Theta
            is learned in log space, so under Adam it moves by a roughly constant factor per step;
            starting at its expected scale rather than the paper's 0.001 saves thousands of steps.
            Pre-activations start ~N(0, 1), so a few percent of latents fire at first.
        pre_acts_grad: False (the paper). True also sends the STE's kernel terms to the
            pre-activations (the L0 penalty pushes them below theta, the reconstruction's jump
            pulls them above), so the encoder itself learns to stay clear of the threshold.
            Measured on the planted benchmark: no help (31% vs 26% recovered at l0 0.03, 31% vs 50% at 0.1).
        k_aux, aux_k_coefficient: AuxK (``auxk.py``), off by default as in the paper. A latent whose
            threshold lies above all its pre-activations gets no gradient from anything else.
    With one global input scale, inputs with many active directions have large cross-talk, which a
    fixed per-latent threshold cannot tell from a weak direction in a sparse input; on planted data
    this is where JumpReLU trails TopK (whose cut is per input) and ReLU+L1 (which shrinks cross-talk).
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
        bandwidth: float = 0.05,
        threshold_init: float | None = None,
        pre_acts_grad: bool = False,
        k_aux: int | None = None,
        aux_k_coefficient: float = 0.0,
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
        if pre_acts_grad not in (True, False):
            raise SAEConfigError(f"pre_acts_grad={pre_acts_grad!r} must be true or false")
        self.pre_acts_grad = bool(pre_acts_grad)
        self.k_aux = resolve_k_aux(k_aux, d_in, d_sae)
        self.aux_k_coefficient = check_nonnegative_float("aux_k_coefficient", aux_k_coefficient)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(threshold_init)))

    @property
    def threshold(self) -> Tensor:
        """(d_sae,) theta = exp(log_threshold), in pre-activation units."""
        return self.log_threshold.exp()

    def activation(self, pre_acts: Tensor) -> Tensor:
        return _JumpReLU.apply(pre_acts, self.threshold, self.bandwidth, self.pre_acts_grad)

    def l0(self, pre_acts: Tensor) -> Tensor:
        """(B, d_sae) -> (B,) number of active latents, differentiable in theta through the STE."""
        return _Step.apply(pre_acts, self.threshold, self.bandwidth, self.pre_acts_grad).sum(dim=-1)

    def sparsity_loss(self, out: SAEOutput) -> Tensor:
        return self.l0_coefficient * self.l0(out.pre_acts).mean()

    def aux_loss(self, x: Tensor, out: SAEOutput, dead_mask: Tensor | None) -> Tensor:
        """AuxK on the latents whose thresholds shut them off (``auxk.auxk_loss``); 0 when the coefficient is."""
        return auxk_loss(self.W_dec, x, out, dead_mask, self.k_aux, self.aux_k_coefficient)

    # ----------------------------------------------------------------------------- description
    def extra_hparams(self) -> dict[str, Any]:
        return {
            "l0_coefficient": self.l0_coefficient,
            "bandwidth": self.bandwidth,
            "threshold_init": self.threshold_init,
            "pre_acts_grad": self.pre_acts_grad,
            "k_aux": self.k_aux,
            "aux_k_coefficient": self.aux_k_coefficient,
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
