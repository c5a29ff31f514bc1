"""The bfloat16 screen of TopK's selection (sae/nn/screen.py) finds exactly the float32 top k."""

from __future__ import annotations

import pytest
import torch

from sae.nn import build_sae
from sae.nn.screen import BUCKETS, MAX_CANDIDATES, Screen, screenable, screened_topk


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
    assert_same_selection(screened_topk(x, W, bias, 16), plain_topk(x, W, bias, 16))


def test_screened_topk__separates_entries_that_bfloat16_cannot():
    """Columns that differ by 1e-5 of their size look equal in bfloat16 (8 significant bits); float32 tells
    them apart, and so must the screened selection."""
    torch.manual_seed(1)
    x = torch.randn(200, 32)
    base = torch.randn(32, 64)
    W = torch.cat([base * (1 + 1e-5 * i) for i in range(8)], dim=1)  # (32, 512): 8 near-copies of each column
    bias = torch.zeros(512)
    assert_same_selection(screened_topk(x, W, bias, 12), plain_topk(x, W, bias, 12))


def test_screened_topk__non_finite_inputs_take_the_float32_path():
    torch.manual_seed(2)
    x, W, bias = torch.randn(40, 16), torch.randn(16, 256), torch.zeros(256)
    x[3, 0] = float("nan")
    x[5, 1] = float("inf")
    values, indices = screened_topk(x, W, bias, 8)
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
    counts = Screen(x, W, bias, BUCKETS).candidates(8)[2]
    assert (counts[::4] > MAX_CANDIDATES * 8).all() and (counts[1::4] <= MAX_CANDIDATES * 8).all()
    assert_same_selection(screened_topk(x, W, bias, 8), plain_topk(x, W, bias, 8))


@pytest.mark.parametrize(("d_sae", "buckets"), [(1024, 1), (1024, 2), (1024, BUCKETS), (1000, BUCKETS)])
def test_screened_topk__finds_the_top_k_among_columns_of_very_different_norms(d_sae, buckets):
    """Column norms spread over 100x (a trained encoder's: 3x): one range of norms, two, the default, and 5 ranges
    where 125 groups do not split into 8, still give the float32 top k."""
    torch.manual_seed(4)
    x = torch.randn(256, 48)
    W = torch.randn(48, d_sae) * torch.logspace(-1, 1, d_sae)[torch.randperm(d_sae)]
    bias = torch.randn(d_sae) * 0.1
    assert Screen(x, W, bias, buckets).buckets == (5 if d_sae == 1000 else buckets)
    assert_same_selection(screened_topk(x, W, bias, 16, buckets=buckets), plain_topk(x, W, bias, 16))


def test_screen__bounds_each_range_of_column_norms_by_its_own_largest_column():
    """Columns of norms 1-3, the larger ones with a more negative bias (latents that fire rarely): the top k sits
    mostly in the smaller columns, whose own bound is tighter than the largest column's. Per-range bounds keep
    fewer candidates than one bound for the whole row, and every entry of the float32 top k among them."""
    torch.manual_seed(5)
    x = torch.randn(256, 480)
    norms = torch.linspace(1, 3, 3840)[torch.randperm(3840)]
    W = torch.randn(480, 3840) / 480**0.5 * norms
    bias = -(norms - 1) * 0.2 * x.norm(dim=1).mean()
    one, bucketed = Screen(x, W, bias, 1), Screen(x, W, bias, BUCKETS)
    assert bucketed.candidates(32)[2].sum() < 0.8 * one.candidates(32)[2].sum()
    flat, rows, _ = bucketed.candidates(32)
    found = torch.zeros(256, 3840, dtype=torch.bool)
    found[rows, bucketed.columns[flat - rows * 3840]] = True
    assert found.gather(1, plain_topk(x, W, bias, 32).indices).all()
    assert_same_selection(screened_topk(x, W, bias, 32), plain_topk(x, W, bias, 32))
