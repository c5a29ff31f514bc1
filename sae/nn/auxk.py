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


def resolve_aux_batch_size(aux_batch_size: int | None) -> int | None:
    """``aux_batch_size``: a positive number of inputs, or None for the whole batch."""
    return None if aux_batch_size is None else check_positive_int("aux_batch_size", aux_batch_size)


def aux_rows(batch: int, aux_batch_size: int | None) -> slice:
    """The inputs AuxK reconstructs: every (batch / aux_batch_size)-th, at most aux_batch_size of them.

    Batches come shuffled (sae/data), so evenly spaced rows are a uniform sample of the batch; a view, with no
    random draw, so a resumed run repeats it exactly."""
    if aux_batch_size is None or batch <= aux_batch_size:
        return slice(None)
    return slice(0, (batch // aux_batch_size) * aux_batch_size, batch // aux_batch_size)


def auxk_loss(W_dec: Tensor, x: Tensor, out: SAEOutput, dead_mask: Tensor | None, k_aux: int,
              coefficient: float, encoder: tuple[Tensor, Tensor, Tensor] | None = None,
              aux_batch_size: int | None = None) -> Tensor:
    """Scalar ``coefficient * ||e - e_hat||^2 / ||e - mean(e)||^2``; zero without dead latents.

    x (B, d_in); out.x_hat (B, d_in), out.pre_acts (B, d_sae); W_dec (d_sae, d_in); dead_mask (d_sae,) bool.
    e = x - x_hat (detached) is what the live latents missed; e_hat = f_aux @ W_dec (no bias) from the top
    k_aux ReLU'd pre-activations of the dead latents. Normalising by the residual's own variance keeps the
    signal alive as the residual shrinks.

    Both sums run over ``aux_rows(B, aux_batch_size)`` only: an unbiased sample of the batch's error. The cost
    grows with inputs x k_aux (each kept entry reads and updates a decoder row), so on the whole batch AuxK
    outweighed the TopK step itself once many latents were dead (bench/README.md).

    ``encoder`` = (x, W_enc (d_in, d_sae), bias (d_sae,)) when out.pre_acts carry no gradient (the TopK family's
    sparse-gradient forward): then the dead latents' pre-activations are recomputed for the sampled rows, and
    the gradient reaches W_enc, the bias and W_dec through those entries alone (see ``_dead_reconstruction``).
    """
    if dead_mask is None or coefficient == 0:
        return out.f.new_zeros(())
    d_sae = W_dec.shape[0]
    if dead_mask.shape != (d_sae,) or dead_mask.dtype != torch.bool:
        # A trainer bug, not a user's configuration: a plain ValueError.
        raise ValueError(f"dead_mask must be a bool tensor of shape ({d_sae},), got "
                         f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
    rows = aux_rows(x.shape[0], aux_batch_size)
    residual = (x[rows] - out.x_hat[rows]).detach()
    if encoder is not None:
        x_enc, W_enc, bias = encoder
        residual_hat = _dead_reconstruction(W_dec, dead_mask, k_aux, x_enc[rows], W_enc, bias)
        if residual_hat is None:
            return out.f.new_zeros(())
    else:
        residual_hat = _dead_reconstruction_from(out.pre_acts[rows], W_dec, dead_mask, k_aux)
        if residual_hat is None:
            return out.f.new_zeros(())
    error = F.mse_loss(residual_hat, residual, reduction="sum")
    # One pass each: var(dim=0) over a (B, d_in) batch cost more than the rest of AuxK with few dead latents.
    variance = (residual - residual.mean(dim=0)).square().sum().clamp_min(torch.finfo(error.dtype).tiny)
    any_dead = dead_mask.any().to(error.dtype)
    return coefficient * any_dead * error / variance


def _dead_reconstruction_from(pre_acts: Tensor, W_dec: Tensor, dead_mask: Tensor, k_aux: int) -> Tensor | None:
    """e_hat (R, d_in) from pre-activations (R, d_sae) that carry their own gradient (JumpReLU, the dense paths);
    None when no latent is dead (CPU only: elsewhere that takes a host sync, so a zero loss is computed)."""
    if pre_acts.device.type != "cpu":
        # Live latents get -inf, which relu maps to a zero weight with zero gradient; this avoids a host sync
        # to count the dead latents (when fewer than k_aux are dead the rest are zeros).
        values, indices = pre_acts.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values.relu().to(W_dec.dtype), mode="sum")
    # On CPU counting is free: only the dead columns are read, and all of them when at most k_aux are dead
    # (the masked top k_aux over every column cost JumpReLU's step a third more with 1% of latents dead).
    dead = dead_mask.nonzero().squeeze(1)
    if dead.numel() == 0:
        return None
    dead_pre_acts = pre_acts.index_select(1, dead)
    if dead.numel() <= k_aux:
        return dead_pre_acts.relu().to(W_dec.dtype) @ W_dec[dead]
    values, picked = dead_pre_acts.topk(k_aux, dim=-1, sorted=False)
    return sparse_decode(values.relu().to(W_dec.dtype), W_dec, LatentLayout(dead[picked], W_dec.shape[0]))


# Up to this many dead latents per kept one, AuxK works densely on the dead columns; beyond, the sparse products
# over the B * k_aux kept entries are cheaper (the crossover on CPU is in bench/README.md).
DENSE_AUXK_MAX_RATIO = 4


def _dead_reconstruction(W_dec: Tensor, dead_mask: Tensor, k_aux: int, x: Tensor, W_enc: Tensor,
                         bias: Tensor) -> Tensor | None:
    """e_hat (R, d_in) for the sampled inputs x (R, d_in) from their top-k_aux dead pre-activations, touching the
    dead latents' columns only.

    One host sync counts the dead latents (n), whose pre-activations are recomputed by one (R, d_in) x (d_in, n)
    product. Up to DENSE_AUXK_MAX_RATIO * k_aux of them, that product carries the gradient and the rest is dense
    on n columns (with n <= k_aux every dead latent is kept: no selection at all). Beyond, the top k_aux are
    picked without autograd and the gradient flows through those R * k_aux entries only (``sparse_grad.py``).
    None when no latent is dead.
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
    with torch.no_grad():
        values, picked = torch.addmm(bias[dead], x, W_enc[:, dead]).topk(k_aux, dim=-1, sorted=False)
    layout = LatentLayout(dead[picked], W_dec.shape[0])
    weights = selected_relu(values, x, W_enc, bias, layout)
    return sparse_decode(weights.to(W_dec.dtype), W_dec, layout)
