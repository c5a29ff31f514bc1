"""The exact per-row top-k of ``x @ W + b`` on CPU, found through a bfloat16 screen of the product.

A TopK training step on CPU is mostly one float32 product (B, d_in) x (d_in, d_sae) and the top-k of each row.
Where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), the same product in bfloat16 with float32
accumulation costs about half as much, and its error has a rigorous bound (rounding each factor to bfloat16
moves a product by at most 2u + u^2 of its size, u = 2^-8; float32 accumulation and the rounding of the
result add the rest; Cauchy-Schwarz bounds the sums by norms, ``ErrorBound``). So:

1. The screen P~ (B, d_sae), with W's columns sorted by norm and cut into ``BUCKETS`` ranges: an entry's bound
   grows with its column's norm, and the encoder's column norms spread as the SAE trains (``bench/README.md``,
   "End to end"), so each range gets the bound of its own largest column.
2. Each range's groups of ``GROUP`` strided columns: the k-th largest lower bound lo(g) of a group maximum g,
   over all groups, is a value that k distinct entries reach exactly (the row's ``low``).
3. Every entry whose exact value can reach ``low`` has hi(P~) >= low: those are the candidates, a few k per row.
   Every other entry lies strictly below k entries, so it is not in the top k.
4. The candidates get their float32 values (x_b . w_j + b_j, a sampled product) and the top k of those is the
   row's top k: the same entries and values as the float32 product's, up to float summation order.

Nothing approximate leaves this module: non-finite inputs take the plain float32 path, and so do rows with more
than ``MAX_CANDIDATES`` k candidates (entries closer together than the bound), one by one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .sparse_grad import sparse_csr

MAX_CANDIDATES = 8  # per row, in units of k: beyond, the row's dense product and top-k cost less
GROUP = 8  # strided columns per group: the k-th largest of the d_sae / 8 group maxima sets each row's threshold
BUCKETS = 8  # ranges of columns sorted by norm, each with its own error bound
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_FP32 = 2.0**-24
TINY = 2.0**-126  # bfloat16 and float32 flush subnormal products to zero in the dot-product instructions
# |P~ - P_acc| <= OUTPUT_ROUNDING |P~| (+ U_BF16 |b| in E): the product rounded to bfloat16 once, or twice where
# the library rounds it before adding the bias. The bounds below are float32 sums of a few terms themselves:
# ROUNDING_SLACK of their size covers that (each term is inflated by it, and |P~|'s coefficient with it).
OUTPUT_ROUNDING = 2 * U_BF16 / (1 - U_BF16) * (1 + U_BF16)
ROUNDING_SLACK = 16 * U_FP32
SCREEN_ROUNDING = OUTPUT_ROUNDING + ROUNDING_SLACK  # |P~|'s coefficient in lo(P~) and hi(P~)


def _norm_slack(d_in: int) -> float:
    """Relative error of a float32 norm over d_in terms, which the bounds below are built from."""
    return 1 + 4 * d_in * U_FP32


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


def screened_topk(x: Tensor, W: Tensor, bias: Tensor, k: int, buckets: int = BUCKETS) -> tuple[Tensor, Tensor]:
    """x (B, d_in), W (d_in, d_sae), bias (d_sae,), all float32 on CPU, no autograd.

    Returns values (B, k) float32 and indices (B, k) of the k largest entries of each row of x @ W + bias, in no
    particular order. The bound grows with ||x_b||, so centre x first where a bias carries its mean (TopK passes
    x - b_dec and b_enc)."""
    if not bool(torch.isfinite(x.sum()) & torch.isfinite(W.sum()) & torch.isfinite(bias.sum())):
        return torch.addmm(bias, x, W).topk(k, dim=-1, sorted=False)
    screen = Screen(x, W, bias, buckets)
    flat, rows, counts = screen.candidates(k)
    # A row with many candidates (entries closer together than the bound) costs less as a dense row.
    dense = counts > MAX_CANDIDATES * k
    dense_rows = dense.nonzero().squeeze(1)
    if dense_rows.numel():
        light = ~dense[rows]
        flat, rows, counts = flat[light], rows[light], counts.masked_fill(dense, 0)
    values, indices = screen.exact_topk(flat, rows, counts, k)
    if dense_rows.numel():
        values[dense_rows], indices[dense_rows] = torch.addmm(bias, x[dense_rows], W).topk(k, dim=-1, sorted=False)
    return values, indices


class ErrorBound(NamedTuple):
    """|P_acc - P| <= row_norm[b] * column_norm[j] + row_error[b] * column_error[j] + rest for entry (b, j),
    P_acc the float32 accumulator before rounding.

    With x~ = x + dx and w~ = w + dw the bfloat16 factors, |x~ . w~ - x . w| <= ||dx|| ||w|| + ||x~|| ||dw||
    (Cauchy-Schwarz), from the rounding errors actually made: about 2.5x tighter than the worst case
    2u ||x|| ||w||, so fewer candidates. The float32 accumulation adds gamma_(d+1) sum |x~ w~| + |b~|."""

    row_norm: Tensor  # (B,) multiplies ||w_j||
    row_error: Tensor  # (B,) multiplies ||dw_j||
    rest: float  # the bias's and the flushed subnormals' share, the same for every entry

    @classmethod
    def of(cls, x: Tensor, x_bf16: Tensor, column_norm_max: float, bias_max: float) -> ErrorBound:
        d_in = x.shape[1]
        gamma = (d_in + 1) * U_FP32 / (1 - (d_in + 1) * U_FP32)
        slack = _norm_slack(d_in) * (1 + ROUNDING_SLACK)
        dx = (x - x_bf16.float()).norm(dim=1) * slack
        x_tilde = x.norm(dim=1) * slack + dx
        accumulation = gamma * bias_max * (1 + U_BF16)
        rounded_before_bias = U_BF16 * (1 + U_BF16) * bias_max
        rest = accumulation + U_BF16 * bias_max + rounded_before_bias + (d_in + 1) * TINY * max(column_norm_max, 1.0)
        return cls(dx + gamma * x_tilde, x_tilde * (1 + gamma), rest * (1 + ROUNDING_SLACK))

    def over(self, column_norm: Tensor, column_error: Tensor) -> Tensor:
        """(B, n): the bound for columns of the given norms (n,) and rounding-error norms (n,)."""
        return (self.row_norm[:, None] * column_norm).addcmul_(self.row_error[:, None], column_error).add_(self.rest)


class Screen:
    """The bfloat16 product with W's columns laid out by norm, and each range's error bound.

    Group g holds the columns of norm ranks 8g .. 8g + 7 at positions g + j * groups (j < GROUP), so that the
    strided group maxima are one reduction over a (B, GROUP, groups) view, and range q is groups
    [q * groups / buckets, (q + 1) * groups / buckets): a contiguous slice of each of the GROUP strides."""

    def __init__(self, x: Tensor, W: Tensor, bias: Tensor, buckets: int) -> None:
        d_in, d_sae = W.shape
        self.groups = d_sae // GROUP
        self.buckets = max(b for b in range(1, min(buckets, self.groups) + 1) if self.groups % b == 0)
        column_norm = W.norm(dim=0)
        by_norm = column_norm.argsort()
        self.columns = by_norm.view(self.groups, GROUP).T.flatten()  # (d_sae,) position -> column of W
        self.x, self.bias = x, bias[self.columns]
        # W's laid-out columns as rows: the sampled product of the candidates reads whole columns, and the screen
        # reads them transposed (as fast as the plain layout).
        self.W_t = W.T[self.columns]
        W_t_bf16 = self.W_t.bfloat16()
        x_bf16 = x.bfloat16()
        self.P = torch.addmm(self.bias.bfloat16(), x_bf16, W_t_bf16.T)
        slack = _norm_slack(d_in)
        # Each range's largest column norm and rounding-error norm, (buckets,) each.
        range_norm = (column_norm[by_norm].view(self.buckets, -1).amax(dim=1)) * slack
        column_error = (self.W_t - W_t_bf16.float()).norm(dim=1) * slack
        range_error = column_error.view(GROUP, self.buckets, -1).amax(dim=(0, 2))
        error = ErrorBound.of(x, x_bf16, float(column_norm.max()), float(bias.abs().max()))
        self.E = error.over(range_norm, range_error)  # (B, buckets)

    def lower_bounds(self, k: int) -> Tensor:
        """(B,) a value that the k-th largest exact entry of each row reaches: the k-th largest lo(group maximum)."""
        batch = self.P.shape[0]
        g = self.P.view(batch, GROUP, self.groups).amax(dim=1).float().view(batch, self.buckets, -1)
        lo = (g - SCREEN_ROUNDING * g.abs()).sub_(self.E[:, :, None]).view(batch, -1).numpy()
        return torch.from_numpy(np.partition(lo, self.groups - k, axis=1)[:, self.groups - k])

    def candidates(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The entries whose exact value may reach the row's lower bound: flat positions in the screen (nnz,) in row
        order, their rows (nnz,), and how many each row has (B,): at least k."""
        batch, d_sae = self.P.shape
        u = SCREEN_ROUNDING
        # Invert hi(p) = p + u |p| + E (increasing): the smallest screened value whose entry can reach low.
        shifted = self.lower_bounds(k)[:, None] - self.E
        threshold = torch.where(shifted >= 0, shifted / (1 + u), shifted / (1 - u))
        # Rounded down to bfloat16, so that the comparison in bfloat16 keeps every such entry.
        threshold = (threshold - U_BF16 * threshold.abs() - TINY).bfloat16()
        ranges = self.P.view(batch, GROUP, self.buckets, self.groups // self.buckets)
        flat = torch.from_numpy(np.flatnonzero(_at_least(ranges, threshold[:, None, :, None])))
        rows = torch.div(flat, d_sae, rounding_mode="floor")
        return flat, rows, torch.bincount(rows, minlength=batch)

    def exact_topk(self, flat: Tensor, rows: Tensor, counts: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The top k of each row among its candidates, by their float32 values (rows without any: -inf), as
        values (B, k) and indices (B, k) in W's own column order."""
        x = self.x
        batch, d_sae = self.P.shape
        crow = torch.zeros(batch + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=crow[1:])
        positions = flat - rows * d_sae
        pattern = sparse_csr(crow, positions, torch.ones(positions.numel(), dtype=x.dtype), (batch, d_sae))
        exact = torch.sparse.sampled_addmm(pattern, x, self.W_t.T, beta=0.0).values() + self.bias[positions]
        width = max(int(counts.max()), k)
        slot = torch.arange(positions.numel()) - crow[rows]
        padded = torch.full((batch, width), -math.inf, dtype=x.dtype).index_put_((rows, slot), exact)
        padded_columns = torch.zeros((batch, width), dtype=torch.long).index_put_((rows, slot), self.columns[positions])
        values, picked = padded.topk(k, dim=-1, sorted=False)
        return values, padded_columns.gather(1, picked)


def _at_least(screen: Tensor, threshold: Tensor) -> np.ndarray:
    """screen >= threshold, both bfloat16 and broadcast against each other, as a numpy bool array."""
    if bool((threshold > 0).all()):
        # Positive bfloat16 numbers order like their bits read as int16, and every negative one reads negative;
        # numpy's int16 comparison is 2-3x faster than torch's bfloat16 one.
        return screen.view(torch.int16).numpy() >= threshold.view(torch.int16).numpy()
    return (screen >= threshold).numpy()
