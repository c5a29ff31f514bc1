"""The exact per-row top-k of ``x @ W + b`` on CPU, found through a bfloat16 screen of the product.

A TopK training step on CPU is mostly one float32 product (B, d_in) x (d_in, d_sae) and the top-k of each row.
Where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), the same product in bfloat16 with float32
accumulation costs about half as much, and its error has a rigorous bound (rounding each factor to bfloat16
moves a product by at most 2u + u^2 of its size, u = 2^-8; float32 accumulation and the rounding of the
result add the rest; Cauchy-Schwarz bounds the sums by norms, ``_error_bounds``). So:

1. The screen P~ (B, d_sae) and the row's groups of ``GROUP`` strided columns: the k-th largest group maximum
   g_b is the screened value of k distinct entries, whose exact values are all at least lo(g_b).
2. Every entry whose exact value can reach lo(g_b) has hi(P~) >= lo(g_b): those are the candidates (57 per row
   at k 32, d_sae 3840, on random weights and on mixed3b activations). Every other entry lies strictly below k entries, so it is not in the top k.
3. The candidates get their float32 values (x_b . w_j + b_j, a sampled product) and the top k of those is the
   row's top k: the same entries and values as the float32 product's, up to float summation order.

Nothing approximate leaves this module: non-finite inputs take the plain float32 path, and so do rows with more
than ``MAX_CANDIDATES`` k candidates (entries closer together than the bound), one by one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .sparse_grad import sparse_csr

MAX_CANDIDATES = 8  # per row, in units of k: beyond, the row's dense product and top-k cost less
GROUP = 8  # strided columns per group: the k-th largest of the d_sae / 8 group maxima sets each row's threshold
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24
TINY = 2.0**-126  # bfloat16 and float32 flush subnormal products to zero in the dot-product instructions
# |P~ - P_acc| <= OUTPUT_ROUNDING |P~| (+ U_BF16 |b| in E): the product rounded to bfloat16 once, or twice where
# the library rounds it before adding the bias.
OUTPUT_ROUNDING = 2 * U_BF16 / (1 - U_BF16) * (1 + U_BF16)


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Linux: the avx512_bf16 or amx_bf16 flag) and torch reaches
    it (through oneDNN; elsewhere a bfloat16 product is emulated and slower than the float32 one)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def screenable(x: Tensor, W: Tensor, k: int) -> bool:
    """Whether ``screened_topk`` applies: a float32 CPU product whose rows have at least 2k groups."""
    d_sae = W.shape[1]
    return (x.device.type == "cpu" and x.dtype == W.dtype == torch.float32 and x.dim() == 2
            and d_sae % GROUP == 0 and d_sae // GROUP >= 2 * k)


def screened_topk(x: Tensor, W: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, d_in), W (d_in, d_sae), bias (d_sae,), all float32 on CPU, no autograd.

    Returns values (B, k) float32 and indices (B, k) of the k largest entries of each row of x @ W + bias
    (in no particular order), and the bfloat16 screen (B, d_sae) they were found with. The bound grows with
    ||x_b||, so centre x first where a bias carries its mean (TopK passes x - b_dec and b_enc)."""
    x_bf16, W_bf16 = x.bfloat16(), W.bfloat16()
    screen = torch.addmm(bias.bfloat16(), x_bf16, W_bf16)
    finite = bool(torch.isfinite(x.sum()) & torch.isfinite(W.sum()) & torch.isfinite(bias.sum()))
    if not finite:
        values, indices = torch.addmm(bias, x, W).topk(k, dim=-1, sorted=False)
        return values, indices, screen
    error = _error_bounds(x, W, bias, x_bf16, W_bf16)
    flat, rows, counts = _candidates(screen, _lower_bounds(screen, error, k), error)
    # A row with many candidates (entries closer together than the bound) costs less as a dense row.
    dense = counts > MAX_CANDIDATES * k
    dense_rows = dense.nonzero().squeeze(1)
    if dense_rows.numel():
        light = ~dense[rows]
        flat, rows, counts = flat[light], rows[light], counts.masked_fill(dense, 0)
    values, indices = _exact_topk(x, W, bias, flat, rows, counts, k)
    if dense_rows.numel():
        values[dense_rows], indices[dense_rows] = torch.addmm(bias, x[dense_rows], W).topk(k, dim=-1, sorted=False)
    return values, indices, screen


def _error_bounds(x: Tensor, W: Tensor, bias: Tensor, x_bf16: Tensor, W_bf16: Tensor) -> Tensor:
    """(B,) E_b with |P_acc - P| <= E_b for every entry of row b, P_acc the float32 accumulator before rounding.

    With x~ = x + dx and w~ = w + dw the bfloat16 factors, |x~ . w~ - x . w| <= ||dx|| ||w|| + ||x|| ||dw|| +
    ||dx|| ||dw|| (Cauchy-Schwarz), from the rounding errors actually made: about 2.5x tighter than the worst
    case 2u ||x|| ||w||, so fewer candidates. The float32 accumulation adds gamma_(d+1) sum |x~ w~| + |b~|."""
    d_in = x.shape[1]
    gamma = (d_in + 1) * U_FP32 / (1 - (d_in + 1) * U_FP32)
    slack = 1 + 4 * d_in * U_FP32  # the norms below are float32 sums themselves
    dx = (x - x_bf16.float()).norm(dim=1) * slack
    x_norm = x.norm(dim=1) * slack
    column_norm = float(W.norm(dim=0).max()) * slack
    column_error = float((W - W_bf16.float()).norm(dim=0).max()) * slack
    bias_max = float(bias.abs().max())
    product = dx * column_norm + x_norm * column_error + dx * column_error
    accumulation = gamma * ((x_norm + dx) * (column_norm + column_error) + bias_max * (1 + U_BF16))
    rounded_before_bias = U_BF16 * (1 + U_BF16) * bias_max
    return product + accumulation + U_BF16 * bias_max + rounded_before_bias + (d_in + 1) * TINY * max(column_norm, 1.0)


def _lower_bounds(screen: Tensor, error: Tensor, k: int) -> Tensor:
    """(B,) a value that the k-th largest exact entry of each row reaches: lo(k-th largest group maximum)."""
    batch, d_sae = screen.shape
    groups = d_sae // GROUP
    group_max = screen.view(batch, GROUP, groups).amax(dim=1).float().numpy()  # group g: columns g + j * groups
    kth = torch.from_numpy(np.partition(group_max, groups - k, axis=1)[:, groups - k])
    return kth - OUTPUT_ROUNDING * kth.abs() - error


def _candidates(screen: Tensor, low: Tensor, error: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The entries whose exact value may reach ``low``: flat positions (nnz,) in row order, their rows (nnz,),
    and how many each row has (B,): at least k (the k entries behind the k-th group maximum among them)."""
    batch, d_sae = screen.shape
    u = OUTPUT_ROUNDING
    # Invert hi(p) = p + u |p| + E (increasing): the smallest screened value whose entry can reach low.
    shifted = low - error
    threshold = torch.where(shifted >= 0, shifted / (1 + u), shifted / (1 - u))
    # Rounded down to bfloat16, so that the comparison in bfloat16 keeps every such entry.
    threshold = (threshold - U_BF16 * threshold.abs() - TINY).bfloat16()
    flat = torch.from_numpy(np.flatnonzero(_at_least(screen, threshold)))
    rows = torch.div(flat, d_sae, rounding_mode="floor")
    return flat, rows, torch.bincount(rows, minlength=batch)


def _at_least(screen: Tensor, threshold: Tensor) -> np.ndarray:
    """(B, d_sae) bool array: screen >= threshold (B,) per row, both bfloat16."""
    if bool((threshold > 0).all()):
        # Positive bfloat16 numbers order like their bits read as int16, and every negative one reads negative;
        # numpy's int16 comparison is 2-3x faster than torch's bfloat16 one.
        return screen.view(torch.int16).numpy() >= threshold.view(torch.int16).numpy()[:, None]
    return (screen >= threshold.unsqueeze(1)).numpy()


def _exact_topk(x: Tensor, W: Tensor, bias: Tensor, flat: Tensor, rows: Tensor, counts: Tensor,
                k: int) -> tuple[Tensor, Tensor]:
    """The top k of each row among its candidates, by their float32 values (rows without any: -inf)."""
    batch, d_sae = x.shape[0], W.shape[1]
    crow = torch.zeros(batch + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=crow[1:])
    columns = flat - rows * d_sae
    pattern = sparse_csr(crow, columns, torch.ones(columns.numel(), dtype=x.dtype), (batch, d_sae))
    # W as a transposed view of its contiguous transpose: the sampled product reads whole columns, 1.4x faster.
    exact = torch.sparse.sampled_addmm(pattern, x, W.T.contiguous().T, beta=0.0).values() + bias[columns]
    width = max(int(counts.max()), k)
    slot = torch.arange(columns.numel()) - crow[rows]
    padded = torch.full((batch, width), -math.inf, dtype=x.dtype).index_put_((rows, slot), exact)
    padded_columns = torch.zeros((batch, width), dtype=torch.long).index_put_((rows, slot), columns)
    values, picked = padded.topk(k, dim=-1, sorted=False)
    return values, padded_columns.gather(1, picked)
