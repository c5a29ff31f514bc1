"""The bfloat16 screen of TopK's selection (sae/nn/screen.py) finds exactly the float32 top k."""

from __future__ import annotations

import pytest
import torch

from sae.nn import build_sae
from sae.nn.screen import screenable, screened_topk


def plain_topk(x, W, bias, k):
    return torch.addmm(bias, x, W).topk(k, dim=-1, sorted=False)


def assert_same_selection(found, expected):
    values, indices = found
    torch.testing.assert_close(values.sort(dim=-1).values, expected.values.sort(dim=-1).values,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(indices.sort(dim=-1).values, expected.indices.sort(dim=-1).values)


@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (1e-3, 0.0), (30.0, 0.0), (1.0, -8.0)])
def test_screened_topk__finds_the_float32_top_k(scale, shift):
    """Random products at several scales, and rows whose k-th largest entry is negative."""
    torch.manual_seed(0)
    x = torch.randn(300, 48) * scale
    W = torch.randn(48, 512) / 48**0.5
    bias = torch.randn(512) * 0.1 * scale + shift * scale
    values, indices, screen = screened_topk(x, W, bias, 16)
    assert screen.dtype == torch.bfloat16 and screen.shape == (300, 512)
    assert_same_selection((values, indices), plain_topk(x, W, bias, 16))


def test_screened_topk__separates_entries_that_bfloat16_cannot():
    """Columns that differ by 1e-5 of their size look equal in bfloat16 (8 significant bits); float32 tells
    them apart, and so must the screened selection."""
    torch.manual_seed(1)
    x = torch.randn(200, 32)
    base = torch.randn(32, 64)
    W = torch.cat([base * (1 + 1e-5 * i) for i in range(8)], dim=1)  # (32, 512): 8 near-copies of each column
    bias = torch.zeros(512)
    values, indices, screen = screened_topk(x, W, bias, 12)
    assert_same_selection((values, indices), plain_topk(x, W, bias, 12))


def test_screened_topk__non_finite_inputs_take_the_float32_path():
    torch.manual_seed(2)
    x, W, bias = torch.randn(40, 16), torch.randn(16, 256), torch.zeros(256)
    x[3, 0] = float("nan")
    x[5, 1] = float("inf")
    values, indices, _ = screened_topk(x, W, bias, 8)
    expected = plain_topk(x, W, bias, 8)
    assert torch.equal(values.isnan(), expected.values.isnan())
    fine = torch.ones(40, dtype=torch.bool)
    fine[[3, 5]] = False
    assert_same_selection((values[fine], indices[fine]), type(expected)((expected.values[fine], expected.indices[fine])))


def test_screenable__needs_float32_cpu_rows_with_enough_groups():
    x = torch.randn(4, 8)
    assert screenable(x, torch.randn(8, 256), 16)
    assert not screenable(x, torch.randn(8, 255), 16)  # columns not in groups of 8
    assert not screenable(x, torch.randn(8, 64), 16)  # 8 groups for a top 16
    assert not screenable(x.double(), torch.randn(8, 256).double(), 16)


def test_topk_family__screens_when_asked_and_its_rows_have_enough_groups():
    x = torch.randn(4, 8)
    assert build_sae("topk", 8, d_sae=256, k=4, bf16_screen=True).uses_screen(x)
    assert not build_sae("topk", 8, d_sae=256, k=4, bf16_screen=False).uses_screen(x)
    # BatchTopK screens each row's 4k candidates: 16 of 256 fit (32 groups), 64 of 256 do not.
    assert build_sae("batchtopk", 8, d_sae=256, k=4, bf16_screen=True).uses_screen(x)
    assert not build_sae("batchtopk", 8, d_sae=256, k=16, bf16_screen=True).uses_screen(x)


def test_screened_topk__rows_with_too_many_candidates_take_the_dense_path():
    """Every column has the same first weight, so rows along e_0 give all entries the same value up to a bias
    spread far below the bound: every entry is a candidate, and those rows are computed densely. The result is
    still the float32 top k, for them and for the ordinary rows around them."""
    torch.manual_seed(3)
    W = torch.randn(32, 512)
    W[0] = 1.0
    x = torch.randn(64, 32)
    x[::4] = 0
    x[::4, 0] = 5.0
    bias = torch.randn(512) * 1e-3
    from sae.nn import screen

    x_bf16, W_bf16 = x.bfloat16(), W.bfloat16()
    found = torch.addmm(bias.bfloat16(), x_bf16, W_bf16)
    error = screen._error_bounds(x, W, bias, x_bf16, W_bf16)
    counts = screen._candidates(found, screen._lower_bounds(found, error, 8), error)[2]
    assert (counts[::4] > screen.MAX_CANDIDATES * 8).all() and (counts[1::4] <= screen.MAX_CANDIDATES * 8).all()
    values, indices, _ = screened_topk(x, W, bias, 8)
    assert_same_selection((values, indices), plain_topk(x, W, bias, 8))
