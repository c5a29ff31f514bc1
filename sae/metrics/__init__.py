"""torchmetrics metrics for SAE training whose DDP reduction is exact.

Every state is a sum over vectors, so a value computed under DDP equals the value
on all ranks' data concatenated. Inputs: x, x_hat (..., d_in), f (..., d_sae);
a feature fires where f > 0.
"""

from sae.metrics.collection import SparsityMetrics
from sae.metrics.plots import density_histogram_figure
from sae.metrics.reconstruction import ReconstructionError
from sae.metrics.sparsity import DeadFraction, FeatureFiring, dense_fraction, fire_counts, log10_density

__all__ = [
    "DeadFraction",
    "FeatureFiring",
    "ReconstructionError",
    "SparsityMetrics",
    "dense_fraction",
    "fire_counts",
    "density_histogram_figure",
    "log10_density",
]
