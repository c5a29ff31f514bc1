"""AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", appendix A.2): dead latents learn to
reconstruct what the live ones missed, so they get a gradient again and come back to life.

Shared by the TopK family (on by default) and JumpReLU (where a latent whose threshold sits above all its
pre-activations gets no gradient from the reconstruction at all, so the same loss is its only way back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SAEConfigError, SAEOutput, check_positive_int


def resolve_k_aux(k_aux: int | None, d_in: int, d_sae: int) -> int:
    """``k_aux``, or d_in // 2 (Gao et al.'s choice) when None; must lie in [1, d_sae]."""
    if k_aux is None:
        k_aux = min(max(d_in // 2, 1), d_sae)
    k_aux = check_positive_int("k_aux", k_aux)
    if k_aux > d_sae:
        raise SAEConfigError(f"k_aux={k_aux} exceeds d_sae={d_sae}; choose k_aux <= {d_sae} (or None for d_in // 2)")
    return k_aux


def auxk_loss(W_dec: Tensor, x: Tensor, out: SAEOutput, dead_mask: Tensor | None, k_aux: int,
              coefficient: float) -> Tensor:
    """Scalar ``coefficient * ||e - e_hat||^2 / ||e - mean(e)||^2``; zero without dead latents.

    x (B, d_in); out.x_hat (B, d_in), out.pre_acts (B, d_sae); W_dec (d_sae, d_in); dead_mask (d_sae,) bool.
    e = x - x_hat (detached) is what the live latents missed; e_hat = f_aux @ W_dec (no bias) from the top
    k_aux ReLU'd pre-activations of the dead latents. Normalising by the residual's own variance keeps the
    signal alive as the residual shrinks.
    """
    if dead_mask is None or coefficient == 0:
        return out.f.new_zeros(())
    d_sae = W_dec.shape[0]
    if dead_mask.shape != (d_sae,) or dead_mask.dtype != torch.bool:
        # A trainer bug, not a user's configuration: a plain ValueError.
        raise ValueError(f"dead_mask must be a bool tensor of shape ({d_sae},), got "
                         f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
    residual = (x - out.x_hat).detach()
    # Live latents get -inf, which relu maps to a zero weight with zero gradient; this avoids a host sync
    # to count the dead latents (when fewer than k_aux are dead the rest are zeros).
    dead_pre_acts = out.pre_acts.masked_fill(~dead_mask, float("-inf"))
    values, indices = dead_pre_acts.topk(k_aux, dim=-1, sorted=False)
    weights = values.relu().to(W_dec.dtype)
    residual_hat = F.embedding_bag(indices, W_dec, per_sample_weights=weights, mode="sum")
    error = (residual - residual_hat).pow(2).sum()
    variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(torch.finfo(error.dtype).tiny)
    any_dead = dead_mask.any().to(error.dtype)
    return coefficient * any_dead * error / variance
