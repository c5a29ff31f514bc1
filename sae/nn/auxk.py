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
from .sparse_grad import LatentLayout, selected_relu, sparse_decode


def resolve_k_aux(k_aux: int | None, d_in: int, d_sae: int) -> int:
    """``k_aux``, or d_in // 2 (Gao et al.'s choice) when None; must lie in [1, d_sae]."""
    if k_aux is None:
        k_aux = min(max(d_in // 2, 1), d_sae)
    k_aux = check_positive_int("k_aux", k_aux)
    if k_aux > d_sae:
        raise SAEConfigError(f"k_aux={k_aux} exceeds d_sae={d_sae}; choose k_aux <= {d_sae} (or None for d_in // 2)")
    return k_aux


def auxk_loss(W_dec: Tensor, x: Tensor, out: SAEOutput, dead_mask: Tensor | None, k_aux: int,
              coefficient: float, encoder: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Scalar ``coefficient * ||e - e_hat||^2 / ||e - mean(e)||^2``; zero without dead latents.

    x (B, d_in); out.x_hat (B, d_in), out.pre_acts (B, d_sae); W_dec (d_sae, d_in); dead_mask (d_sae,) bool.
    e = x - x_hat (detached) is what the live latents missed; e_hat = f_aux @ W_dec (no bias) from the top
    k_aux ReLU'd pre-activations of the dead latents. Normalising by the residual's own variance keeps the
    signal alive as the residual shrinks.

    ``encoder`` = (x, W_enc (d_in, d_sae), bias (d_sae,)) when out.pre_acts carry no gradient (the TopK family's
    sparse-gradient forward): then only the dead latents' columns are read, and the gradient reaches W_enc,
    the bias and W_dec through those entries alone (see ``_dead_reconstruction``).
    """
    if dead_mask is None or coefficient == 0:
        return out.f.new_zeros(())
    d_sae = W_dec.shape[0]
    if dead_mask.shape != (d_sae,) or dead_mask.dtype != torch.bool:
        # A trainer bug, not a user's configuration: a plain ValueError.
        raise ValueError(f"dead_mask must be a bool tensor of shape ({d_sae},), got "
                         f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
    residual = (x - out.x_hat).detach()
    if encoder is not None:
        residual_hat = _dead_reconstruction(W_dec, out.pre_acts, dead_mask, k_aux, *encoder)
        if residual_hat is None:
            return out.f.new_zeros(())
    else:
        # Live latents get -inf, which relu maps to a zero weight with zero gradient; this avoids a host sync
        # to count the dead latents (when fewer than k_aux are dead the rest are zeros).
        dead_pre_acts = out.pre_acts.masked_fill(~dead_mask, float("-inf"))
        values, indices = dead_pre_acts.topk(k_aux, dim=-1, sorted=False)
        weights = values.relu().to(W_dec.dtype)
        residual_hat = F.embedding_bag(indices, W_dec, per_sample_weights=weights, mode="sum")
    error = F.mse_loss(residual_hat, residual, reduction="sum")
    variance = (residual.var(dim=0, correction=0).sum() * residual.shape[0]).clamp_min(torch.finfo(error.dtype).tiny)
    any_dead = dead_mask.any().to(error.dtype)
    return coefficient * any_dead * error / variance


# Up to this many dead latents per kept one, AuxK works densely on the dead columns; beyond, the sparse products
# over the B * k_aux kept entries are cheaper (the crossover on CPU is in bench/README.md).
DENSE_AUXK_MAX_RATIO = 4


def _dead_reconstruction(W_dec: Tensor, pre_acts: Tensor, dead_mask: Tensor, k_aux: int, x: Tensor,
                         W_enc: Tensor, bias: Tensor) -> Tensor | None:
    """e_hat (B, d_in) from the top-k_aux dead pre-activations, touching the dead latents' columns only.

    One host sync counts the dead latents (n). Up to DENSE_AUXK_MAX_RATIO * k_aux of them, their
    pre-activations are recomputed with autograd by one (B, d_in) x (d_in, n) product and the rest is dense on
    n columns (with n <= k_aux every dead latent is kept: no selection at all). Beyond that the top k_aux are
    picked from the pre-activations already computed and the gradient flows through those B * k_aux entries
    only (``sparse_grad.py``). None when no latent is dead.
    """
    dead = dead_mask.nonzero().squeeze(1)
    n = dead.numel()
    if n == 0:
        return None
    if n <= DENSE_AUXK_MAX_RATIO * k_aux:
        dead_pre_acts = torch.addmm(bias[dead], x, W_enc[:, dead])
        if n <= k_aux:
            weights = dead_pre_acts.relu()
        else:
            picked = dead_pre_acts.detach().topk(k_aux, dim=-1, sorted=False).indices
            weights = torch.zeros_like(dead_pre_acts).scatter(1, picked, dead_pre_acts.gather(1, picked).relu())
        return weights.to(W_dec.dtype) @ W_dec[dead]
    values, picked = pre_acts.index_select(1, dead).topk(min(k_aux, n), dim=-1, sorted=False)
    layout = LatentLayout(dead[picked], W_dec.shape[0])
    weights = selected_relu(values, x, W_enc, bias, layout)
    return sparse_decode(weights.to(W_dec.dtype), W_dec, layout)
