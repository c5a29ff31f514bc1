"""Initialisation helpers: the tied weight init and the geometric median used for b_dec."""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def tied_init_(W_enc: Tensor, W_dec: Tensor, row_norm: float) -> None:
    """Fill W_dec (d_sae, d_in) with random directions of norm ``row_norm`` and set W_enc = W_dec.T.

    Directions come from a Kaiming-uniform draw U(-1/sqrt(d_in), 1/sqrt(d_in)) (only the
    direction survives the rescale). Starting the encoder as the decoder's transpose makes each
    latent begin as a matched filter for its own dictionary row, which Anthropic ("Towards
    Monosemanticity", April 2024 update) and Gao et al. (2024, section A.1) found to cut dead latents.
    """
    d_sae, d_in = W_dec.shape
    if W_enc.shape != (d_in, d_sae):
        raise ValueError(f"W_enc has shape {tuple(W_enc.shape)}, expected (d_in, d_sae) = {(d_in, d_sae)}")
    bound = 1.0 / math.sqrt(d_in)
    W_dec.uniform_(-bound, bound)
    W_dec.mul_(row_norm / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
    W_enc.copy_(W_dec.T)


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the sum of Euclidean distances to ``points``, by Weiszfeld's algorithm.

    points: (..., N, d), leading dims are independent problems solved together; returns (..., d)
    on the same device. Computes in at least float32. Each iteration re-weights the points by
    1/distance to the current estimate; distances are floored at a small fraction of the data's
    spread, so an estimate that lands on a data point does not divide by zero (a cruder form of
    the Vardi & Zhang 2000 fix). Stops when every estimate moves less than ``tol`` times the spread.
    """
    if points.ndim < 2 or points.shape[-2] == 0:
        raise ValueError(f"geometric_median needs points of shape (..., N >= 1, d), got {tuple(points.shape)}")
    if max_iter < 1 or not tol > 0:
        raise ValueError(f"geometric_median needs max_iter >= 1 and tol > 0, got {max_iter=}, {tol=}")
    compute_dtype = torch.promote_types(points.dtype, torch.float32)
    x = points.to(compute_dtype)
    y = x.mean(dim=-2)  # (..., d) start from the mean
    spread = (x - y.unsqueeze(-2)).norm(dim=-1).mean(dim=-1)  # (...,) typical distance to the centre
    tiny = torch.finfo(compute_dtype).tiny
    floor = (spread * 1e-8).clamp_min(tiny).unsqueeze(-1)  # (..., 1)
    for _ in range(max_iter):
        dist = (x - y.unsqueeze(-2)).norm(dim=-1)  # (..., N)
        # floor / max(dist, floor) is 1/dist up to a constant that cancels below, and lies in (0, 1]:
        # no overflow even when every point sits on the estimate.
        weights = floor / torch.maximum(dist, floor)  # (..., N)
        y_next = (weights.unsqueeze(-1) * x).sum(dim=-2) / weights.sum(dim=-1, keepdim=True)
        moved = (y_next - y).norm(dim=-1)
        y = y_next
        if bool((moved <= tol * spread.clamp_min(tiny)).all()):
            break
    return y.to(points.dtype)
