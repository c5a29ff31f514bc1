"""ReLU SAE with an L1 penalty weighted by decoder norms.

Bricken et al. (2023) "Towards Monosemanticity", with the changes of Anthropic's April 2024
update ("Circuits Updates"): the decoder is not norm-constrained; instead each activation is
penalised in proportion to the norm of the decoder row it writes, f_i * ||W_dec_i||, so shrinking f
while growing W_dec buys nothing; W_enc starts as W_dec.T with small decoder rows.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import SAEOutput, SparseAutoencoder, check_nonnegative_float, register_architecture


@register_architecture
class ReLUSAE(SparseAutoencoder):
    """f = ReLU(pre_acts); sparsity = l1_coefficient * mean_b sum_i f_bi ||W_dec_i|| / sqrt(d_in).

    Why divide by sqrt(d_in): inputs are scaled to mean norm sqrt(d_in), so f_i ||W_dec_i|| / sqrt(d_in)
    is feature i's contribution as a fraction of a typical input's norm. Against the per-element MSE
    (base.py) the L1 term then shrinks each activation by about l1_coefficient / 2 of that norm,
    whatever d_in is, so one default serves layers of 256 and of 1024 channels. In Anthropic's
    summed-squared-error convention the same loss has lambda = l1_coefficient * sqrt(d_in).

    Default l1_coefficient = 0.2: Anthropic's lambda = 5 at d_in ~ 600 (their inputs are scaled to
    mean norm sqrt(d_in) as ours are), a shrinkage of ~10% of the input norm; it recovers >= 97% of
    a planted dictionary at mean L0 ~3 (tests/test_nn.py), where 0.15 starts to miss directions.
    """

    architecture: ClassVar[str] = "relu"
    constrains_decoder_norm: ClassVar[bool] = False
    # The April 2024 update starts W_dec rows as random directions with a small fixed norm (they
    # report 0.05-1 working); 0.1 keeps the first reconstructions small, so early steps are not
    # spent undoing a noisy x_hat.
    init_decoder_row_norm: ClassVar[float] = 0.1

    def __init__(self, d_in: int, d_sae: int, l1_coefficient: float = 0.2) -> None:
        self.l1_coefficient = check_nonnegative_float("l1_coefficient", l1_coefficient)
        super().__init__(d_in, d_sae)

    def activation(self, pre_acts: Tensor) -> Tensor:
        return torch.relu(pre_acts)

    def sparsity_loss(self, out: SAEOutput) -> Tensor:
        decoder_norms = self.W_dec.norm(dim=1)  # (d_sae,)
        # mean_b sum_i f_bi ||W_dec_i||, summed over the batch first: no (B, d_sae) product forward or backward.
        weighted_l1 = out.f.sum(dim=0) @ decoder_norms / out.f.shape[0]
        return self.l1_coefficient * weighted_l1 / math.sqrt(self.d_in)

    def extra_hparams(self) -> dict[str, Any]:
        return {"l1_coefficient": self.l1_coefficient}

    def activation_formula(self) -> str:
        return "relu(pre)"
