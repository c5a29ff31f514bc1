"""Shared input handling for the metrics."""

from torch import Tensor


def rows(t: Tensor) -> Tensor:
    """Flatten all leading dims into vectors: (..., d) -> (N, d).

    Activations may arrive per image (B, d) or per spatial position (B, H, W, d);
    every metric here counts vectors, so both reduce to rows of a matrix.
    """
    return t.reshape(-1, t.shape[-1])
