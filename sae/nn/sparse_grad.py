"""Training-time products of a TopK-family SAE that touch only the selected latents.

In a TopK-family SAE the k selected pre-activations per input (plus AuxK's, while latents are dead) are all
that reach the loss. Autograd through ``topk`` would still form a dense (B, d_sae) pre-activation gradient
(zeros, a scatter, then a dense ``x.T @ grad``: as many FLOPs as the forward product), and the decoder's
``embedding_bag`` backward sorts the selected indices for its W_dec gradient. Here the selection happens
outside autograd and two small functions carry the gradient instead:

- ``selected_relu(values, x, W_enc, bias, layout)``: relu of the selected pre-activations (B, K), whose
  backward forms W_enc's gradient from the B * K selected entries only (``layout.transpose_matmul``).
- ``sparse_decode(values, W_dec, layout)``: sum_j values[:, j] * W_dec[indices[:, j]] (B, d_in), whose backward
  is a sampled dot product for the values and the same transposed sparse product for W_dec.

``LatentLayout`` groups the (input, latent) pairs by latent once (one sort of B * K indices) and both backward
passes share it. Results equal the dense computation up to float summation order (tests compare them with an
independent dense formula). CPU only by default: CUDA's dense products are relatively much faster than its
sparse kernels, which are untested here.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RADIX_MAX_KEYS = 1 << 16  # latent indices that fit numpy's 16-bit radix sort


def sparse_csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor of `size` from its parts, unchecked (callers build valid ones)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the tests compare it with the dense path
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class LatentLayout:
    """Which latents each input selected: ``indices`` (B, K) in [0, d_sae). Repeated indices in a row are
    allowed (BatchTopK pads rows with index 0 and value 0); their contributions add."""

    def __init__(self, indices: Tensor, d_sae: int) -> None:
        self.indices, self.d_sae = indices, d_sae
        self._by_latent: tuple[Tensor, Tensor, Tensor] | None = None
        self._by_input: Tensor | None = None

    def by_latent(self) -> tuple[Tensor, Tensor, Tensor]:
        """(crow (d_sae + 1,), inputs (B * K,), order (B * K,)): the pairs sorted by latent, in CSR form."""
        if self._by_latent is None:
            flat = self.indices.flatten()
            if flat.device.type == "cpu" and self.d_sae <= RADIX_MAX_KEYS:
                # numpy's stable argsort of 16-bit keys is a one-thread radix sort; torch's parallel sort waits for
                # every thread at each phase, which dominated the step on a busy machine (bench/README.md).
                order = torch.from_numpy(np.argsort(flat.numpy().astype(np.uint16), kind="stable"))
            else:
                order = torch.sort(flat, stable=True).indices
            # 32-bit CSR indices where they fit: the CPU sparse product converts 64-bit ones on every call.
            index_dtype = torch.int32 if flat.numel() < 2**31 else torch.long
            crow = torch.zeros(self.d_sae + 1, dtype=index_dtype, device=flat.device)
            torch.cumsum(torch.bincount(flat, minlength=self.d_sae), 0, out=crow[1:])
            inputs = torch.div(order, self.indices.shape[1], rounding_mode="floor").to(index_dtype)
            self._by_latent = (crow, inputs, order)
        return self._by_latent

    def transpose_matmul(self, values: Tensor, dense: Tensor) -> Tensor:
        """values (B, K), dense (B, n) -> (d_sae, n): row i = sum over pairs (b, j) with latent i of values[b, j] dense[b]."""
        crow, inputs, order = self.by_latent()
        batch = self.indices.shape[0]
        grouped = sparse_csr(crow, inputs, values.flatten()[order].to(dense.dtype), (self.d_sae, batch))
        return grouped @ dense

    def sampled_dot(self, a: Tensor, rows: Tensor) -> Tensor:
        """a (B, n), rows (d_sae, n) -> (B, K): <a[b], rows[indices[b, j]]>, without the (B, d_sae) product."""
        if self._by_input is None:
            batch, k = self.indices.shape
            self._by_input = torch.arange(0, batch * k + 1, k, device=a.device)
        ones = torch.ones(self.indices.numel(), dtype=a.dtype, device=a.device)
        pattern = sparse_csr(self._by_input, self.indices.flatten(), ones, (self.indices.shape[0], self.d_sae))
        return torch.sparse.sampled_addmm(pattern, a, rows.T, beta=0.0).values().view(self.indices.shape)

    def matmul(self, values: Tensor, rows: Tensor) -> Tensor:
        """values (B, K), rows (d_sae, n) -> (B, n): sum_j values[:, j] rows[indices[:, j]]."""
        return F.embedding_bag(self.indices, rows, per_sample_weights=values.to(rows.dtype), mode="sum")


class _SelectedReLU(torch.autograd.Function):
    """relu(values); values are the pre-activations ``(x @ weight + bias)[b, indices[b, j]]``, computed outside."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, x: Tensor, weight: Tensor, bias: Tensor, layout: LatentLayout) -> Tensor:
        out = values.relu()
        ctx.save_for_backward(x, weight, out)
        ctx.layout = layout
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, out = ctx.saved_tensors
        layout: LatentLayout = ctx.layout
        grad = torch.where(out > 0, grad, 0.0)  # relu's gradient; BatchTopK's padding (value 0) gets none
        grad_x = layout.matmul(grad, weight.T.contiguous()) if ctx.needs_input_grad[1] else None
        grad_weight = layout.transpose_matmul(grad, x).T if ctx.needs_input_grad[2] else None
        grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_bias = grad.new_zeros(layout.d_sae).index_add_(0, layout.indices.flatten(), grad.flatten())
        return None, grad_x, grad_weight, grad_bias, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: Tensor, weight: Tensor, layout: LatentLayout) -> Tensor:
        ctx.save_for_backward(values, weight)
        ctx.layout = layout
        return layout.matmul(values, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        values, weight = ctx.saved_tensors
        layout: LatentLayout = ctx.layout
        grad_values = layout.sampled_dot(grad, weight).to(values.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = layout.transpose_matmul(values, grad) if ctx.needs_input_grad[1] else None
        return grad_values, grad_weight, None


def selected_relu(values: Tensor, x: Tensor, weight: Tensor, bias: Tensor, layout: LatentLayout) -> Tensor:
    """values (B, K): the selected entries of ``x @ weight + bias`` (B, d_sae), computed without autograd.

    Returns relu(values) (B, K), differentiable with respect to x (B, d_in), weight (d_in, d_sae) and
    bias (d_sae,) as if it had been gathered from the dense product."""
    return _SelectedReLU.apply(values.detach(), x, weight, bias, layout)


def sparse_decode(values: Tensor, weight: Tensor, layout: LatentLayout) -> Tensor:
    """values (B, K), weight (d_sae, d_in) -> (B, d_in): sum_j values[:, j] * weight[indices[:, j]]."""
    return _SparseDecode.apply(values, weight, layout)
