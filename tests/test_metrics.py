"""Behaviour of sae.metrics: values by hand, accumulation, rolling dead window, DDP."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae.metrics import (
    DeadFraction,
    FeatureFiring,
    ReconstructionError,
    SparsityMetrics,
    dense_fraction,
    density_histogram_figure,
    log10_density,
)

# Tiny batch used for the by-hand values below.
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
X_HAT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
F = torch.tensor(
    [
        [0.0, 2.0, 0.0, 0.0],  # fires: feature 1          -> 1 active
        [1.0, 0.0, 0.0, 0.0],  # fires: feature 0          -> 1 active
        [3.0, 0.0, -1.0, 0.5],  # fires: 0 and 3 (-1 is off) -> 2 active
    ]
)


def assert_close(actual, expected, **kw):
    if isinstance(expected, dict):  # ReconstructionError's {mse, explained_variance, fvu}
        assert actual.keys() == expected.keys()
        actual, expected = list(actual.values()), list(expected.values())
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), **kw)


# ---------------------------------------------------------------- by hand


def test_reconstruction_error_by_hand():
    # x - x_hat = [[0,0],[0,0],[0,1]] -> sum of squares 1 over 3*2 = 6 elements: mse 1/6.
    # mean(x) = (2/3, 2/3). dim 0 values 1,0,1: deviations 1/3,-2/3,1/3 -> squares 1/9+4/9+1/9 = 2/3; dim 1
    # likewise. total variance = 4/3, fvu = 1 / (4/3) = 3/4, explained variance = 1/4.
    both = ReconstructionError(d_in=2)
    both.update(X, X_HAT)
    assert_close(torch.stack(list(both.compute().values())), [1 / 6, 0.25, 0.75])
    assert list(both.compute()) == ["mse", "explained_variance", "fvu"]


def test_explained_variance_centres_on_the_mean_of_all_vectors():
    # Two batches, each constant: per-batch variance is 0, but over both the mean is 1
    # and every vector deviates by 1 in its single dim: total variance = 4 * 1 = 4.
    # x_hat = 1 everywhere -> sse = 4 -> fvu = 1, explained variance = 0.
    ev = ReconstructionError()
    ev.update(torch.zeros(2, 1), torch.ones(2, 1))
    ev.update(torch.full((2, 1), 2.0), torch.ones(2, 1))
    assert_close(ev.compute()["explained_variance"], 0.0)


def test_reconstruction_error__stays_exact_for_inputs_far_from_zero():
    # Activations with a large common offset: the variance is a tiny difference of large sums, so the batch
    # moments are taken about each batch's mean. Reference: the same statistics in float64 from scratch.
    g = torch.Generator().manual_seed(0)
    xs = [1000.0 + torch.randn(512, 48, generator=g) for _ in range(3)]
    errors = [0.1 * torch.randn(512, 48, generator=g) for _ in range(3)]
    metric = ReconstructionError(d_in=48)
    for x, error in zip(xs, errors):
        metric.update(x, x + error)
    x = torch.cat(xs).double()
    fvu = torch.cat(errors).double().square().sum() / (x - x.mean(0)).square().sum()
    assert_close(metric.compute()["fvu"], fvu, rtol=1e-5, atol=0)


def test_feature_firing_by_hand():
    # Fire counts per feature over 3 vectors: [2, 1, 0, 1] -> frequency [2/3, 1/3, 0, 1/3].
    firing = FeatureFiring(4)
    firing.update(F)
    freq = firing.compute()
    assert freq.shape == (4,)
    assert_close(freq, [2 / 3, 1 / 3, 0.0, 1 / 3])
    # The frequencies sum to L0: active features per row 1, 1, 2 -> mean 4/3.
    assert_close(freq.sum(), 4 / 3)


def test_dense_fraction_by_hand():
    # freq = [2/3, 1/3, 0, 1/3]: above 0.1 -> 3 of 4; above 0.5 -> 1 of 4.
    freq = torch.tensor([2 / 3, 1 / 3, 0.0, 1 / 3])
    for threshold, expected in ((0.1, 0.75), (0.5, 0.25)):
        assert_close(dense_fraction(freq, threshold), expected)


def test_log10_density():
    # log10(1) = 0, log10(0.01) = -2, a dead feature lands at log10(eps).
    out = log10_density(torch.tensor([1.0, 0.01, 0.0], dtype=torch.float64))
    assert_close(out, [0.0, -2.0, -10.0])
    assert_close(log10_density(torch.tensor([0.0]), eps=1e-6), [-6.0])


def test_dead_fraction_before_window_counts_features_never_fired():
    # 3 vectors < window 10: feature 2 never fired -> 1 of 4 dead, not yet saturated.
    dead = DeadFraction(4, window=10)
    dead.update(F)
    assert_close(dead.compute(), 0.25)
    assert not dead.saturated


def test_sparsity_metrics_by_hand():
    metrics = SparsityMetrics(d_sae=4, dead_window=10)
    metrics.update(X, X_HAT, F)
    values = metrics.compute()
    assert list(values) == ["mse", "explained_variance", "fvu", "l0", "dead_fraction", "dense_fraction"]
    assert all(v.shape == () for v in values.values())
    expected = [1 / 6, 0.25, 0.75, 4 / 3, 0.25, 0.75]  # from the tests above
    assert_close(torch.stack(list(values.values())), expected)
    assert_close(metrics.feature_frequency(), [2 / 3, 1 / 3, 0.0, 1 / 3])


# ---------------------------------------------------------------- accumulation


def _random_batch(n, seed, d_in=5, d_sae=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) + seed  # batches differ in mean
    x_hat = x + 0.3 * torch.randn(n, d_in, generator=g)
    f = torch.relu(torch.randn(n, d_sae, generator=g) - 0.5)
    return x, x_hat, f


FACTORIES = {
    "reconstruction": (ReconstructionError, "xx"),
    "feature_frequency": (lambda: FeatureFiring(7), "f"),
    "dead_fraction": (lambda: DeadFraction(7, window=100), "f"),
}


def _feed(metric, kind, x, x_hat, f):
    metric.update(*((x, x_hat) if kind == "xx" else (f,)))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_several_updates_equal_one_update_on_the_concatenation(name):
    factory, kind = FACTORIES[name]
    batches = [_random_batch(n, seed) for n, seed in ((4, 0), (9, 1), (2, 2))]
    split, whole = factory(), factory()
    for batch in batches:
        _feed(split, kind, *batch)
    _feed(whole, kind, *(torch.cat(parts) for parts in zip(*batches)))
    assert_close(split.compute(), whole.compute())


def test_leading_dims_are_flattened_into_vectors():
    # (B, H, W, d) activations count as B*H*W vectors.
    x, x_hat, f = _random_batch(12, seed=3)
    grid, flat = SparsityMetrics(7, dead_window=5), SparsityMetrics(7, dead_window=5)
    grid.update(x.view(2, 3, 2, 5), x_hat.view(2, 3, 2, 5), f.view(2, 3, 2, 7))
    flat.update(x, x_hat, f)
    for key, value in flat.compute().items():
        assert_close(grid.compute()[key], value)


def test_lazy_and_declared_width_agree():
    x, x_hat, _ = _random_batch(10, seed=4)
    lazy, declared = ReconstructionError(), ReconstructionError(d_in=5)
    for metric in (lazy, declared):
        metric.update(x[:6], x_hat[:6])
        metric.update(x[6:], x_hat[6:])
    for key, value in declared.compute().items():
        assert_close(lazy.compute()[key], value)


def test_update_never_reads_back_to_host():
    # Meta tensors have shapes but no data: .item(), .cpu() or any data-dependent
    # branch in update() would raise, so this proves update() stays on device.
    metrics = SparsityMetrics(7, dead_window=10).to("meta")
    x, x_hat, f = (t.to("meta") for t in _random_batch(4, seed=5))
    metrics.update(x, x_hat, f)
    metrics.update(x, x_hat, f)
    assert metrics.dead.fire_count.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_on_cuda_does_not_synchronize():
    metrics = SparsityMetrics(7, dead_window=10).cuda()
    reference = SparsityMetrics(7, dead_window=10)
    batch = _random_batch(64, seed=6)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in update() raises
    try:
        metrics.update(*(t.cuda() for t in batch))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference.update(*batch)
    for key, value in reference.compute().items():
        assert_close(metrics.compute()[key].cpu(), value)


# ---------------------------------------------------------------- dead window


def _vectors(n, fires):
    """n vectors over 2 features; ``fires`` lists the features active in each."""
    f = torch.zeros(n, 2)
    f[:, list(fires)] = 1.0
    return f


def test_dead_fraction_rolling_window():
    dead = DeadFraction(2, window=10)
    # 10 vectors, feature 0 fires on all, feature 1 on none:
    # vectors_since_fired = [0, 10]; saturated; feature 1 dead -> 1/2.
    dead.update(_vectors(10, fires=[0]))
    assert_close(dead.compute(), 0.5)
    assert dead.saturated
    dead.reset()  # as Lightning does after each log: the counter must survive
    # 5 silent vectors: [5, 15]. Feature 0 fired 5 vectors ago, 5 < 10 -> alive.
    dead.update(_vectors(5, fires=[]))
    assert_close(dead.compute(), 0.5)
    assert dead.vectors_since_fired.tolist() == [5, 15]
    dead.reset()
    # 5 more: [10, 20]. 10 >= 10 -> feature 0 now dead too.
    dead.update(_vectors(5, fires=[]))
    assert_close(dead.compute(), 1.0)
    dead.reset()
    # Feature 0 fires again: [0, 21] -> revived.
    dead.update(_vectors(1, fires=[0]))
    assert_close(dead.compute(), 0.5)
    assert dead.vectors_since_fired.tolist() == [0, 21]
    assert dead.n_seen.item() == 21


def test_dead_fraction_repeated_compute_does_not_double_count():
    # Without a reset the accumulation keeps growing; only its growth is folded.
    dead = DeadFraction(2, window=10, compute_with_cache=False)
    dead.update(_vectors(3, fires=[0]))
    dead.compute()
    dead.compute()
    dead.update(_vectors(4, fires=[]))
    dead.compute()
    dead.compute()
    # 3 vectors (feature 0 fires) then 4 silent: [4, 7], 7 seen.
    assert dead.vectors_since_fired.tolist() == [4, 7]
    assert dead.n_seen.item() == 7


def test_dead_fraction_reset_drops_only_uncomputed_accumulation():
    dead = DeadFraction(2, window=10)
    dead.update(_vectors(6, fires=[0]))
    dead.compute()
    dead.update(_vectors(100, fires=[]))
    dead.reset()  # the 100 vectors were never computed: they are not counted
    assert dead.vectors_since_fired.tolist() == [0, 6]
    assert dead.n_seen.item() == 6
    assert dead.fire_count.sum().item() == 0 and dead.n_vectors.item() == 0


def test_dead_fraction_state_dict_round_trip():
    dead = DeadFraction(2, window=10)
    dead.update(_vectors(12, fires=[0]))
    dead.compute()
    dead.update(_vectors(3, fires=[]))
    dead.compute()
    state = dead.state_dict()
    assert set(state) == {"vectors_since_fired", "n_seen"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = DeadFraction(2, window=10)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.saturated
    # Continuing both with the same data gives the same answers: [0+3+7, 15+7] = [10, 22].
    for metric in (dead, restored):
        metric.reset()
        metric.update(_vectors(7, fires=[]))
        assert_close(metric.compute(), 1.0)
        assert metric.vectors_since_fired.tolist() == [10, 22]


def test_dead_fraction_has_no_forward():
    with pytest.raises(NotImplementedError):
        DeadFraction(2)(_vectors(1, fires=[0]))


def test_sparsity_metrics_checkpoint_and_reset_keep_dead_counter():
    metrics = SparsityMetrics(2, dead_window=4)
    metrics.update(torch.randn(5, 3), torch.randn(5, 3), _vectors(5, fires=[1]))
    assert_close(metrics.compute()["dead_fraction"], 0.5)
    metrics.reset()
    assert metrics.dead.vectors_since_fired.tolist() == [5, 0]
    assert set(metrics.state_dict()) == {"dead.vectors_since_fired", "dead.n_seen"}


# ---------------------------------------------------------------- figure


def test_density_histogram_figure_shows_dead_features_apart():
    freq = torch.tensor([0.0, 0.0, 0.0, 1e-4, 1e-3, 0.05, 0.5])
    fig = density_histogram_figure(freq)
    ax = fig.axes[0]
    assert type(fig.canvas).__name__ == "FigureCanvasAgg"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["alive (4)", "dead (3)"]
    dead_bar = ax.containers[-1][0]
    assert dead_bar.get_height() == 3
    assert dead_bar.get_x() + dead_bar.get_width() < -4  # left of log10(1e-4)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert png.getvalue()[:4] == b"\x89PNG"
    # All features dead still draws.
    density_histogram_figure(torch.zeros(5)).savefig(io.BytesIO(), format="png")


# ---------------------------------------------------------------- DDP


WORLD = 2
D_SAE, WINDOW = 6, 12


def _phase_batches(seed, sizes, rank):
    """Batches for one rank in one phase, with features chosen to exercise the window."""
    out = []
    for i, n in enumerate(sizes):
        x, x_hat, f = _random_batch(n, seed=100 * seed + 10 * rank + i, d_in=4, d_sae=D_SAE)
        f[:, 0] = 1.0  # always fires
        f[:, 1] = 1.0 if (seed, rank) == (0, 1) else 0.0  # only on rank 1 in phase 0
        f[:, 2] = 0.0  # never fires
        f[:, 3] = 1.0 if (seed, rank) == (2, 0) else 0.0  # only on rank 0 in phase 2
        out.append((x, x_hat, f))
    return out


# Batch sizes per phase per rank: uneven sizes and counts. Phase totals 12, 10, 7
# put the dead window (12) through saturation, then kill feature 1 in phase 2.
SIZES = [([4, 3], [5]), ([6], [2, 2]), ([3], [4])]


def _all_metrics():
    return {
        "reconstruction": ReconstructionError(),
        "feature_frequency": FeatureFiring(D_SAE),
        "dead_fraction": DeadFraction(D_SAE, window=WINDOW),
        "collection": SparsityMetrics(D_SAE, dead_window=WINDOW),
    }


def _run_phases(phases):
    """phases: per phase a list of (x, x_hat, f). Returns per phase {name: value}."""
    metrics, results = _all_metrics(), []
    for batches in phases:
        for x, x_hat, f in batches:
            for name, metric in metrics.items():
                if name == "collection":
                    metric.update(x, x_hat, f)
                else:
                    _feed(metric, "xx" if name == "reconstruction" else "f", x, x_hat, f)
        values = {name: m.compute() for name, m in metrics.items() if name != "collection"}
        values.update({f"collection.{k}": v for k, v in metrics["collection"].compute().items()})
        values["collection.feature_frequency"] = metrics["collection"].feature_frequency()
        values["vectors_since_fired"] = metrics["dead_fraction"].vectors_since_fired.clone()
        results.append(values)
        for metric in metrics.values():
            metric.reset()
    return results


def _ddp_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    if sys.platform == "linux":  # gloo binds to the hostname's address, which sandboxes may not resolve
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        phases = [_phase_batches(p, SIZES[p][rank], rank) for p in range(len(SIZES))]
        torch.save(_run_phases(phases), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_reduction_equals_single_process_on_all_data(tmp_path):
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    single = _run_phases(
        [[b for rank in range(WORLD) for b in _phase_batches(p, SIZES[p][rank], rank)] for p in range(len(SIZES))]
    )
    # Phase 2: feature 1 last fired 10 + 7 = 17 >= 12 vectors ago -> dead with feature 2.
    assert single[2]["vectors_since_fired"][:4].tolist() == [0, 17, 29, 0]
    for rank in range(WORLD):
        ranked = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for phase, (got, want) in enumerate(zip(ranked, single)):
            assert got.keys() == want.keys()
            for key in want:
                assert_close(got[key], want[key], msg=f"rank {rank}, phase {phase}, {key}")
