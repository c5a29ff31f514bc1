"""Dead-feature resampling (Anthropic, "Towards Monosemanticity", 2023, appendix on resampling).

At scheduled steps, every feature that fired on none of the last `dead_window` vectors is re-initialized
from an input drawn with probability proportional to its squared reconstruction error:

- decoder row  = the normalized input;
- encoder row  = the normalized input * 0.2 * the mean norm of the alive encoder rows;
- encoder bias = 0;
- the Adam moments of exactly those parameters are reset, so stale momentum cannot undo the reset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae.nn import SparseAutoencoder


@dataclass(frozen=True)
class ResampleSchedule:
    """Resample every `every_n_steps` optimizer steps, up to and including `until_step` (None: always)."""

    every_n_steps: int = 25_000
    until_step: int | None = 100_000
    encoder_scale: float = 0.2

    def due(self, step: int, total_steps: int | None = None, decay_fraction: float = 0.0) -> bool:
        """`step` counts completed optimizer steps (1-based). Never from the start of the learning-rate decay
        (the last `decay_fraction` of `total_steps`) on, nor at the last step: a latent resampled there has no
        time to learn (Bricken et al. 2023 resample early in a long run), and the export would keep it untrained."""
        if total_steps is not None and total_steps > 0 and step >= total_steps * (1 - decay_fraction):
            return False
        return step > 0 and step % self.every_n_steps == 0 and (self.until_step is None or step <= self.until_step)


@torch.no_grad()
def draw_replacements(sae: SparseAutoencoder, x: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """`n` rows of `x` (B, d_in) drawn with probability ∝ squared reconstruction error: (n, d_in)."""
    # ||x - x_hat||^2 per input. (The 2023 paper squares the per-input loss once more; this follows the
    # squared error itself, which favours badly reconstructed inputs less aggressively.)
    error = (sae(x).x_hat - x).pow(2).sum(dim=1)
    weights = torch.where(torch.isfinite(error), error, torch.zeros_like(error))
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    rows = torch.multinomial(weights, n, replacement=n > x.shape[0], generator=generator)
    return x[rows]


@torch.no_grad()
def resample_features_(
    sae: SparseAutoencoder,
    dead: Tensor,
    replacements: Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    encoder_scale: float = 0.2,
) -> int:
    """Re-initialize the features in the boolean mask `dead` (d_sae,) from `replacements` (n_dead, d_in).

    Returns the number of features resampled.
    """
    index = dead.nonzero().flatten()
    n = index.numel()
    if n == 0:
        return 0
    directions = replacements / replacements.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norms = sae.W_enc.norm(dim=0)
    mean_alive = enc_norms[alive].mean() if bool(alive.any()) else torch.ones((), device=enc_norms.device)
    sae.W_dec[index] = directions.to(sae.W_dec.dtype)
    sae.W_enc[:, index] = (directions * encoder_scale * mean_alive).T.to(sae.W_enc.dtype)
    sae.b_enc[index] = 0.0
    if optimizer is not None:
        _reset_moments(optimizer, sae.W_dec, (index, slice(None)))
        _reset_moments(optimizer, sae.W_enc, (slice(None), index))
        _reset_moments(optimizer, sae.b_enc, (index,))
    return n


def _reset_moments(optimizer: torch.optim.Optimizer, param: Tensor, where: tuple) -> None:
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key][where] = 0.0
