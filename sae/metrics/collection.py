"""All SAE training metrics behind one ``update(x, x_hat, f)``."""

from __future__ import annotations

from torch import Tensor, nn

from sae.metrics.reconstruction import ReconstructionError
from sae.metrics.sparsity import DeadFraction, FeatureFiring, dense_fraction


class SparsityMetrics(nn.Module):
    """MSE, explained variance, FVU, L0, dead and dense fractions of an SAE.

    A small wrapper rather than a ``MetricCollection``: the metrics take
    different arguments, and several share sufficient statistics, so it keeps
    three metrics and derives the rest, which means fewer states to sync:

    * ``reconstruction`` (:class:`ReconstructionError`) -> mse, explained_variance, fvu
    * ``firing`` (:class:`FeatureFiring`) -> feature frequency, and from it
      l0 = sum_i freq_i and dense_fraction = mean_i [freq_i > dense_threshold]
    * ``dead`` (:class:`DeadFraction`) -> dead_fraction, rolling over ``dead_window``

    Each value equals that of the standalone metric of the same name. Being an
    ``nn.Module``, it moves with its LightningModule, and the dead-feature
    counter lands in the checkpoint (see :class:`DeadFraction`).

    update(x, x_hat, f): x, x_hat (..., d_in), f (..., d_sae); no host sync.
    compute() -> dict of float32 scalars with keys exactly
    ``mse, explained_variance, fvu, l0, dead_fraction, dense_fraction``.
    feature_frequency() -> (d_sae,) float32, for a histogram.
    Under DDP, compute() and feature_frequency() are collective: call them on every rank.
    """

    KEYS = ("mse", "explained_variance", "fvu", "l0", "dead_fraction", "dense_fraction")

    def __init__(
        self,
        d_sae: int,
        dead_window: int = 10_000_000,
        d_in: int | None = None,
        dense_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        self.dense_threshold = dense_threshold
        self.reconstruction = ReconstructionError(d_in)
        self.firing = FeatureFiring(d_sae)
        self.dead = DeadFraction(d_sae, window=dead_window)

    def update(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        self.reconstruction.update(x, x_hat)
        self.firing.update(f)
        self.dead.update(f)

    def feature_frequency(self) -> Tensor:
        """(d_sae,) firing frequency since the last reset (cached after compute())."""
        return self.firing.compute()

    def compute(self) -> dict[str, Tensor]:
        out = dict(self.reconstruction.compute())
        freq = self.feature_frequency()
        out["l0"] = freq.double().sum().float()
        out["dead_fraction"] = self.dead.compute()
        out["dense_fraction"] = dense_fraction(freq, self.dense_threshold)
        return {k: out[k] for k in self.KEYS}

    def reset(self) -> None:
        """Start a new accumulation; the dead-feature counter carries over."""
        for metric in (self.reconstruction, self.firing, self.dead):
            metric.reset()
