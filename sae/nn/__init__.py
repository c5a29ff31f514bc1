"""Sparse autoencoders in plain PyTorch (torch, safetensors and the standard library only).

    from sae.nn import build_sae, load_sae
    sae = build_sae("topk", d_in=512, expansion=16, k=32)
    out = sae(x)                                   # SAEOutput(x_hat, f, pre_acts)
    losses = sae.loss(x, out)                      # SAELoss(loss, mse, sparsity, aux)
"""

from .base import (
    ARCHITECTURES,
    SAEConfigError,
    SAELoss,
    SAEOutput,
    SparseAutoencoder,
    build_sae,
    register_architecture,
)
from .batchtopk import BatchTopKSAE
from .init import geometric_median
from .io import atomic_save_torch, atomic_write_bytes, load_sae, save_sae
from .jumprelu import JumpReLUSAE
from .relu import ReLUSAE
from .topk import TopKSAE

__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAEConfigError",
    "SAELoss",
    "SAEOutput",
    "SparseAutoencoder",
    "TopKSAE",
    "atomic_save_torch",
    "atomic_write_bytes",
    "build_sae",
    "geometric_median",
    "load_sae",
    "register_architecture",
    "save_sae",
]
