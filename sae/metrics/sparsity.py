"""Sparsity of SAE features: L0, firing frequency, dense and dead features.

A feature "fires" on a vector where its activation f > 0. Every accumulated
state is a sum (``dist_reduce_fx="sum"``), so under DDP ``compute()`` returns the
value on the concatenation of all ranks' data. Counts are int64, so they are
exact far beyond the 2^24 where float32 stops counting by ones.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from sae.metrics._rows import rows


def fire_counts(f: Tensor, active: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """(d_sae,) int32: on how many of the vectors f (..., d_sae) each feature is > 0.

    ``active`` = (values (B, K), indices (B, K)), f's non-zero entries where the SAE selects them
    (``SAEOutput.active``): then only those are read. An index repeats within a row only with value 0."""
    if active is None:
        # int32 partial sums: summing a bool tensor in int64 is ~1.7x slower on CPU, and one batch's count fits.
        return (rows(f) > 0).sum(0, dtype=torch.int32)
    values, indices = active
    fired = indices[values > 0]
    return torch.bincount(fired, minlength=f.shape[-1]).to(torch.int32)


def dense_fraction(freq: Tensor, threshold: float = 0.1) -> Tensor:
    """Fraction of features firing on more than ``threshold`` of vectors.

    freq: (d_sae,) firing frequencies in [0, 1]. Returns a scalar float32.
    """
    return (freq > threshold).float().mean()


def log10_density(freq: Tensor, eps: float = 1e-10) -> Tensor:
    """log10(freq + eps), (d_sae,) -> (d_sae,); eps keeps dead features finite."""
    return torch.log10(freq + eps)


class FeatureFiring(Metric):
    """Per-feature firing frequency, ``freq_i = |{n: f_ni > 0}| / N``.

    update(f): f (..., d_sae). compute() -> (d_sae,) float32.
    ``freq.sum()`` is L0 over the same vectors and ``dense_fraction(freq)`` the dense fraction.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, d_sae: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.d_sae = d_sae
        self.add_state("fire_count", torch.zeros(d_sae, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n_vectors", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, f: Tensor, counts: Tensor | None = None) -> None:
        """f (..., d_sae); counts: its ``fire_counts``, when the caller has them already."""
        self.fire_count += fire_counts(f) if counts is None else counts
        self.n_vectors += rows(f).shape[0]

    def compute(self) -> Tensor:
        return (self.fire_count / self.n_vectors).float()


class DeadFraction(Metric):
    """Fraction of features that fired on none of the last ``window`` vectors.

    The definition of Gao et al. 2024, "Scaling and evaluating sparse
    autoencoders" (TopK SAEs), which counts a latent dead after 10M tokens
    without firing.

    State, in two parts:

    * Accumulation since the last ``compute()`` (``fire_count`` (d_sae,),
      ``n_vectors``): ordinary torchmetrics states, summed across ranks and
      cleared by ``reset()``.
    * A rolling counter ``vectors_since_fired`` (d_sae,) int64 and the total
      ``n_seen`` ever folded into it: registered as persistent buffers, so they
      are in ``state_dict()`` (hence in Lightning checkpoints), move with
      ``.to(device)`` and survive ``reset()``. Each ``compute()`` folds the
      *synced* accumulation into them, so every DDP rank holds the same counter.

    A feature is dead when ``vectors_since_fired >= window``. Until ``window``
    vectors have been seen (``saturated`` is False) the threshold is ``n_seen``
    instead, i.e. the result is the fraction of features that have never fired.

    Resolution is one ``compute()`` interval: a feature that fired anywhere in
    an interval counts as having fired at its end, so call ``compute()`` every
    K << window vectors. Vectors passed to ``update()`` and then dropped by
    ``reset()`` without a ``compute()`` are never counted.

    ``forward()`` is not supported: torchmetrics' forward resets and computes on
    the batch alone, which would fold each batch twice.

    update(f): f (..., d_sae). compute() -> scalar float32.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, d_sae: int, window: int = 10_000_000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.d_sae, self.window = d_sae, window
        self.add_state("fire_count", torch.zeros(d_sae, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n_vectors", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.register_buffer("vectors_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("n_seen", torch.zeros((), dtype=torch.int64))
        # Synced accumulation already folded. The states themselves cannot be
        # cleared inside compute(): torchmetrics restores each rank's local
        # values after syncing, so we fold only the growth since this mark.
        self.register_buffer("fire_count_folded", torch.zeros(d_sae, dtype=torch.int64), persistent=False)
        self.register_buffer("n_vectors_folded", torch.zeros((), dtype=torch.int64), persistent=False)

    @property
    def saturated(self) -> bool:
        """Whether ``window`` vectors have been seen (reads one scalar from the device)."""
        return bool(self.n_seen >= self.window)

    def update(self, f: Tensor, counts: Tensor | None = None) -> None:
        """f (..., d_sae); counts: its ``fire_counts``, when the caller has them already."""
        self.fire_count += fire_counts(f) if counts is None else counts
        self.n_vectors += rows(f).shape[0]

    def _fold(self) -> None:
        """Advance the rolling counter by the (synced) vectors since the last fold."""
        n_new = self.n_vectors - self.n_vectors_folded
        fired = self.fire_count > self.fire_count_folded
        self.vectors_since_fired.copy_(torch.where(fired, 0, self.vectors_since_fired + n_new))
        self.n_seen += n_new
        self.fire_count_folded.copy_(self.fire_count)
        self.n_vectors_folded.copy_(self.n_vectors)

    def compute(self) -> Tensor:
        self._fold()
        threshold = self.n_seen.clamp(max=self.window)
        return (self.vectors_since_fired >= threshold).float().mean()

    def reset(self) -> None:
        """Clear the accumulation since the last compute; keep the rolling counter."""
        super().reset()
        self.fire_count_folded.zero_()
        self.n_vectors_folded.zero_()

    def forward(self, *args, **kwargs):
        raise NotImplementedError("DeadFraction has no per-batch value: call update() and compute().")
