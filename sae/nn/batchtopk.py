"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

TopK's budget is per input; BatchTopK spends k * B activations over the whole batch, so inputs
that need more latents can take them from inputs that need fewer. Because that couples the inputs
of a batch, inference uses a single global threshold instead: the paper's estimate is the
expected smallest activation kept in training, tracked here as an exponential moving average.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import SAEConfigError, check_nonnegative_float, register_architecture
from .topk import TopKSAE


@register_architecture
class BatchTopKSAE(TopKSAE):
    """Training: keep the k * B largest ReLU'd pre-activations of the batch. Eval: pre * (pre > threshold).

    Inherits k, k_aux, aux_k_coefficient, aux_batch_size (AuxK) and sparse_decode from TopKSAE; ``k`` is the mean
    number of active latents per input. ``threshold_momentum`` is the EMA decay of the threshold
    estimate: 0.99 averages over the last ~100 batches, enough to smooth the batch-to-batch noise of
    a minimum while still following the drift of activation scale during training.
    The ``threshold`` buffer (scalar) is 0 until the first training batch, i.e. eval is plain ReLU.
    """

    architecture: ClassVar[str] = "batchtopk"
    constrains_decoder_norm: ClassVar[bool] = True
    threshold: Tensor

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int = 32,
        k_aux: int | None = None,
        aux_k_coefficient: float = 0.5,
        sparse_decode: bool | None = None,
        threshold_momentum: float = 0.99,
        sparse_encoder_grad: bool | None = None,
        aux_batch_size: int | None = None,
        bf16_screen: bool | None = None,
    ) -> None:
        super().__init__(d_in, d_sae, k=k, k_aux=k_aux, aux_k_coefficient=aux_k_coefficient,
                         sparse_decode=sparse_decode, sparse_encoder_grad=sparse_encoder_grad,
                         aux_batch_size=aux_batch_size, bf16_screen=bf16_screen)
        if check_nonnegative_float("threshold_momentum", threshold_momentum) >= 1:
            raise SAEConfigError(
                f"threshold_momentum={threshold_momentum!r} must be in [0, 1) (0.99 averages ~100 batches)"
            )
        self.threshold_momentum = float(threshold_momentum)
        self.register_buffer("threshold", torch.zeros(()))
        # Per-row candidates of the two-stage selection (``batch_top``); grows when a batch needs more.
        self._candidates = min(4 * self.k, d_sae)

    def activation(self, pre_acts: Tensor) -> Tensor:
        if not self.training:
            return pre_acts * (pre_acts > self.threshold)
        values, indices = self.batch_top(pre_acts)
        self._update_threshold_(values)
        return torch.zeros_like(pre_acts).flatten().scatter_(0, indices, values).view_as(pre_acts)

    def batch_top(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """(B, d_sae) -> values (k * B,), flat indices (k * B,): the k * B largest ReLU'd pre-activations.

        On CPU a top-k over all B * d_sae entries dominated the step (0.41 s of ~0.57 s at B 4096, d_sae 3840,
        k 32), so there it runs in two stages: each row's ``candidates`` largest, then the batch's top k * B
        of those (``_top_of_rows``). CUDA keeps the one-stage path.
        """
        if pre_acts.device.type == "cpu" and self._candidates < pre_acts.shape[1]:
            top = self._top_of_rows(*pre_acts.topk(self._candidates, dim=-1, sorted=False))
            if top is not None:
                return top
        return pre_acts.relu().flatten().topk(self.k * pre_acts.shape[0], sorted=False)

    def _top_of_rows(self, row_values: Tensor, row_indices: Tensor) -> tuple[Tensor, Tensor] | None:
        """The batch's top k * B among each row's c largest pre-activations (B, c): values (k * B,), flat indices
        (k * B,). Exact unless some row had all its candidates above the cut (it may hold more): then None, and
        later batches take twice as many candidates. The check reads one flag from the device (free on CPU)."""
        row_values = row_values.relu()
        values, picked = row_values.flatten().topk(self.k * row_values.shape[0], sorted=False)
        if bool((row_values.amin(dim=-1) > values.min()).any()):
            self._candidates = min(2 * self._candidates, self.d_sae)
            return None
        rows = torch.div(picked, row_values.shape[1], rounding_mode="floor")
        return values, rows * self.d_sae + row_indices.flatten()[picked]

    @property
    def row_candidates(self) -> int:
        return self._candidates

    def select_from_rows(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor] | None:
        top = self._top_of_rows(values, indices)
        if top is None:
            return None
        self._update_threshold_(top[0])
        return self._padded_rows(*top, values.shape[0])

    def active_latents(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """Rows carry different numbers of active latents; pad every row to the widest one with zeros
        (in training the padding's index is 0, which may repeat an active latent: consumers add, see forward)."""
        if not self.training:
            f = self.activation(pre_acts)
            width = max(int((f != 0).sum(dim=-1).max()), 1)  # one host sync per batch
            return f.topk(width, dim=-1, sorted=False)
        values, flat = self.batch_top(pre_acts)
        self._update_threshold_(values)
        return self._padded_rows(values, flat, pre_acts.shape[0])

    def _padded_rows(self, values: Tensor, flat: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """values (n,), flat indices (n,) into (B, d_sae) -> values (B, width), indices (B, width), each row's
        entries padded with zeros at index 0. Laid out straight from the picks: scattering them into a (B, d_sae)
        f and taking each row's top-width again cost as much as the selection itself on CPU."""
        d_sae = self.d_sae
        rows = torch.div(flat, d_sae, rounding_mode="floor")
        counts = torch.bincount(rows, minlength=batch)
        width = max(int(counts.max()), 1)  # one host sync per batch
        order = torch.argsort(rows, stable=True)
        rows = rows[order]
        slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
        padded_values = values.new_zeros(batch, width).index_put((rows, slot), values[order])
        padded_indices = flat.new_zeros(batch, width).index_put_((rows, slot), flat[order] - rows * d_sae)
        return padded_values, padded_indices

    @torch.no_grad()
    def _update_threshold_(self, kept: Tensor) -> None:
        """EMA of the smallest positive kept activation; the first batch sets it outright. No host sync."""
        smallest = torch.where(kept > 0, kept, torch.full_like(kept, float("inf"))).min().to(self.threshold.dtype)
        blended = self.threshold_momentum * self.threshold + (1 - self.threshold_momentum) * smallest
        updated = torch.where(self.threshold > 0, blended, smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.threshold))

    # ----------------------------------------------------------------------------- description
    def extra_hparams(self) -> dict[str, Any]:
        return {**super().extra_hparams(), "threshold_momentum": self.threshold_momentum}

    def extra_export_tensors(self) -> dict[str, Tensor]:
        # Per latent, so an exported BatchTopK SAE reads like a JumpReLU one at inference.
        return {"threshold": self.threshold.expand(self.d_sae)}

    @torch.no_grad()
    def load_extra_tensors_(self, tensors: dict[str, Tensor]) -> None:
        threshold = tensors["threshold"]
        if not torch.allclose(threshold, threshold[0].expand_as(threshold)):
            raise SAEConfigError("a batchtopk SAE has one global threshold, but the file holds per-latent "
                                 "thresholds; load it with architecture 'jumprelu' instead")
        self.threshold.copy_(threshold[0])

    def activation_formula(self) -> str:
        return ("pre * (pre > threshold), one global threshold shared by all latents "
                f"(BatchTopK inference; training kept the top {self.k} * batch activations)")
