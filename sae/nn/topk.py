"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Sparsity is set directly by k instead of a penalty, so there is no L1 shrinkage. Decoder rows are
unit-norm. Dead latents are revived by the AuxK loss: the residual the SAE missed is reconstructed
from the top-k_aux pre-activations among dead latents only.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .auxk import auxk_loss, resolve_aux_batch_size, resolve_k_aux
from .screen import native_bf16_matmul, screenable, screened_topk
from .sparse_grad import LatentLayout, selected_relu, sparse_decode
from .base import (
    SAEConfigError,
    SAEOutput,
    SparseAutoencoder,
    check_auto_flag,
    check_nonnegative_float,
    check_positive_int,
    register_architecture,
)

# Sparse decode reads k rows of W_dec per input instead of multiplying by all d_sae; gathers run
# far below matmul throughput, so it only pays when few latents are active. On CPU (d_in 512,
# batch 512, d_sae 4k-16k) it already cut a training step by 20-45% at k / d_sae = 1/16; on GPU the
# dense matmul is relatively much cheaper, so auto mode stays conservative until GPU benchmarks retune it.
SPARSE_DECODE_MAX_DENSITY = 1 / 64


def not_computed(batch: int, d_sae: int, dtype: torch.dtype) -> Tensor:
    """(batch, d_sae) NaN without memory (one expanded scalar): pre-activations a forward did not form. NaN, not
    zeros, so that reading them by mistake shows; ``sae.pre_acts(x)`` computes them."""
    return torch.full((), math.nan, dtype=dtype).expand(batch, d_sae)


@register_architecture
class TopKSAE(SparseAutoencoder):
    """f = scatter(ReLU(topk_k(pre_acts))): the k largest pre-activations per input survive.

    Hyperparameters:
        k: active latents per input (Gao et al. use 32 at d_sae ~ 32k).
        k_aux: latents used by AuxK; default d_in // 2 (Gao et al., appendix A.2), capped at d_sae.
        aux_k_coefficient: weight of AuxK, 1/32 as in the paper. AuxK is the only gradient dead
            latents receive (the residual is detached), and Adam normalises per parameter, so the
            coefficient matters less than its size suggests.
        aux_batch_size: inputs of each batch AuxK reconstructs (an evenly spaced sample, ``auxk.aux_rows``);
            None: all of them.
        sparse_decode: gather the k active decoder rows (True), dense matmul (False), or
            None = auto: sparse when k / d_sae <= SPARSE_DECODE_MAX_DENSITY.
        sparse_encoder_grad: in training, select outside autograd and carry gradients through the selected
            entries only (``sparse_grad.py``; True), or through the dense pre-activations (False), or
            None = auto: on CPU.
        bf16_screen: in that training forward, find the top k through a bfloat16 screen of the encoder product
            and then the candidates' float32 values (``screen.py``: the same latents and values, about half the
            product's cost; True), or from the float32 product (False), or None = auto: on CPUs that multiply
            bfloat16 natively.
    """

    architecture: ClassVar[str] = "topk"
    constrains_decoder_norm: ClassVar[bool] = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int = 32,
        k_aux: int | None = None,
        aux_k_coefficient: float = 1 / 32,
        sparse_decode: bool | None = None,
        sparse_encoder_grad: bool | None = None,
        aux_batch_size: int | None = 256,
        bf16_screen: bool | None = None,
    ) -> None:
        super().__init__(d_in, d_sae)
        self.k = check_positive_int("k", k)
        if k > d_sae:
            raise SAEConfigError(
                f"k={k} exceeds d_sae={d_sae}: at most d_sae latents can be active; choose k <= {d_sae}"
            )
        self.k_aux = resolve_k_aux(k_aux, d_in, d_sae)
        self.aux_k_coefficient = check_nonnegative_float("aux_k_coefficient", aux_k_coefficient)
        self.aux_batch_size = resolve_aux_batch_size(aux_batch_size)
        self.sparse_decode = check_auto_flag("sparse_decode", sparse_decode)
        self.sparse_encoder_grad = check_auto_flag("sparse_encoder_grad", sparse_encoder_grad)
        self.bf16_screen = check_auto_flag("bf16_screen", bf16_screen)
        self._native_bf16: bool | None = None  # read from the CPU's flags on first use

    def uses_sparse_grads(self, x: Tensor) -> bool:
        """Whether this forward selects outside autograd and carries gradients through the selected entries only."""
        use_sparse = self.sparse_encoder_grad
        if use_sparse is None:
            use_sparse = x.device.type == "cpu"
        return bool(use_sparse and self.training and torch.is_grad_enabled() and self.W_enc.requires_grad)

    def uses_screen(self, x: Tensor) -> bool:
        """Whether the sparse-gradient forward selects through a bfloat16 screen (``screen.py``)."""
        if self.bf16_screen is False or not screenable(x, self.W_enc, self.row_candidates):
            return False
        if self.bf16_screen is None and self._native_bf16 is None:
            self._native_bf16 = native_bf16_matmul()
        return bool(self.bf16_screen or self._native_bf16)

    # ----------------------------------------------------------------------------- selection
    def active_latents(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """(B, d_sae) -> values (B, K), indices (B, K) of the active latents (zeros allowed)."""
        values, indices = pre_acts.topk(self.k, dim=-1, sorted=False)
        return values.relu(), indices

    def activation(self, pre_acts: Tensor) -> Tensor:
        values, indices = self.active_latents(pre_acts)
        # In place: the out-of-place scatter would copy the whole (B, d_sae) zeros first.
        return torch.zeros_like(pre_acts).scatter_(-1, indices, values)

    @property
    def uses_sparse_decode(self) -> bool:
        if self.sparse_decode is not None:
            return self.sparse_decode
        return self.k / self.d_sae <= SPARSE_DECODE_MAX_DENSITY

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """values (B, K), indices (B, K) -> (B, d_in): sum_j values[:, j] * W_dec[indices[:, j]] + b_dec.

        Equal to ``decode`` of the scattered f, values and gradients alike; embedding_bag fuses the
        gather and the weighted sum without materialising the (B, K, d_in) rows.
        """
        rows = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return rows + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:
        if self.uses_sparse_grads(x):
            return self._forward_sparse_grads(x)
        pre_acts = self.pre_acts(x)
        if not self.uses_sparse_decode:
            f = self.activation(pre_acts)
            return SAEOutput(self.decode(f), f, pre_acts)
        values, indices = self.active_latents(pre_acts)
        # Adding, not writing: padding entries (value 0) may repeat an active latent's index (BatchTopK).
        f = torch.zeros_like(pre_acts).scatter_add_(-1, indices, values.to(pre_acts.dtype))
        return SAEOutput(self.decode_sparse(values, indices), f, pre_acts, (values, indices))

    def _forward_sparse_grads(self, x: Tensor) -> SAEOutput:
        """The training forward with ``sparse_grad.py``'s gradients: the encoder product and the selection run
        without autograd, and only the selected entries carry a gradient back (to W_enc, b_enc, b_dec and x).
        The returned pre_acts (B, d_sae) do not require grad, and are NaN where ``uses_screen`` (that selection
        never forms them); AuxK recomputes its own entries (``aux_loss``)."""
        bias = self.encoder_bias()
        with torch.no_grad():
            selected, indices, pre_acts = self.select_for_training(x, bias)
        layout = LatentLayout(indices, self.d_sae)
        values = selected_relu(selected, x, self.W_enc, bias, layout)
        f = values.new_zeros(pre_acts.shape).scatter_add_(-1, indices, values)
        if self.uses_sparse_decode:
            x_hat = sparse_decode(values, self.W_dec, layout) + self.b_dec
        else:
            x_hat = self.decode(f)
        return SAEOutput(x_hat, f, pre_acts, (values, indices))

    def select_for_training(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Without autograd, x (B, d_in) -> the active latents' values (B, K) and indices (B, K), and the
        pre-activations (B, d_sae) they were chosen from (``not_computed`` after the screen)."""
        if self.uses_screen(x):
            # Centred inputs: the screen's error bound grows with ||x||, and activations carry a large mean that
            # b_dec removes (on mixed3b vectors: 64 candidates per row centred, 1056 not).
            values, indices = screened_topk(x - self.b_dec, self.W_enc, self.b_enc, self.row_candidates)
            selected = self.select_from_rows(values, indices)
            if selected is not None:
                return (*selected, not_computed(x.shape[0], self.d_sae, x.dtype))
        pre_acts = torch.addmm(bias, x, self.W_enc)
        return (*self.active_latents(pre_acts), pre_acts)

    @property
    def row_candidates(self) -> int:
        """How many of each row's largest pre-activations the training selection reads (the screen finds these)."""
        return self.k

    def select_from_rows(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor] | None:
        """The active latents (values (B, K), indices (B, K)) from each row's ``row_candidates`` largest
        pre-activations (B, row_candidates); None when those do not decide them (the full product then does)."""
        return values.relu(), indices

    # ----------------------------------------------------------------------------- AuxK
    def aux_loss(self, x: Tensor, out: SAEOutput, dead_mask: Tensor | None) -> Tensor:
        """AuxK (Gao et al. 2024, section A.2), see ``auxk.auxk_loss``. dead_mask: (d_sae,) bool."""
        if dead_mask is None or self.aux_k_coefficient == 0:
            return out.f.new_zeros(())
        # Pre-activations from the sparse-gradient forward carry no gradient: AuxK recomputes its own entries.
        encoder = None if out.pre_acts.requires_grad else (x, self.W_enc, self.encoder_bias())
        return auxk_loss(self.W_dec, x, out, dead_mask, self.k_aux, self.aux_k_coefficient, encoder=encoder,
                         aux_batch_size=self.aux_batch_size)

    # ----------------------------------------------------------------------------- description
    def extra_hparams(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "k_aux": self.k_aux,
            "aux_k_coefficient": self.aux_k_coefficient,
            "aux_batch_size": self.aux_batch_size,
            "sparse_decode": self.sparse_decode,
            "sparse_encoder_grad": self.sparse_encoder_grad,
            "bf16_screen": self.bf16_screen,
        }

    def activation_formula(self) -> str:
        return f"relu(pre) on the {self.k} largest entries of pre per input, 0 elsewhere (TopK, k={self.k})"
