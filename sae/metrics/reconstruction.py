"""Reconstruction quality of an SAE: MSE, explained variance and its complement FVU.

All states are sums (``dist_reduce_fx="sum"``), so the value computed under DDP is
exactly the value on the concatenation of every rank's data. Sums of floats are
kept in float64: the explained-variance denominator is formed as
``sum x^2 - (sum x)^2 / n``, which cancels catastrophically in float32 once
``n`` reaches millions of vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from sae.metrics._rows import rows

_F64 = torch.float64


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, _F64) else t.float()


class ReconstructionError(Metric):
    """MSE, explained variance and FVU from one set of sufficient statistics.

    With N vectors x_n in R^d seen so far (over all updates and all ranks) and
    mean mu = (1/N) sum_n x_n:

        sse       = sum_n ||x_n - x_hat_n||^2
        total_var = sum_n ||x_n - mu||^2 = sum_j (S2_j - S1_j^2 / N)
        fvu       = sse / total_var,   explained_variance = 1 - fvu
        mse       = sse / (N * d)

    where S1 = sum_n x_n and S2 = sum_n x_n^2 per dim (d,). Accumulating S1 and S2
    rather than a per-batch variance makes mu the mean over ALL vectors, so the
    result does not depend on how the data was split into batches or ranks.

    Args:
        d_in: input width. Optional: without it the per-dim sums start as a
            (1,) zero that broadcasts to (d_in,) on the first update. Pass it
            under DDP when a rank might see no batch before ``compute()``,
            since ranks' states must then have equal shapes to be gathered.

    update(x, x_hat): x, x_hat (..., d_in).
    compute() -> {"mse", "explained_variance", "fvu"}, scalars float32.
    A constant input (total_var = 0) gives fvu = inf or nan, as the ratio says.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, d_in: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        width = 1 if d_in is None else d_in
        self.add_state("sum_x", torch.zeros(width, dtype=_F64), dist_reduce_fx="sum")
        self.add_state("sum_x2", torch.zeros(width, dtype=_F64), dist_reduce_fx="sum")
        self.add_state("sse", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("n_vectors", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n_elements", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        # Each batch's moments in float32 about its own mean (accurate whatever the data's offset, and no float64
        # reductions over the batch, which are slow on CPU), summed over batches in float64: sum_x2 += M2 + n mean^2.
        x, x_hat = _at_least_float32(rows(x)), _at_least_float32(rows(x_hat))
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        centred_squares = (x - mean).square_().sum(0).to(_F64)
        mean = mean.to(_F64)
        # Out-of-place: a lazily sized (1,) state broadcasts to (d_in,) here.
        self.sum_x = self.sum_x + n * mean
        self.sum_x2 = self.sum_x2 + centred_squares + n * mean.square()
        self.sse += (x - x_hat).square_().sum().to(_F64)
        self.n_vectors += n
        self.n_elements += x.numel()

    def compute(self) -> dict[str, Tensor]:
        total_var = (self.sum_x2 - self.sum_x.square() / self.n_vectors).sum()
        fvu = self.sse / total_var
        return {
            "mse": (self.sse / self.n_elements).float(),
            "explained_variance": (1.0 - fvu).float(),
            "fvu": fvu.float(),
        }
