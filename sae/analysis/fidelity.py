"""Spliced-in fidelity: does the rest of InceptionV1 still work on the SAE's reconstruction?

The layer's activations are replaced by a substitute (the SAE reconstruction, zeros, or each channel's mean
over the held-out positions), the rest of the network runs from there (`sae.model.run_from`), and the class
distribution (softmax over lucid's 1008 logits) is compared with the original one:

    KL(p_orig || p_sub)   averaged over images,
    top-1 agreement       the fraction of images whose arg-max class is unchanged,
    fraction recovered    (KL_ablation - KL_sae) / KL_ablation, for zero- and mean-ablation.

The last is the vision analogue of the language-model SAE literature's "CE loss recovered" (e.g. Bricken et al.
2023, Gao et al. 2024): 1 means splicing the SAE in costs nothing, 0 means it is as bad as deleting the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.model import BLOCK_LAYERS, run_from
from sae.nn import SparseAutoencoder

# A map of the layer's activations (B, C, h, w) -> substitute activations of the same shape.
Substitute = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Fidelity:
    """Spliced-in fidelity over `n_images` images; KLs in nats, averaged over images."""

    kl_sae: float
    kl_zero: float
    kl_mean: float
    top1_sae: float
    top1_zero: float
    top1_mean: float
    recovered_zero: float
    recovered_mean: float
    n_images: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fidelity_unavailable_reason(layer: str, image_size: int) -> str | None:
    """Why spliced-in fidelity cannot be measured at this layer and image size, or None if it can."""
    if layer not in BLOCK_LAYERS:
        return (f"{layer!r} is inside a block: the network continues from block outputs only "
                f"({', '.join(BLOCK_LAYERS)})")
    if image_size != 224:
        return f"the classifier needs 224-px images (mixed5b at 7x7); these are {image_size} px"
    return None


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """(B, K), (B, K) -> (B,): KL(softmax(p) || softmax(q)) in nats, computed from log-probabilities."""
    log_p, log_q = F.log_softmax(logits_p.double(), dim=-1), F.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).float()


def fraction_recovered(kl_ablation: float, kl_sae: float) -> float:
    """(KL_ablation - KL_sae) / KL_ablation; NaN when the ablation itself changes nothing (KL_ablation = 0)."""
    return (kl_ablation - kl_sae) / kl_ablation if kl_ablation > 0 else float("nan")


def sae_substitute(sae: SparseAutoencoder, input_scale: float = 1.0) -> Substitute:
    """Reconstruct every position's (C,) vector: (B, C, h, w) -> (B, C, h, w) in the layer's units.

    `input_scale` is the factor the SAE's inputs were multiplied by in training (1 for an exported SAE, whose
    scale is folded into its weights); the reconstruction is divided by it again.
    """

    def substitute(acts: Tensor) -> Tensor:
        b, c, h, w = acts.shape
        x = acts.permute(0, 2, 3, 1).reshape(-1, c) * input_scale
        x_hat = sae(x.to(sae.W_dec.device)).x_hat.to(acts.device) / input_scale
        return x_hat.reshape(b, h, w, c).permute(0, 3, 1, 2)

    return substitute


def channel_mean(acts: Tensor) -> Tensor:
    """(N, C, h, w) -> (C,): each channel's mean over all images and positions (the mean-ablation value)."""
    return acts.double().mean(dim=(0, 2, 3)).float()


@torch.inference_mode()
def spliced_fidelity(
    net: nn.Module,
    layer: str,
    acts: Tensor,
    substitute: Substitute,
    mean: Tensor | None = None,
    batch_size: int = 32,
) -> Fidelity:
    """Spliced-in fidelity of `substitute` at `layer` of `net` on held-out activations.

    acts: (N, C, h, w) activations of a block layer for N images (224 px). mean: (C,) mean-ablation value,
    by default `channel_mean(acts)`. The original logits are recomputed from `acts` with the same code path,
    so any difference is due to the substitution alone.
    """
    mean = channel_mean(acts) if mean is None else mean
    sums = dict.fromkeys(("kl_sae", "kl_zero", "kl_mean", "top1_sae", "top1_zero", "top1_mean"), 0.0)
    for chunk in acts.split(batch_size):
        original = run_from(net, layer, chunk)
        spliced = {
            "sae": substitute(chunk),
            "zero": torch.zeros_like(chunk),
            "mean": mean.to(chunk).view(1, -1, 1, 1).expand_as(chunk),
        }
        for name, activations in spliced.items():
            logits = run_from(net, layer, activations)
            sums[f"kl_{name}"] += float(kl_divergence(original, logits).sum())
            sums[f"top1_{name}"] += float((logits.argmax(-1) == original.argmax(-1)).sum())
    n = acts.shape[0]
    means = {key: value / n for key, value in sums.items()}
    return Fidelity(
        **means,
        recovered_zero=fraction_recovered(means["kl_zero"], means["kl_sae"]),
        recovered_mean=fraction_recovered(means["kl_mean"], means["kl_sae"]),
        n_images=n,
    )
